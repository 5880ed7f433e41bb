#!/usr/bin/env bash
# The GPU measurements a maintainer reruns, in one go on the GPU machine (repo root): install the wheels carried
# in .whl/ (fla-core, einops, bitsandbytes for the QLoRA tests and small-cards, ...), then run the named stages,
# logging to $OUT/log.txt and the table rows to $OUT/table.txt. Usage: bash benchmarks/gpu_run.sh tests decode ...
#
# Stages (each named by what it measures):
#   tests           the GPU tests (kernels, fla vs the exact chunked path, decode graphs, compiled layers, the
#                   sync-free step, training's sample replies through captured graphs), one process per test so
#                   that first-use autotuning overlaps
#   warm, pack      fla's first-use autotuning (WARM_SHAPES, default the 1B / 7B shapes); the cache's results packed
#                   into $OUT/tcache.tgz (what src/tnlora/resources/fla_autotune_sm90.tgz ships)
#   defaults        what tnlora train's defaults resolve to on this card (no training)
#   issue-rows      every row of the throughput issue with the defaults: decoding 7B / 1B at batch 1 and 32,
#                   the huanhuan-shaped training defaults 1B / 7B, 7B on one LONG_LEN-token sequence
#   train-defaults  1B and 7B training steps with tnlora train's defaults (CARD_GIB caps the memory)
#   train-seed      7B at the tutorial recipe's own settings (padding, 4 x 4 micro-batches, checkpointing)
#   train-long      7B on one LONG_LEN-token sequence (offloaded checkpointing, compiled)
#   train-long-defaults  7B on one LONG_LEN-token sequence with tnlora train's defaults (on the H200: checkpointing
#                   without offload, the memory left to less recompute: checkpoint_regions / uncheckpointed_layers)
#   train-long-regions  7B on one LONG_LEN-token sequence, checkpointed without offload, compiled, one machine:
#                   whole layers against the mixers checkpointed apart (checkpoint_regions layer / mixers), each
#                   with and without the last layers un-checkpointed (uncheckpointed_layers; REGION_PLANS, default
#                   "layer:0 mixers:0 layer:3 mixers:1")
#   small-cards     7B on smaller cards (the H200's memory capped): bf16 LoRA at 24 GiB and QLoRA (4-bit) at 12 GiB
#                   with tnlora train's defaults for huanhuan (eager), and the tutorial recipe's own settings at 24
#                   GiB; each row's `resolved:` line shows what the defaults chose and their memory estimate
#   small-cards-side  the same cards at one 1,024-token row without checkpointing (the plan the defaults rank
#                   below checkpointed 8 × 1,024): checks that order
#   train-ladder    the 1B rungs: padding and the chunked attention, packing, fla, 16k-token rows, compiled
#   decode          7B and 1B greedy decoding at batch 1 and 32 (CUDA graphs, fused step)
#   decode-profile  the top kernels of decoding (DECODE_PROFILES model:batch pairs, default "7B:1 7B:32 1B:1";
#                   32 new tokens: the prefill and 31 graph replays): where a step's time goes against its bytes;
#                   DECODE_ARGS=--no-pdl for the fused step's kernels (under the profiler a dependent launch's time
#                   includes its wait for the kernel before)
#   decode-branches  batch-32 decoding (BATCH) with the GLU's two projections one after the other and side by
#                   side in the graph (--no-branches / --branches), twice each, one machine (MODELS, default "7B 1B")
#   decode-defer    decoding (BATCH, default "1,32") with the greedy device loop writing the recurrent states
#                   back every step and every DEFER (default 4) steps, twice each, one machine (MODELS)
#   decode-rows     decoding at BATCH (default 32) with the layer forwards (--gemv_max_batch 1) and the GEMV step
#                   of several rows (the rows kernel, norms reading the squares the projection before wrote), twice
#                   each, one machine (MODELS)
#   decode-kernel   decoding with the torch and the triton recurrence
#   recurrence      the decode step's recurrence alone at 7B / 1B batch 32 and 1, per launch (tiles, warps;
#                   benchmarks/recurrence.py; RECURRENCE_ARGS, e.g. "--shapes 7B:32 --launches 128:32:4,128:64:8")
#   gemv            the batch-1 decode projections: cuBLAS / cuBLASLt against a Triton GEMV (benchmarks/gemv.py;
#                   GEMV_ARGS=--fused: tnlora.ops.gemv's fused forms against the composition they replace;
#                   GEMV_ARGS="--rows 32": batch 32, cuBLAS against a Triton skinny GEMM; GEMV_ARGS=--sweep:
#                   tnlora.ops.gemv's launches per form and shape)
#   gemv-step       the GEMV step's launches chosen inside the captured step (benchmarks/gemv_step.py; MODELS,
#                   default "1B,7B"; GEMV_STEP_ARGS, e.g. "--descend 1B": the models searched, the others only
#                   compare early and late dependent launches; "--batch 32 --splits 2,3,4": the rows kernel's
#                   launches with K split into parts too): every try's ms a step, and the TUNED entries
#   gemm            the training step's frozen-weight GEMMs alone (benchmarks/gemm.py; GEMM_ARGS): plain and β = 1,
#                   forward and input gradient, per projection shape, and the SM clock under a sustained run
#                   (GEMM_ARGS=--fp8: the fp8 forms too; GEMM_ARGS=--quantize: fp8's per-token quantization alone,
#                   Inductor's kernel against the Triton one; GEMM_ARGS=--stacked: the GLU's l1 and l2 as two GEMMs
#                   against one over the stacked weights, alternating under sustained load)
#   decode-steps    batch-1 decoding (MODELS, default "1B 7B") with the layer forwards (--no-gemv), the GEMV
#                   step (the default) and the GEMV step without dependent launches (--no-pdl), one machine
#   opt-outs        tnlora train's defaults against their opt-outs on one machine (MODELS, default 1B):
#                   --loss_kernel torch and / or --no-lora_compiled_op
#   train-fp8       tnlora train's defaults with the frozen GEMMs in bf16 and in fp8 (fp8 false / true), twice each,
#                   alternating, one machine (MODELS, default "1B 7B"); gemm with GEMM_ARGS=--fp8: the GEMMs alone
#   train-candidate  tnlora train's defaults with the tree and with a candidate (the tree's source with the patch
#                   CANDIDATE_PATCH applied, e.g. .whl/rule.patch from `git diff A B -- src`), after one warm-up run of
#                   the tree, alternating ROUNDS rounds (default 2), one machine (MODELS, default 1B; TRAIN_ARGS for both)
#   micro-batch     tnlora train's defaults at ROWS rows of 1,024 a micro-batch (default "32 64"; MODELS, default 1B;
#                   ROUNDS rounds alternating): whether twice the default micro-batch pays (the LoRA backward's
#                   one-read kernel takes over from 65,536 rows)
#   train-trim      tnlora train's defaults with the last layer computing every position and the labelled ones only
#                   after its attention (--no-trim_last_layer / --trim_last_layer), twice each, alternating, one machine
#                   (MODELS, default "1B 7B"); run a warm-up row first (TAG=", warm-up" train-defaults)
#   act-kernel      tnlora train's defaults with the token mixer's activation as PyTorch's form and as the kernels
#                   (act_kernel torch / triton; MODELS, default "1B 7B"; "auto", the default, is triton on CUDA)
#   act             the activation alone, forward and backward, compiled PyTorch form against the operators
#                   (benchmarks/act.py; ACT_ARGS, e.g. "--shapes 1B:32768"): ms, GB/s and each form's error
#   lora-grad       the LoRA backward's two rank-r products of dy: cuBLAS's two GEMMs against one read of dy
#                   (benchmarks/lora_grad.py; LORA_GRAD_ARGS, e.g. "--shapes 1B:32768", "--sweep --tiles 64:128,128:128,64:256")
#   lora-products   every rank-r product of the fused LoRA layers' step alone, cuBLAS against the Triton forms
#                   (benchmarks/lora_products.py; LORA_PRODUCTS_ARGS, e.g. "--shapes 1B:32768 --sweep")
#   lora-grad-kernel  tnlora train's defaults with the LoRA backward's products of dy as two GEMMs and as one read
#                   (--lora_grad_kernel torch / triton; MODELS, default "1B 7B")
#   lora-dropout    LoRA's dropout alone: PyTorch's dropout and the products on the dropped input against the
#                   byte-mask kernels (benchmarks/lora_dropout.py; LORA_DROPOUT_ARGS, e.g. --sweep)
#   train-dropout   the huanhuan recipe's step (eager, 8 x 1,024, LoRA dropout 0.1, alpha 32; MODELS, default 7B)
#                   with PyTorch's dropout and the byte-mask kernels (--lora_dropout_kernel torch / triton), ROUNDS
#                   rounds alternating, then once without dropout (the ceiling)
#   loss            one chunk of the training loss: PyTorch's cross-entropy composition against the fused kernel
#                   (benchmarks/cross_entropy.py; loss_kernel)
#   decode-adapter  7B decoding with a LoRA adapter kept unmerged / merged
#   e2e             `tnlora train examples/huanhuan_7b_lora_fast.yaml` end to end (.whl/e2e: 7B config,
#                   tokenizer and huanhuan.json, from ../shared), each line behind its second (--timeline)
#   e2e-fresh       the same with an empty Triton cache (a new machine's first run: fla's autotuning unless tnlora's
#                   shipped results serve the card, every kernel compiled), then how many autotune results the run
#                   tuned itself
#   serve           benchmarks/serve_bench.py against a 7B server (concurrent clients, sessions; the serve extra's
#                   wheels from .whl/serve/: fastapi, uvicorn, openai and their dependencies; SERVE_ARGS, e.g.
#                   "--clients 32 --defer_steps 0": the engine's states written back every step, against the default 4)
#   attention       the lightning attention forward + backward, fla against chunked
#   attention-packed  the lightning attention forward + backward (and forward alone), fla against tnlora's Triton
#                   scans, on packed rows of huanhuan.json's example lengths at the 7B / 1B / huanhuan-command
#                   micro-batches, on examples of 1,024 / 4,096 tokens and on single long rows (32, 16, 8 heads;
#                   also the forward alone there, as a long prompt's prefill runs it);
#                   then the scans' backward launches (GRAD_SWEEP, "K block:V block:warps[:merged] ..."; merged: dk
#                   and dv in one launch) at the 7B micro-batch
#   attention-segments  packed huanhuan-shaped examples (SEGMENT_SHAPES heads:tokens): the scans walking the examples
#                   that start in one block of SEGMENTS tokens a program (benchmarks/attention.py --segment-tokens;
#                   0: one example a program) against fla (ATT_IMPLS), forward + backward and forward alone
#   attention-backward  packed huanhuan-shaped examples (SEGMENT_SHAPES heads:tokens): the scans' backward walking the
#                   examples that start in one block of BACKWARD_SEGMENTS tokens a program, each in chunks of its own
#                   (benchmarks/attention.py --backward-segment-tokens; 0: one example a program), forward + backward
#                   back to back; at q/k 128 also with the backward's launches GRAD_FORMS (--triton-grad)
#   attention-quadratic  packed examples (QUADRATIC_EXAMPLES: huanhuan.json's lengths and uniform ones; 1B's 16 heads,
#                   32,768 tokens) forward + backward, the scans against the quadratic form in blocks
#                   (benchmarks/attention.py --quadratic-mean-tokens 0,4096): where the form stops paying
#   attention-quadratic-launches  the quadratic form's three launches at each of QUADRATIC_LAUNCHES (block:warps:
#                   pipeline stages[:output columns a program], or forward/dq/dkv launches joined by /) on huanhuan-shaped packed examples
#                   at 1B's and 7B's micro-batches (QUADRATIC_SHAPES); benchmarks/kernel_registers.py gives each
#                   launch's registers and occupancy without a GPU
#   attention-train  tnlora train's defaults with the attention as fla's chunk kernels and as tnlora's Triton scans
#                   (--attention_impl fla / triton; MODELS, default "1B 7B"; ROUNDS rounds, default 1, alternating)
#   attention-long  7B on one LONG_LEN-token sequence with tnlora train's defaults, the attention as "auto" (the
#                   scans on a Hopper card at 32 heads) and as fla's chunk kernels (ROUNDS rounds, default 1, alternating;
#                   IMPLS, default "auto fla": the forms run)
#   profile       the top kernels of one compiled 1B step (one 16,384-token row)
#   trace         the timeline of one step with tnlora train's defaults (MODELS, default 1B; the second of two
#                 timed steps: the first starts after the timer's sync) through benchmarks/trace_gaps.py: device
#                 time by kind of kernel, the top kernels, the idle gaps
#   trace-long    the same for 7B on one LONG_LEN-token sequence (offloaded checkpointing, compiled; TRAIN_ARGS
#                 vary it, e.g. --use_unsloth_gc false): one traced step after one untimed
#   prefill       the prefill's host time against its device time (benchmarks/prefill.py; PREFILL_ARGS)
#   decode-trace  the same for decoding (DECODE_TRACES model:batch pairs, default "7B:1 1B:1"; 32 new tokens: the
#                 prefill and 31 graph replays)
#   syncaudit       the host syncs left in compiled 1B steps
# Environment: SRC (the source tree to measure, default ./src; e.g. an older commit's for a before/after row),
#   CARD_GIB (cap the GPU memory: 79.6 stands in for an 80 GB card), LONG_LEN (default 131072), TAG (row suffix),
#   TRAIN_ARGS / DECODE_ARGS (more options for every training / decoding row, e.g. --lora_kernel peft, --batch 1),
#   ROUNDS (train-fp8's alternating rounds, default 2).
set -uo pipefail
SRC=${SRC:-$PWD/src}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$SRC
export TRITON_CACHE_DIR=$PWD/.tcache  # autotune results travel back in $OUT/tcache.tgz (fla autotunes ~minutes)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$TRITON_CACHE_DIR"
# fla's autotune results for sm_90 (triton 3.6.0, fla-core 0.6.0): a fresh machine then skips ~5 minutes of
# first-use tuning per q/k width. tnlora stores them in Triton's cache itself on the cards they serve
# (tnlora.ops.fla_autotune); seeded here too for the scripts that call fla directly. Triton keys them by kernel
# source, target and versions, so other cards or versions simply tune again.
[ -n "$(ls -A "$TRITON_CACHE_DIR")" ] || tar xzf src/tnlora/resources/fla_autotune_sm90.tgz -C "$TRITON_CACHE_DIR"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1 || echo "wheel install failed"
# A copy of the tree made for another machine names its commit in a COMMIT file beside the source tree (its git
# metadata, where copied at all, may be older than the tree), as the benches' environment line reads it.
COMMIT=$(cat "$SRC/../COMMIT" 2>/dev/null || git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo "?")
CAP=${CARD_GIB:+--gpu_memory_gib $CARD_GIB}
TAG=${TAG:-}
log() { echo "## $(date +%T) $*" | tee -a "$OUT/log.txt"; }
row() { tee -a "$OUT/log.txt" | grep -E "^\| |^resolved:|copy bandwidth|^config:" | grep -vE "^\|[- |]+\|$|^\| (run|model) " | tee -a "$OUT/table.txt"; }
train() { log "bench train $* ${TRAIN_ARGS:-}"; timeout "${LIMIT:-260}" python3 -m tnlora.cli bench train "$@" ${TRAIN_ARGS:-} 2>&1 | grep -v Warning | row; }
table_script() { log "$*"; timeout "${LIMIT:-300}" python3 benchmarks/"$@" 2>&1 | grep -v Warning | row; }  # benchmarks/SCRIPT ARGS, its table rows kept
decode() { log "bench decode $* ${DECODE_ARGS:-}"; timeout "${LIMIT:-180}" python3 -m tnlora.cli bench decode "$@" ${DECODE_ARGS:-} 2>&1 | grep -v Warning | row; }
pytests() {  # pytest-xdist workers: first-use autotuning and compiles overlap. At the limit pytest gets an interrupt
  # (then a kill 30 s later), so that it still prints the failures' names and messages it has (-rfE). WORKERS
  # (default 8, or 4 on a card under 100 GB: 8 with the 7B graph tests beside the kernels' ran an 80 GB card out
  # of memory)
  local mib; mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
  local workers=${WORKERS:-$([ "${mib:-0}" -ge 100000 ] && echo 8 || echo 4)}
  timeout -s INT -k 30 "${TEST_LIMIT:-420}" python3 -m pytest -o addopts= -q -p no:cacheprovider -n "$workers" -rfE "$@" > "$OUT/tests.txt" 2>&1
  grep -E "passed|failed|FAILED|ERROR" "$OUT/tests.txt" | tail -n 25 | tee -a "$OUT/log.txt" "$OUT/table.txt"
}
e2e_run() {  # the huanhuan command end to end; $1 names its log ($1.txt, then $1-2.txt, ...: a run's log each), $2 the log line
  E2E_OUT="$OUT/$1.txt"; n=1; while [ -e "$E2E_OUT" ]; do n=$((n + 1)); E2E_OUT="$OUT/$1-$n.txt"; done
  log "$2 (log: $E2E_OUT)"; timeout ${E2E_LIMIT:-480} python3 benchmarks/e2e_train.py --recipe examples/huanhuan_7b_lora_fast.yaml --model_files .whl/e2e --data .whl/e2e/huanhuan.json --work /tmp/e2e --keep_checkpoint --timeline $CAP -- ${E2E_ARGS:-} > "$E2E_OUT" 2>&1
  grep -vE "Warning|warn|it/s\]" "$E2E_OUT" | grep -v "^ *\(File\|torch\._dynamo\)" | tail -n 40 | cut -c1-240 | tee -a "$OUT/log.txt" "$OUT/table.txt"
}
train_long_defaults() { LIMIT=300 train --model 7B --seq_len ${LONG_LEN:-131072} --steps 1 --warmup 1 $CAP --name "7B one ${LONG_LEN:-131072}-token sequence, tnlora train's defaults ($COMMIT)$TAG"; }
pack() { (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/tcache.tgz" -T -) 2>/dev/null; }
python3 - <<'PY' 2>&1 | tee -a "$OUT/log.txt"
import importlib
for name in ["torch", "triton", "transformers", "peft", "accelerate", "fla", "einops", "bitsandbytes", "fastapi", "uvicorn", "openai"]:
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__)
PY
log "source $SRC at $COMMIT"
for stage in "$@"; do
  case $stage in
    tests)
      log "GPU tests"; pytests ${GPU_TESTS:-tests/ops tests/infer/test_decode_graph.py tests/train/test_compile_gpu.py tests/train/test_norm_kernel_gpu.py tests/train/test_loss_kernel_gpu.py tests/train/test_sync_gpu.py tests/train/test_qlora_gpu.py tests/train/test_training_kernels_gpu.py tests/train/test_train_callbacks.py tests/model/test_modeling.py} ;;
    warm)  # autotune fla for the shapes WARM_SHAPES (q/k width:heads:v width; default the 1B and 7B ones; 385M:
      # "128:8:128 256:8:128", the tiny preset "32:2:32 64:2:32") in parallel, then wait (at most WARM_LIMIT s); pack
      # then archives the cache, shipped results and new ones
      for shape in ${WARM_SHAPES:-128:16:128 256:16:128 128:32:128 256:32:128}; do
        python3 benchmarks/fla_warmup.py ${shape//:/ } > "$OUT/warm-${shape//:/-}.txt" 2>&1 &
      done
      START=$SECONDS; while [ -n "$(jobs -pr)" ] && [ $((SECONDS - START)) -lt ${WARM_LIMIT:-300} ]; do sleep 2; done
      cat "$OUT"/warm-*.txt | grep -v Warning | tail -n 8 | tee -a "$OUT/log.txt" ;;
    pack) pack ;;
    defaults)
      log "defaults"; timeout 120 python3 benchmarks/gpu_defaults.py 2>&1 | grep -v Warning | tail -n 5 | tee -a "$OUT/log.txt" "$OUT/table.txt" ;;
    train-defaults)
      for m in ${MODELS:-1B 7B}; do train --model $m $CAP --name "$m huanhuan-shaped, tnlora train's defaults${CARD_GIB:+, $CARD_GIB GiB} ($COMMIT)$TAG"; done ;;
    train-seed)
      train --model 7B --packing false --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --gradient_checkpointing true --torch_compile false $CAP --name "7B huanhuan-shaped at the tutorial recipe's settings ($COMMIT)$TAG" ;;
    train-long)
      LIMIT=300 train --model 7B --seq_len ${LONG_LEN:-131072} --use_unsloth_gc true --torch_compile true --steps 1 --warmup 1 $CAP --name "7B one ${LONG_LEN:-131072}-token sequence, offloaded checkpointing ($COMMIT)$TAG" ;;
    issue-rows)  # the issue's rows with every default: decoding (7B, 1B at batch 1 and 32), the huanhuan-shaped
      # training defaults (1B, 7B) and 7B on one LONG_LEN-token sequence (the last only where the card has the memory)
      for m in 7B 1B; do decode --model $m $CAP; done
      for m in 1B 7B; do train --model $m $CAP --name "$m huanhuan-shaped, tnlora train's defaults ($COMMIT)$TAG"; done
      train_long_defaults ;;
    train-long-defaults)
      train_long_defaults ;;
    train-long-regions)
      for plan in ${REGION_PLANS:-layer:0 mixers:0 layer:3 mixers:1}; do
        r=${plan%%:*}; k=${plan##*:}
        LIMIT=300 train --model 7B --seq_len ${LONG_LEN:-131072} --gradient_checkpointing true --use_unsloth_gc false --checkpoint_regions $r --uncheckpointed_layers $k --torch_compile true --steps 1 --warmup 1 $CAP --name "7B one ${LONG_LEN:-131072}-token sequence, checkpointing without offload, checkpoint_regions $r, uncheckpointed_layers $k ($COMMIT)$TAG"
      done ;;
    small-cards)  # the huanhuan recipe's adapter (rank 8, alpha 32, dropout 0.1); eager, as train picks for 1.2 M tokens
      HH="--lora_alpha 32 --lora_dropout 0.1 --torch_compile false"
      train --model 7B $HH --gpu_memory_gib 24 --name "7B huanhuan-shaped, bf16 LoRA, tnlora train's defaults, 24 GiB ($COMMIT)$TAG"
      train --model 7B $HH --quantization_bit 4 --gpu_memory_gib 12 --name "7B huanhuan-shaped, QLoRA nf4, tnlora train's defaults, 12 GiB ($COMMIT)$TAG"
      train --model 7B $HH --packing false --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --gradient_checkpointing true --gpu_memory_gib 24 --name "7B huanhuan-shaped, the tutorial recipe's settings (padding, 4 x 4, checkpointing), 24 GiB ($COMMIT)$TAG" ;;
    small-cards-side)
      HH="--lora_alpha 32 --lora_dropout 0.1 --torch_compile false --per_device_train_batch_size 1 --gradient_checkpointing false"
      train --model 7B $HH --gpu_memory_gib 24 --name "7B huanhuan-shaped, bf16 LoRA, 1 x 1,024 without checkpointing, 24 GiB ($COMMIT)$TAG"
      train --model 7B $HH --quantization_bit 4 --gpu_memory_gib 12 --name "7B huanhuan-shaped, QLoRA nf4, 1 x 1,024 without checkpointing, 12 GiB ($COMMIT)$TAG" ;;
    train-ladder)
      train --model 1B --packing false --attention_impl chunked --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --torch_compile false --name "1B padding, chunked attention, 4 x 4 ($COMMIT)$TAG"
      train --model 1B --cutoff_len 2048 --attention_impl chunked --per_device_train_batch_size 1 --gradient_accumulation_steps 4 --torch_compile false --name "1B + packing 2,048-token rows, 1 x 4 ($COMMIT)$TAG"
      train --model 1B --cutoff_len 2048 --attention_impl fla --per_device_train_batch_size 1 --gradient_accumulation_steps 4 --torch_compile false --name "1B + fla ($COMMIT)$TAG"
      train --model 1B --cutoff_len 16384 --attention_impl fla --per_device_train_batch_size 1 --torch_compile false --name "1B + 16,384-token rows ($COMMIT)$TAG"
      train --model 1B --cutoff_len 16384 --attention_impl fla --per_device_train_batch_size 1 --torch_compile true --name "1B + compiled layers ($COMMIT)$TAG" ;;
    decode)
      for m in ${MODELS:-7B 1B}; do decode --model $m $CAP; done ;;
    gemv-step)
      log "gemv step ${MODELS:-1B,7B}"; timeout ${LIMIT:-480} python3 benchmarks/gemv_step.py --models ${MODELS:-1B,7B} ${GEMV_STEP_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/gemv_step.txt" | row ;;
    decode-steps)
      for m in ${MODELS:-1B 7B}; do for a in "--no-gemv" "" "--no-pdl"; do decode --model $m --batch 1 $a; done; done ;;
    decode-profile)
      for mb in ${DECODE_PROFILES:-7B:1 7B:32 1B:1}; do m=${mb%%:*}; b=${mb##*:}
        log "decode profile $m batch $b"; timeout 150 python3 -m tnlora.cli bench decode --model $m --batch $b --new_tokens 32 --profile ${DECODE_ARGS:-} > "$OUT/profile-$m-$b.txt" 2>&1
        grep -vE "Warn|warn" "$OUT/profile-$m-$b.txt" | grep -E "ms/step|Self CUDA time total|nvjet|gemm|rms|recurrent|elementwise|reduce|Memcpy|\| $m" | head -n 24 | cut -c1-60,100-250 | tee -a "$OUT/log.txt"
      done ;;
    gemv)
      table_script gemv.py ${GEMV_ARGS:-} ;;
    gemm)
      log "gemm ${GEMM_ARGS:-}"; timeout ${LIMIT:-300} python3 benchmarks/gemm.py ${GEMM_ARGS:-} 2>&1 | grep -v Warning | tee -a "$OUT/log.txt" | grep -E "^\| |reference|sustained" >> "$OUT/table.txt" ;;
    train-fp8)
      for m in ${MODELS:-1B 7B}; do for round in $(seq ${ROUNDS:-2}); do for f in false true; do
        train --model $m --fp8 $f $CAP --name "$m huanhuan-shaped, tnlora train's defaults, fp8 $f, round $round ($COMMIT)$TAG"
      done; done; done ;;
    lora-dropout)
      table_script lora_dropout.py ${LORA_DROPOUT_ARGS:-} ;;
    train-dropout)
      RECIPE="--torch_compile false --per_device_train_batch_size 8 --gradient_checkpointing false --lora_alpha 32"
      for m in ${MODELS:-7B}; do
        for round in $(seq ${ROUNDS:-2}); do for k in torch triton; do
          train --model $m $RECIPE --lora_dropout 0.1 --lora_dropout_kernel $k $CAP --name "$m huanhuan recipe's step, LoRA dropout 0.1, lora_dropout_kernel $k, round $round ($COMMIT)$TAG"
        done; done
        train --model $m $RECIPE --lora_dropout 0.0 $CAP --name "$m huanhuan recipe's step, no LoRA dropout ($COMMIT)$TAG"
      done ;;
    train-trim)
      for m in ${MODELS:-1B 7B}; do for round in 1 2; do for t in --no-trim_last_layer --trim_last_layer; do
        train --model $m $t $CAP --name "$m huanhuan-shaped, tnlora train's defaults, ${t#--}, round $round ($COMMIT)$TAG"
      done; done; done ;;
    opt-outs)  # tnlora train's defaults against their opt-outs on one machine: the loss kernel and the compiled
      # fused-LoRA operators, each alone and both (MODELS, default 1B)
      for m in ${MODELS:-1B}; do
        for extra in "--loss_kernel torch --no-lora_compiled_op" "--loss_kernel torch" "--no-lora_compiled_op" ""; do
          train --model $m $extra --name "$m huanhuan-shaped, tnlora train's defaults ${extra:-(as they are)} ($COMMIT)$TAG"
        done
      done ;;
    loss)
      table_script cross_entropy.py ;;
    act)
      table_script act.py ${ACT_ARGS:-} ;;
    lora-grad)
      table_script lora_grad.py ${LORA_GRAD_ARGS:-} ;;
    lora-products)
      table_script lora_products.py ${LORA_PRODUCTS_ARGS:-} ;;
    lora-grad-kernel)
      for m in ${MODELS:-1B 7B}; do for k in torch triton; do
        train --model $m --lora_grad_kernel $k --name "$m huanhuan-shaped, tnlora train's defaults, lora_grad_kernel $k ($COMMIT)$TAG"
      done; done ;;
    train-candidate)
      rm -rf /tmp/cand && mkdir -p /tmp/cand && cp -r "$SRC" /tmp/cand/src
      if ! patch -s -d /tmp/cand -p1 < "${CANDIDATE_PATCH:?CANDIDATE_PATCH names the patch to try}"; then
        log "$CANDIDATE_PATCH does not apply to $SRC"; continue
      fi
      for m in ${MODELS:-1B}; do
        train --model $m $CAP --name "$m huanhuan-shaped, tnlora train's defaults, warm-up ($COMMIT)$TAG"
        for r in $(seq ${ROUNDS:-2}); do
          train --model $m $CAP --name "$m huanhuan-shaped, tnlora train's defaults, round $r ($COMMIT)$TAG"
          (export PYTHONPATH=/tmp/site:/tmp/cand/src
           train --model $m $CAP --name "$m huanhuan-shaped, tnlora train's defaults + $(basename "$CANDIDATE_PATCH"), round $r ($COMMIT)$TAG")
        done
      done ;;
    micro-batch)  # tnlora train's defaults at the default micro-batch and at twice its rows (MODELS, default 1B; ROUNDS
      # rounds alternating; ROWS, default "32 64": 64 x 1,024 is where the LoRA backward's one-read kernel applies)
      for m in ${MODELS:-1B}; do for r in $(seq ${ROUNDS:-1}); do for b in ${ROWS:-32 64}; do
        train --model $m --per_device_train_batch_size $b $CAP --name "$m huanhuan-shaped, tnlora train's defaults, $b x 1,024 a micro-batch, round $r ($COMMIT)$TAG"
      done; done; done ;;
    act-kernel)  # the token mixer's activation: PyTorch's form against the kernels (MODELS, default "1B 7B")
      for m in ${MODELS:-1B 7B}; do for a in torch triton; do
        train --model $m --act_kernel $a --name "$m huanhuan-shaped, tnlora train's defaults, act_kernel $a ($COMMIT)$TAG"
      done; done ;;
    decode-branches)  # the GLU's projections one after the other against side by side, twice each (MODELS)
      for m in ${MODELS:-7B 1B}; do for r in 1 2; do for b in --no-branches --branches; do
        decode --model $m --batch ${BATCH:-32} $b
      done; done; done ;;
    decode-defer)  # the device loop's state writes every step against every DEFER steps, twice each (MODELS)
      for m in ${MODELS:-7B 1B}; do for r in 1 2; do for d in 0 ${DEFER:-4}; do
        decode --model $m --batch ${BATCH:-1,32} --defer_steps $d
      done; done; done ;;
    decode-rows)  # batch BATCH (default 32): the layer forwards against the rows-kernel GEMV step, twice each (MODELS)
      for m in ${MODELS:-7B 1B}; do for r in 1 2; do for g in 1 ${BATCH:-32}; do
        decode --model $m --batch ${BATCH:-32} --gemv_max_batch $g
      done; done; done ;;
    recurrence)  # the decode step's recurrence alone, per launch (benchmarks/recurrence.py; RECURRENCE_ARGS)
      table_script recurrence.py ${RECURRENCE_ARGS:-} ;;
    decode-kernel)
      for m in ${MODELS:-7B 1B}; do for k in torch triton; do decode --model $m --decode_kernel $k; done; done ;;
    decode-adapter)
      for a in unmerged merged; do decode --model 7B --adapter $a; done ;;
    e2e) e2e_run e2e "e2e train 7B ${E2E_ARGS:-}" ;;
    e2e-fresh)  # the same command with an empty Triton cache, as on a new machine (fla's autotuning, every kernel
      # compiled); SRC=an older tree for the row before a change. Then the autotune results the run tuned itself.
      FRESH=$(mktemp -d); (export TRITON_CACHE_DIR=$FRESH; e2e_run e2e-fresh "e2e train 7B, empty Triton cache, ${E2E_ARGS:-}")
      python3 - "$FRESH" <<'PY' 2>&1 | tee -a "$OUT/log.txt" "$OUT/table.txt"
import sys, tarfile
from pathlib import Path
root = Path(sys.argv[1])
found = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.autotune.json")}
with tarfile.open("src/tnlora/resources/fla_autotune_sm90.tgz") as tar:
    shipped = {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
# A result the run tuned itself has its own timings, so it differs from the shipped one of the same key.
tuned = [name for name, data in found.items() if shipped.get(name) != data]
print(f"autotune results in the cache: {len(found)}, the shipped ones {len(found) - len(tuned)}, tuned by the run {len(tuned)}")
PY
      rm -rf "$FRESH" ;;
    serve)  # the serve extra from .whl/serve/ where carried (pure wheels, and the binary ones of this Python)
      if [ -d .whl/serve ]; then
        tag=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-")')
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $(ls .whl/serve/*.whl | grep -E "none-any|$tag") \
          >/dev/null 2>&1 || echo "serve wheel install failed"
      fi
      log "serve bench"; timeout ${SERVE_LIMIT:-480} python3 benchmarks/serve_bench.py --model ${SERVE_MODEL:-7B} --device cuda ${SERVE_ARGS:-} > "$OUT/serve.txt" 2>&1
      grep -vE "Warning|warn" "$OUT/serve.txt" | tail -n 30 | tee -a "$OUT/log.txt" "$OUT/table.txt" ;;
    attention)
      log "attention"; timeout ${LIMIT:-200} python3 benchmarks/attention.py --impls fla,chunked 2>&1 | tee -a "$OUT/log.txt" | tail -n 20 >> "$OUT/table.txt" ;;
    attention-train)
      for r in $(seq ${ROUNDS:-1}); do for m in ${MODELS:-1B 7B}; do for impl in fla triton; do
        train --model $m $CAP --attention_impl $impl --name "$m huanhuan-shaped, defaults, attention $impl ($COMMIT)$TAG"
      done; done; done ;;
    attention-long)
      for r in $(seq ${ROUNDS:-1}); do for impl in ${IMPLS:-auto fla}; do
        LIMIT=300 train --model 7B --seq_len ${LONG_LEN:-131072} --steps 1 --warmup 1 --attention_impl $impl $CAP --name "7B one ${LONG_LEN:-131072}-token sequence, tnlora train's defaults, attention $impl ($COMMIT)$TAG"
      done; done ;;
    attention-packed)
      att() { table_script attention.py --impls ${ATT_IMPLS:-fla,triton} --repeats 5 --back-to-back 20 "$@"; }
      for shape in 32:16384 16:32768 32:8192; do
        att --heads ${shape%%:*} --lengths ${shape##*:} --examples huanhuan --head-dims 128,256
        att --heads ${shape%%:*} --lengths ${shape##*:} --examples huanhuan --head-dims 128 --forward
      done
      for ex in 1024 4096; do att --heads 32 --lengths 16384 --examples $ex --head-dims 128; done
      att --heads 32 --lengths 16384,131072 --head-dims 128
      att --heads 16 --lengths 32768,131072 --head-dims 128
      att --heads 8 --lengths 131072 --head-dims 128
      for h in 32 16 8; do att --heads $h --lengths 32768,131072 --head-dims 128 --forward; done
      for cfg in ${GRAD_SWEEP:-64:32:4 64:32:4:merged 64:32:8:merged 128:32:8}; do
        att --impls triton --heads 32 --lengths 16384 --examples huanhuan --head-dims 128,256 --triton-grad $cfg
      done ;;
    attention-quadratic)  # the scans against the quadratic form in blocks, by the examples' length
      for ex in ${QUADRATIC_EXAMPLES:-huanhuan 256 512 1024}; do
        table_script attention.py --impls triton --quadratic-mean-tokens 0,4096 --repeats 5 --back-to-back 20 --heads 16 --lengths 32768 --examples $ex --head-dims 128,256
      done ;;
    attention-quadratic-launches)  # the quadratic form's launches (QUADRATIC_LAUNCHES, block:warps:stages) on packed
      # huanhuan-shaped examples (QUADRATIC_SHAPES heads:tokens: 1B's and 7B's micro-batches), q/k QUADRATIC_HEAD_DIM
      # (default 128; 256: LRPE's layer, whose list should start from its own launches 32:4:3:128/32:4:3:128/32:4:3:256), one process a
      # shape, the launches one after another (rows L0, L1, ... in the order given), then the first again (the last row)
      for shape in ${QUADRATIC_SHAPES:-16:32768 32:8192}; do
        launches=${QUADRATIC_LAUNCHES:-64:4:3:128:32 32:4:3:128 64:8:3:128:32 64:4:3:128:16 64:4:2:128:32 64:4:3:128:64 32:4:3:128/32:4:3:128/64:4:3:128:32 64:4:3:128:32/64:4:3:128:32/32:4:3:128}
        first=${launches%% *}
        table_script attention.py --impls triton --quadratic-mean-tokens 4096 --quadratic-launch "${launches// /,},$first" --repeats 5 --back-to-back 20 --heads ${shape%%:*} --lengths ${shape##*:} --examples huanhuan --head-dims ${QUADRATIC_HEAD_DIM:-128}
      done ;;
    attention-segments)  # packed huanhuan-shaped examples: the scans walking SEGMENTS tokens' examples a program (0:
      # one example a program) against fla, forward + backward and forward alone, back to back
      for shape in ${SEGMENT_SHAPES:-32:16384 16:32768 32:8192}; do
        table_script attention.py --impls ${ATT_IMPLS:-fla,triton} --segment-tokens ${SEGMENTS:-0,1024,2048,4096} --repeats 5 --back-to-back 20 --heads ${shape%%:*} --lengths ${shape##*:} --examples huanhuan --head-dims 128,256
        table_script attention.py --impls triton --segment-tokens ${SEGMENTS:-0,1024,2048,4096} --repeats 5 --back-to-back 20 --heads ${shape%%:*} --lengths ${shape##*:} --examples huanhuan --head-dims 128 --forward
      done ;;
    attention-backward)  # the scans' backward walking BACKWARD_SEGMENTS tokens' examples a program (0: one example a
      # program), huanhuan-shaped, forward + backward back to back; the launches GRAD_FORMS at q/k 128 too
      for shape in ${SEGMENT_SHAPES:-32:16384 16:32768}; do
        table_script attention.py --impls triton --backward-segment-tokens ${BACKWARD_SEGMENTS:-0,256,512,1024,2048} --repeats 5 --back-to-back 20 --heads ${shape%%:*} --lengths ${shape##*:} --examples huanhuan --head-dims 128,256
        for g in ${GRAD_FORMS:-64:32:4 64:32:8}; do
          table_script attention.py --impls triton --triton-grad $g --backward-segment-tokens ${BACKWARD_SEGMENTS:-0,256,512,1024,2048} --repeats 5 --back-to-back 20 --heads ${shape%%:*} --lengths ${shape##*:} --examples huanhuan --head-dims 128
        done
      done ;;
    profile)
      log "profile"; timeout 200 python3 -m tnlora.cli bench train --model 1B --cutoff_len 16384 --attention_impl fla --torch_compile true --per_device_train_batch_size 1 --steps 1 --warmup 2 --profile > "$OUT/profile.txt" 2>&1
      grep -E "Name|aten::|void|gemm|triton|Self CUDA" "$OUT/profile.txt" | head -n 30 | cut -c1-160 | tee -a "$OUT/log.txt" ;;
    trace)
      for m in ${MODELS:-1B}; do
        log "trace $m train defaults"; timeout 240 python3 -m tnlora.cli bench train --model $m --steps 2 --warmup 2 ${TRAIN_ARGS:-} --trace /tmp/trace.json > "$OUT/trace-$m.txt" 2>&1
        grep -E "^\| |^config:" "$OUT/trace-$m.txt" | tee -a "$OUT/log.txt"
        python3 benchmarks/trace_gaps.py /tmp/trace.json --top 25 2>&1 | tee -a "$OUT/log.txt" > "$OUT/gaps-$m.txt"; rm -f /tmp/trace.json
      done ;;
    trace-long)
      log "trace 7B one ${LONG_LEN:-131072}-token sequence ${TRAIN_ARGS:-}"; timeout ${LIMIT:-360} python3 -m tnlora.cli bench train --model 7B --seq_len ${LONG_LEN:-131072} --use_unsloth_gc true --torch_compile true --steps 1 --warmup 1 ${TRAIN_ARGS:-} --trace /tmp/trace.json > "$OUT/trace-long.txt" 2>&1
      grep -E "^\| |^config:|^resolved:" "$OUT/trace-long.txt" | tee -a "$OUT/log.txt" "$OUT/table.txt"
      python3 benchmarks/trace_gaps.py /tmp/trace.json --top 30 2>&1 | tee -a "$OUT/log.txt" > "$OUT/gaps-long.txt"; rm -f /tmp/trace.json ;;
    prefill)  # PREFILL_ARGS: more options of benchmarks/prefill.py (e.g. --impls fla,chunked --profile 30)
      log "prefill ${PREFILL_ARGS:-}"; timeout ${LIMIT:-300} python3 benchmarks/prefill.py ${PREFILL_ARGS:-} > "$OUT/prefill.txt" 2>&1
      grep -E "^\| |^(card|GPU|torch)" "$OUT/prefill.txt" | tee -a "$OUT/log.txt" "$OUT/table.txt" ;;
    decode-trace)  # DECODE_TRACES: model:batch pairs
      for mb in ${DECODE_TRACES:-7B:1 1B:1}; do m=${mb%%:*}; b=${mb##*:}
        log "decode trace $m batch $b"; timeout 150 python3 -m tnlora.cli bench decode --model $m --batch $b --new_tokens 32 ${DECODE_ARGS:-} --trace /tmp/dtrace.json > "$OUT/dtrace-$m-$b.txt" 2>&1
        grep -E "^\| $m|ms/step" "$OUT/dtrace-$m-$b.txt" | tee -a "$OUT/log.txt"
        python3 benchmarks/trace_gaps.py /tmp/dtrace.json --top 25 --min_us 2 2>&1 | tee -a "$OUT/log.txt" > "$OUT/dgaps-$m-$b.txt"; rm -f /tmp/dtrace.json
      done ;;
    syncaudit)
      log "sync audit"; timeout 200 python3 -m tnlora.cli bench train --model 1B --cutoff_len 16384 --attention_impl fla --torch_compile true --per_device_train_batch_size 1 --steps 2 --warmup 2 --sync_audit > "$OUT/syncaudit.txt" 2>&1
      grep -A12 "host syncs" "$OUT/syncaudit.txt" | cut -c1-200 | tee -a "$OUT/log.txt" ;;
    *) log "unknown stage $stage" ;;
  esac
done
pack
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader | tee -a "$OUT/log.txt"
echo; cat "$OUT/table.txt" 2>/dev/null
