#!/usr/bin/env bash
# One device call: install the carried wheels, then run the named stages, logging to $OUT/log.txt.
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_run.sh check ladder1b ...
# Stages: defaults (the picked defaults on this card), profile (compiled 1B step), warm/waitwarm (fla
#         autotuning), pack (autotune cache into $OUT), check / pcheck (GPU tests: fla vs chunked, serial / one
#         process per test), compile1b / b7c (1B / 7B 16k rows compiled), attn (attention fwd+bwd table),
#         ladder1b, b7 (7B data-shaped), long (fixed long sequences), maxlen (longest trainable sequence), seed (7B at the seed's settings),
#         kcheck (decode kernels, packed fla, compile GPU tests), decodeauto (7B/1B decode, defaults),
#         trace / dtrace (idle-gap timelines of the 1B step / 7B b32 decoding), dprofile (7B b32 decode), pack16 (16 x 1,024-token rows),
#         hostplan (sync-free fla chunk planning: tests, then with / without), syncaudit, budget32 (32k-token rows), final5,
#         final (decode graphs + compile rung), decode, decodek (fused Triton decode step: tests, then torch vs
#         triton decode figures), m80 / m80long (session 7: defaults and the 7B long sequence within an H100's
#         79.6 GiB, the allocator capped by tnlora bench --gpu_memory_gib), dbw (decode: the step alone, GB/s), e2e (tnlora train on huanhuan.json, timed),
#         norms (session 8: Triton training norms, tests and eager torch / triton), dadapter (7B decoding with a LoRA adapter, unmerged / merged).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
export TRITON_CACHE_DIR=$PWD/.tcache  # autotune results travel back in $OUT/tcache.tgz (fla autotunes ~minutes)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$TRITON_CACHE_DIR"
# fla's autotune results from earlier calls (tuned on an H100 80GB HBM3 and reused unchanged on an H200: both
# sm_90; triton 3.6.0, fla-core 0.6.0): a fresh machine then skips ~5 minutes of first-use tuning per q/k width.
# Triton keys them by kernel source, target and versions, so other cards or versions simply tune again.
[ -n "$(ls -A "$TRITON_CACHE_DIR")" ] || tar xzf benchmarks/fla_autotune_sm90.tgz -C "$TRITON_CACHE_DIR"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1 || echo "wheel install failed"
python3 - <<'PY' 2>&1 | tee -a "$OUT/log.txt"
import importlib
for name in ["torch", "triton", "transformers", "peft", "accelerate", "datasets", "safetensors", "sentencepiece",
             "tokenizers", "yaml", "matplotlib", "tensorboard", "fla", "einops", "liger_kernel"]:
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__, exc)
PY
log() { echo "## $(date +%T) $*" | tee -a "$OUT/log.txt"; }
bench() { log "bench $*"; timeout "${BENCH_TIMEOUT:-150}" python3 -m tnlora.cli bench "$@" 2>&1 | grep -v Warning >> "$OUT/log.txt"; tail -n 1 "$OUT/log.txt" | tee -a "$OUT/table.txt"; }
pack() {  # the Triton autotune results as $OUT/tcache.tgz (paths relative to the cache dir)
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$OUT/tcache.tgz" -T -) 2>/dev/null
  log "packed $(tar tzf "$OUT/tcache.tgz" | wc -l) autotune results"
}
START=$SECONDS
for stage in "$@"; do
  case $stage in
    warm)  # autotune fla for both q/k widths in parallel, in the background
      for kd in 128 256; do for h in 16 32; do python3 benchmarks/fla_warmup.py $kd $h > "$OUT/warm$kd-$h.txt" 2>&1 & done; done ;;
    waitwarm)
      log "waiting for the fla warm-up"; while [ -n "$(jobs -pr)" ] && [ $((SECONDS - START)) -lt ${WARM_LIMIT:-300} ]; do sleep 2; done
      cat "$OUT"/warm*.txt | grep -v Warning | tail -n 4 | tee -a "$OUT/log.txt" ;;
    pack)  # the autotune results so far, in case a later stage runs past the call's limit
      pack ;;
    profile)  # the top CUDA kernels of one step at the fastest 1B setting (compiled layers, 16k rows, fla)
      log "profile"; timeout 200 python3 -m tnlora.cli bench --model 1B --packing --pack_len 16384 --attn fla --torch_compile --batch_size 1 --grad_accum 1 --steps 1 --warmup 2 --profile > "$OUT/profile.txt" 2>&1
      grep -E "Name|aten::|void|gemm|triton|Self CUDA" "$OUT/profile.txt" | head -n 30 | cut -c1-160 | tee -a "$OUT/log.txt" ;;
    kcheck)  # the fused decode kernels' tests, packed fla rows, compiled vs eager layers (serial, on CUDA)
      log "kernel / packed / compile GPU tests"
      timeout ${KCHECK_LIMIT:-240} python3 -m pytest -o addopts= -q -s -p no:cacheprovider ${KCHECK_TESTS:-tests/model/test_norm_kernel.py \
        tests/model/test_recurrent_kernel.py tests/model/test_attention_gpu.py::test_fla_packed_rows_match_chunked tests/train/test_compile_gpu.py} \
        > "$OUT/kcheck.txt" 2>&1
      grep -E "relative error|loss|passed|failed|Error|assert" "$OUT/kcheck.txt" | tail -n 40 | tee -a "$OUT/log.txt" ;;
    decodeauto)  # generate() with the defaults (CUDA graphs, decode_kernel auto) for 7B and 1B
      for m in 7B 1B; do log "decode $m, defaults"
        timeout ${DECODE_LIMIT:-120} python3 -m tnlora.cli bench --decode --model $m 2>&1 | grep -v Warning | tee -a "$OUT/log.txt" | tail -n 2 | tee -a "$OUT/table.txt"
      done ;;
    trace)  # timeline of one compiled 1B 16k-row step: where the GPU waits for the host (benchmarks/trace_gaps.py)
      log "trace"; timeout 220 python3 -m tnlora.cli bench --model 1B --packing --pack_len 16384 --attn fla --torch_compile --batch_size 1 --grad_accum 1 --steps 1 --warmup 2 --trace /tmp/trace.json > "$OUT/trace.txt" 2>&1
      python3 benchmarks/trace_gaps.py /tmp/trace.json 2>&1 | tee -a "$OUT/log.txt" "$OUT/gaps.txt"; gzip -c /tmp/trace.json > "$OUT/trace.json.gz" ;;
    dtrace)  # the same for 7B batch-32 decoding (32 new tokens)
      log "decode trace"; timeout 150 python3 -m tnlora.cli bench --decode --model 7B --decode_batch 32 --new_tokens 32 --trace /tmp/dtrace.json > "$OUT/dtrace.txt" 2>&1
      python3 benchmarks/trace_gaps.py /tmp/dtrace.json 2>&1 | tee -a "$OUT/log.txt" "$OUT/dgaps.txt"; gzip -c /tmp/dtrace.json > "$OUT/dtrace.json.gz" ;;
    dprofile)  # the top CUDA kernels of one timed 7B batch-32 generate() (CUDA graphs, fused decode step)
      log "decode profile"; timeout 150 python3 -m tnlora.cli bench --decode --model 7B --decode_batch ${DPROFILE_BATCH:-32} --profile > "$OUT/dprofile.txt" 2>&1
      grep -E "ms/step|Name|Self CUDA|^\|" "$OUT/dprofile.txt" | cut -c1-160 | tee -a "$OUT/log.txt"
      grep -E "void|gemm|triton|Memcpy|cudaGraph|aten::" "$OUT/dprofile.txt" | head -n 25 | cut -c1-160 | tee -a "$OUT/log.txt" ;;
    pack16)  # the default micro-batch: 16 packed rows of 1,024 tokens (one 16k row is the measured setting)
      BENCH_TIMEOUT=200 bench --model 1B --packing --pack_len 1024 --attn fla --batch_size 16 --grad_accum 1 --torch_compile --name "1B huanhuan: 16 packed rows x 1,024, fla, torch.compile ($(cat COMMIT 2>/dev/null))" ;;
    defaults)  # what the picked defaults come to on this card (no training)
      log "defaults"; timeout 120 python3 benchmarks/gpu_defaults.py 2>&1 | grep -v Warning | tail -n 5 | tee -a "$OUT/log.txt" "$OUT/table.txt" ;;
    flabench)
      bench --model 1B --packing --pack_len 16384 --attn fla --batch_size 1 --grad_accum 1 --name "1B huanhuan: packing 16k rows, fla"
      bench --model 7B --packing --pack_len 16384 --attn fla --batch_size 1 --grad_accum 1 --name "7B huanhuan: packing 16k rows, fla"
      ;;
    long7b)
      BENCH_TIMEOUT=120 bench --model 7B --seq_len 65536 --attn fla --gradient_checkpointing --batch_size 1 --grad_accum 1 --steps 1 --warmup 1 --name "7B one 65,536-token sequence, checkpointing" ;;
    check)
      log "GPU tests"
      timeout ${CHECK_LIMIT:-200} python3 -m pytest -q -s tests/model/test_attention_gpu.py -p no:cacheprovider 2>&1 | tee -a "$OUT/log.txt" | grep -E "relative error|passed|failed|Error" | tail -n 60 ;;
    pcheck)  # the same GPU tests, one process per test id in parallel: first-use autotuning overlaps
      GPU_TESTS=${GPU_TESTS:-"tests/model/test_attention_gpu.py tests/model/test_decode_graph.py tests/train/test_compile_gpu.py"}
      log "GPU tests, one process each"; mkdir -p /tmp/pcheck
      python3 -m pytest -o addopts= --collect-only -q -m gpu $GPU_TESTS -p no:cacheprovider | grep '::' > /tmp/pcheck/ids
      i=0; while read -r id; do i=$((i + 1))
        (echo "=== $id"; timeout ${CHECK_LIMIT:-300} python3 -m pytest -q -s "$id" -p no:cacheprovider 2>&1) > /tmp/pcheck/$i.txt &
      done < /tmp/pcheck/ids; wait
      cat /tmp/pcheck/[0-9]*.txt | grep -E "^===|relative error|loss|passed|failed|skipped|Error|assert" | tee -a "$OUT/log.txt" "$OUT/check.txt" ;;
    attn)
      log "attention benchmark"
      timeout ${ATTN_LIMIT:-200} python3 benchmarks/attention.py --impls fla,chunked 2>&1 | tee -a "$OUT/log.txt" | tail -n 20 >> "$OUT/table.txt" ;;
    ladder1b)
      bench --model 1B --no-packing --attn chunked --batch_size 4 --grad_accum 4 --name "1B huanhuan: padding, chunked torch attn, b4x4"
      bench --model 1B --packing --pack_len 2048 --attn chunked --batch_size 1 --grad_accum 4 --name "1B huanhuan: + packing 2048 rows, chunked attn, b1x4"
      bench --model 1B --packing --pack_len 2048 --attn fla --batch_size 1 --grad_accum 4 --name "1B huanhuan: + fla kernel"
      bench --model 1B --packing --pack_len 16384 --attn fla --batch_size 1 --grad_accum 1 --name "1B huanhuan: + 16k-token micro-batches" ;;
    rungs)  # the rungs the first calls did not reach
      bench --model 1B --packing --pack_len 2048 --attn fla --batch_size 1 --grad_accum 4 --name "1B huanhuan: packing 2048 rows, fla, b1x4"
      bench --model 7B --packing --pack_len 16384 --attn fla --gradient_checkpointing --batch_size 1 --grad_accum 1 --name "7B huanhuan: packing 16k rows, fla, checkpointing"
      BENCH_TIMEOUT=120 bench --model 7B --seq_len 65536 --attn fla --gradient_checkpointing --batch_size 1 --grad_accum 1 --steps 2 --warmup 1 --name "7B one 65,536-token sequence, checkpointing"
      log "decode 7B"; timeout 120 python3 -m tnlora.cli bench --decode --model 7B 2>&1 | grep -v Warning | tee -a "$OUT/log.txt" | tail -n 3 | tee -a "$OUT/table.txt" ;;
    final)  # CUDA-graph decoding (tests, then 7B/1B figures) and the torch.compile rung against its baseline
      log "decode graph GPU tests"
      timeout 150 python3 -m pytest -q -s -m gpu tests/model/test_decode_graph.py -p no:cacheprovider 2>&1 | tail -n 12 | tee -a "$OUT/log.txt"
      log "decode 7B, cuda graphs"; timeout 100 python3 -m tnlora.cli bench --decode --model 7B --cuda_graphs 2>&1 | grep -v Warning | tee -a "$OUT/log.txt" | tail -n 3 | tee -a "$OUT/table.txt"
      BENCH_TIMEOUT=80 bench --model 1B --packing --pack_len 16384 --attn fla --batch_size 1 --grad_accum 1 --name "1B huanhuan: packing 16k rows, fla (baseline for compile)"
      BENCH_TIMEOUT=200 bench --model 1B --packing --pack_len 16384 --attn fla --batch_size 1 --grad_accum 1 --torch_compile --name "1B huanhuan: packing 16k rows, fla, + torch.compile of each block"
      log "decode 1B, cuda graphs"; timeout 60 python3 -m tnlora.cli bench --decode --model 1B --cuda_graphs 2>&1 | grep -v Warning | tee -a "$OUT/log.txt" | tail -n 3 | tee -a "$OUT/table.txt" ;;
    hostplan)  # fla_backend.py: its GPU tests, then the compiled 1B 16k step through fla's own path and through it
      log "host-planned fla backend GPU tests"
      timeout ${KCHECK_LIMIT:-240} python3 -m pytest -o addopts= -q -s -p no:cacheprovider tests/model/test_attention_gpu.py > "$OUT/hostplan.txt" 2>&1
      grep -E "relative error|passed|failed|Error|assert" "$OUT/hostplan.txt" | tail -n 30 | tee -a "$OUT/log.txt"
      FLA_DISABLE_BACKEND_DISPATCH=1 BENCH_TIMEOUT=200 bench --model 1B --packing --pack_len 16384 --attn fla --batch_size 1 --grad_accum 1 --torch_compile --name "1B huanhuan: 16k rows, fla, compiled, fla's own chunk planning (syncs) ($(cat COMMIT 2>/dev/null))"
      BENCH_TIMEOUT=200 bench --model 1B --packing --pack_len 16384 --attn fla --batch_size 1 --grad_accum 1 --torch_compile --name "1B huanhuan: 16k rows, fla, compiled, host-planned chunks ($(cat COMMIT 2>/dev/null))" ;;
    final5)  # session 5: the GPU tests of the sync-free step, the picked defaults, the 16k rung and the default micro-batch
      log "GPU tests: fla (host-planned backend), sync-free Trainer step"
      timeout 200 python3 -m pytest -o addopts= -q -s -p no:cacheprovider tests/model/test_attention_gpu.py tests/train/test_sync_gpu.py > "$OUT/final.txt" 2>&1
      grep -E "host syncs|^ +[0-9]+ +/|passed|failed|Error|assert" "$OUT/final.txt" | tail -n 20 | tee -a "$OUT/log.txt"
      log "defaults"; timeout 120 python3 benchmarks/gpu_defaults.py 2>&1 | grep -v Warning | tail -n 4 | tee -a "$OUT/log.txt" "$OUT/table.txt"
      BENCH_TIMEOUT=200 bench --model 1B --packing --pack_len 16384 --attn fla --batch_size 1 --grad_accum 1 --torch_compile --name "1B huanhuan: one 16k row, fla, compiled, sync-free step ($(cat COMMIT 2>/dev/null))"
      BENCH_TIMEOUT=200 bench --model 1B --packing --pack_len 1024 --attn fla --batch_size 32 --grad_accum 1 --torch_compile --name "1B huanhuan: the default micro-batch, 32 rows x 1,024, fla, compiled ($(cat COMMIT 2>/dev/null))" ;;
    s6tests)  # session 6: split decode graphs, fused prefill norms (GPU tests)
      log "GPU tests: decode graphs in parts, fused no-grad norms"
      timeout ${S6_TEST_LIMIT:-150} python3 -m pytest -o addopts= -q -s -p no:cacheprovider -m gpu tests/model/test_decode_graph.py tests/model/test_norm_kernel.py > "$OUT/s6tests.txt" 2>&1
      grep -E "passed|failed|Error|assert" "$OUT/s6tests.txt" | tail -n 20 | tee -a "$OUT/log.txt" ;;
    dparts)  # graphs per decode step and the prefill's fused norms (benchmarks/decode_parts.py)
      log "decode parts ${DPARTS_MODEL:-7B}"; timeout ${DPARTS_LIMIT:-200} python3 benchmarks/decode_parts.py --model ${DPARTS_MODEL:-7B} --parts ${DPARTS:-1,2,4,8} --blas ${DPARTS_BLAS:-cublaslt} --repeats ${DPARTS_REPEATS:-2} > "$OUT/dparts.txt" 2>&1
      grep -E "^\||Error|error" "$OUT/dparts.txt" | grep -v "all runs" | tee -a "$OUT/log.txt" "$OUT/table.txt" ;;
    skinny)  # the decode step's projections at batch 32: cuBLAS vs a Triton split-K kernel (benchmarks/skinny_gemm.py)
      log "skinny GEMMs"; timeout ${SKINNY_LIMIT:-180} python3 benchmarks/skinny_gemm.py --m ${SKINNY_M:-32} > "$OUT/skinny.txt" 2>&1
      grep -E "^\\||Error|error" "$OUT/skinny.txt" | tail -n 8 | tee -a "$OUT/log.txt" "$OUT/table.txt" ;;
    s6final)  # session 6: GPU tests of the changed paths, decode with cuBLAS / cuBLASLt graphs, the 1B default
      log "GPU tests: decode graphs, fused norms, sync-free step with the fused loss, compiled vs eager"
      timeout ${S6_TEST_LIMIT:-240} python3 -m pytest -o addopts= -q -s -p no:cacheprovider -m gpu tests/model/test_decode_graph.py tests/model/test_norm_kernel.py tests/train/test_sync_gpu.py tests/train/test_compile_gpu.py > "$OUT/s6tests.txt" 2>&1
      grep -E "host syncs|passed|failed|Error|assert" "$OUT/s6tests.txt" | tail -n 20 | tee -a "$OUT/log.txt"
      log "decode 7B: cuBLASLt / cuBLAS graphs"; timeout 200 python3 benchmarks/decode_parts.py --model 7B --parts 1 --blas cublaslt,cublas --repeats 3 > "$OUT/dparts.txt" 2>&1
      grep -E "^\\||Error|error" "$OUT/dparts.txt" | grep -v "all runs" | tee -a "$OUT/log.txt" "$OUT/table.txt"
      BENCH_TIMEOUT=200 bench --model 1B --packing --pack_len 1024 --attn fla --batch_size 32 --grad_accum 1 --torch_compile --steps 10 --name "1B huanhuan: the default micro-batch 32 x 1,024, compiled, fused loss gradients, 10 steps ($(cat COMMIT 2>/dev/null))" ;;
    profile32)  # the top CUDA kernels of one step of the default 1B micro-batch
      log "profile 32 x 1,024"; timeout ${PROFILE_LIMIT:-200} python3 -m tnlora.cli bench --model 1B --packing --pack_len 1024 --attn fla --torch_compile --batch_size 32 --grad_accum 1 --steps 1 --warmup 2 --profile > "$OUT/profile32.txt" 2>&1
      grep -E "Self CUDA time total|Self CPU time total" "$OUT/profile32.txt" | tee -a "$OUT/log.txt" ;;
    syncaudit)  # every host sync left in two compiled 1B 16k steps, by calling line
      log "sync audit"; timeout 200 python3 -m tnlora.cli bench --model 1B --packing --pack_len 16384 --attn fla --torch_compile --batch_size 1 --grad_accum 1 --steps 2 --warmup 2 --sync_audit > "$OUT/syncaudit.txt" 2>&1
      grep -A12 "host syncs" "$OUT/syncaudit.txt" | cut -c1-200 | tee -a "$OUT/log.txt" ;;
    budget32)  # twice the token budget of a micro-batch
      BENCH_TIMEOUT=200 bench --model 1B --packing --pack_len 32768 --attn fla --batch_size 1 --grad_accum 1 --torch_compile --name "1B huanhuan: 32k rows, fla, compiled, host-planned chunks ($(cat COMMIT 2>/dev/null))" ;;
    compile1b)  # the best 1B data-shaped setting (the default of tnlora train on a GPU)
      BENCH_TIMEOUT=200 bench --model 1B --packing --pack_len 16384 --attn fla --batch_size 1 --grad_accum 1 --torch_compile --name "1B huanhuan: packing 16k rows, fla, torch.compile ($(cat COMMIT 2>/dev/null))" ;;
    b7)
      bench --model 7B --no-packing --attn fla --batch_size 4 --grad_accum 4 --name "7B huanhuan: padding, fla, b4x4"
      bench --model 7B --packing --pack_len 16384 --attn fla --batch_size 1 --grad_accum 1 --name "7B huanhuan: packing 16k rows, fla" ;;
    long)
      bench --model 1B --seq_len 2048 --attn fla --batch_size 1 --grad_accum 1 --name "1B one 2,048-token sequence"
      bench --model 1B --seq_len 8192 --attn fla --batch_size 1 --grad_accum 1 --name "1B one 8,192-token sequence"
      bench --model 7B --seq_len 4096 --attn fla --batch_size 1 --grad_accum 1 --name "7B one 4,096-token sequence" ;;
    maxlen)  # the longest single sequence that trains (doubling), layer inputs in CPU memory (use_unsloth_gc)
      for m in ${MAXLEN_MODELS:-1B 7B}; do for n in ${MAXLEN_LENS:-131072 262144 524288}; do
        BENCH_TIMEOUT=240 bench --model $m --seq_len $n --attn fla --use_unsloth_gc --torch_compile --batch_size 1 --grad_accum 1 --steps 1 --warmup 1 --name "$m one $n-token sequence, offloaded checkpointing"
        tail -n 1 "$OUT/table.txt" | grep -q "^|" || break  # out of memory (or over time): stop doubling
      done; done ;;
    seed)  # the seed recipe's own settings (padding, b4x4, checkpointing as its script sets), peak memory
      bench --model 7B --no-packing --attn fla --gradient_checkpointing --batch_size 4 --grad_accum 4 --name "7B huanhuan at the seed's settings: padding b4x4, checkpointing" ;;
    b7c)  # 7B data-shaped with compile, without checkpointing (fits a 141 GB H200, not an 80 GB H100)
      BENCH_TIMEOUT=220 bench --model 7B --packing --pack_len 16384 --attn fla --batch_size 1 --grad_accum 1 --torch_compile --name "7B huanhuan: packing 16k rows, fla, torch.compile ($(cat COMMIT 2>/dev/null))" ;;
    m80)  # session 7: an H100 80GB's memory on the H200 (the allocator capped at 79.6 GiB), defaults as tnlora train picks them
      for m in 7B 1B; do
        BENCH_TIMEOUT=260 bench --model $m --train_defaults --gpu_memory_gib ${CARD_GIB:-79.6} --steps ${M80_STEPS:-5} --name "$m huanhuan, tnlora train's defaults, ${CARD_GIB:-79.6} GiB ($(cat COMMIT 2>/dev/null))"
        grep "^resolved:" "$OUT/log.txt" | tail -n 1 | tee -a "$OUT/table.txt"
        [ $m = 7B ] || continue  # the default before session 6 on that card: 16 rows x 1,024 with checkpointing
        BENCH_TIMEOUT=260 bench --model $m --train_defaults --gradient_checkpointing --gpu_memory_gib ${CARD_GIB:-79.6} --steps ${M80_STEPS:-5} --name "$m huanhuan, defaults but checkpointing, ${CARD_GIB:-79.6} GiB ($(cat COMMIT 2>/dev/null))"
        grep "^resolved:" "$OUT/log.txt" | tail -n 1 | tee -a "$OUT/table.txt"
      done ;;
    m80long)  # the longest 7B sequence within 79.6 GiB, layer inputs in CPU memory (524,288 would need 128 GB of it)
      for n in ${M80_LENS:-131072}; do
        BENCH_TIMEOUT=300 bench --model 7B --seq_len $n --attn fla --use_unsloth_gc --torch_compile --batch_size 1 --grad_accum 1 --steps 1 --warmup 1 --gpu_memory_gib ${CARD_GIB:-79.6} --name "7B one $n-token sequence, offloaded checkpointing, ${CARD_GIB:-79.6} GiB ($(cat COMMIT 2>/dev/null))"
      done ;;
    dbw)  # session 7: decode-graph GPU tests, then 7B / 1B decoding with the step alone and its share of the copy bandwidth
      log "GPU tests: decode graphs"
      timeout ${DBW_TEST_LIMIT:-150} python3 -m pytest -o addopts= -q -s -p no:cacheprovider -m gpu tests/model/test_decode_graph.py > "$OUT/dbwtests.txt" 2>&1
      grep -E "passed|failed|Error|assert" "$OUT/dbwtests.txt" | tail -n 10 | tee -a "$OUT/log.txt"
      for m in 7B 1B; do
        log "decode $m"; timeout ${DECODE_LIMIT:-180} python3 -m tnlora.cli bench --decode --model $m 2>&1 | grep -v Warning | tee -a "$OUT/log.txt" | grep -E "^\| [0-9]|copy bandwidth" | tee -a "$OUT/table.txt"
      done ;;
    e2e)  # session 7: `tnlora train examples/huanhuan_7b_lora_fast.yaml` end to end on huanhuan.json, random 7B weights
      # .whl/e2e holds the official 7B config / tokenizer files and huanhuan.json (from ../shared, not in git)
      log "e2e train 7B ${E2E_ARGS:-}"; timeout ${E2E_LIMIT:-480} python3 benchmarks/e2e_train.py --recipe examples/huanhuan_7b_lora_fast.yaml --model_files .whl/e2e --data .whl/e2e/huanhuan.json --work /tmp/e2e --keep_checkpoint ${E2E_CAP:+--gpu_memory_gib $E2E_CAP} -- ${E2E_ARGS:-} > "$OUT/e2e${E2E_TAG:-}.txt" 2>&1
      grep -vE "Warning|warn|it/s\]" "$OUT/e2e${E2E_TAG:-}.txt" | grep -v "^ *\(File\|torch\._dynamo\)" | tail -n ${E2E_TAIL:-25} | cut -c1-240 | tee -a "$OUT/log.txt" "$OUT/table.txt" ;;
    norms)  # session 8: the Triton training norms (norm_kernel): GPU tests, then eager layers with torch / triton norms
      log "GPU tests: training norms"
      timeout ${NORM_TEST_LIMIT:-200} python3 -m pytest -o addopts= -q -s -p no:cacheprovider tests/model/test_norm_kernel.py \
        tests/train/test_norm_kernel_gpu.py ${NORM_TESTS:-} > "$OUT/normtests.txt" 2>&1
      grep -E "norm_kernel|compile,|passed|failed|Error|assert" "$OUT/normtests.txt" | tail -n 16 | tee -a "$OUT/log.txt"
      for m in ${NORM_MODELS:-7B}; do for kern in ${NORM_KERNELS:-torch triton}; do
        BENCH_TIMEOUT=260 bench --model $m --train_defaults --no-torch_compile --norm_kernel $kern --gpu_memory_gib ${CARD_GIB:-79.6} --steps ${NORM_STEPS:-5} --name "$m huanhuan, defaults, eager layers, norms $kern, ${CARD_GIB:-79.6} GiB ($(cat COMMIT 2>/dev/null))"
        grep "^resolved:" "$OUT/log.txt" | tail -n 1 | tee -a "$OUT/table.txt"
      done; done ;;
    dadapter)  # session 8: 7B decoding with a random LoRA adapter kept as peft layers / merged (chat's default)
      for a in unmerged merged; do log "decode 7B, adapter $a"
        timeout ${DECODE_LIMIT:-120} python3 -m tnlora.cli bench --decode --model 7B --decode_adapter $a 2>&1 | grep -v Warning | tee -a "$OUT/log.txt" | grep -E "^\| [0-9]|^\| 7B|copy bandwidth" | tee -a "$OUT/table.txt"
      done ;;
    decode)
      log "decode"; timeout 100 python3 -m tnlora.cli bench --decode --model 1B 2>&1 | grep -v Warning | tee -a "$OUT/log.txt" | tail -n 3 | tee -a "$OUT/table.txt"
      timeout 120 python3 -m tnlora.cli bench --decode --model 7B 2>&1 | grep -v Warning | tee -a "$OUT/log.txt" | tail -n 3 | tee -a "$OUT/table.txt" ;;
    decodek)  # the fused Triton recurrent step (decode_kernel triton) against the in-place torch step, CUDA graphs
      log "recurrent kernel GPU tests"
      timeout ${KTEST_LIMIT:-90} python3 -m pytest -v -s -x tests/model/test_recurrent_kernel.py -p no:cacheprovider > "$OUT/ktest.txt" 2>&1
      grep -E "PASS|FAIL|SKIP|Error|error" "$OUT/ktest.txt" | tail -n 30 | tee -a "$OUT/log.txt"
      for m in ${DECODE_MODELS:-7B 1B}; do for kern in torch triton; do
        log "decode $m, decode_kernel $kern"
        timeout ${DECODE_LIMIT:-120} python3 -m tnlora.cli bench --decode --model $m --decode_kernel $kern 2>&1 | grep -v Warning | tee -a "$OUT/log.txt" | tail -n 3 | tee -a "$OUT/table.txt"
      done; done ;;
  esac
done
pack  # extract $OUT/tcache.tgz into .tcache here and carry it (or replace benchmarks/fla_autotune_sm90.tgz)
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader | tee -a "$OUT/log.txt"
echo; cat "$OUT/table.txt" 2>/dev/null
