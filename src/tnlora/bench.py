"""`tnlora bench`: real LoRA training steps (and decoding) on a preset with random weights.

Training goes through the same code as ``tnlora train``: the run config, ``apply_finetuning`` (peft LoRA),
the data layer's packing / padding collators wrapped by ``TrainingCollator``, the model's chunked loss and the
transformers ``Trainer`` built by ``build_trainer`` (its optimizer, scheduler, accumulation). Only the
examples are synthetic: random token ids whose prompt / response lengths come from a lengths file (by
default ``benchmarks/huanhuan_lengths.json``, measured on huanhuan.json under the chatml template) or a
fixed long length. Prints one table row per configuration: real (non-pad) tokens/s, MFU, peak memory.

MFU = 4 · N · tokens/s ÷ peak bf16 FLOP/s, N the parameter count (tied embedding once): the forward plus the
input-gradient half of the backward; LoRA skips the frozen weights' gradients.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import random
import subprocess
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tnlora.errors import ConfigError

if TYPE_CHECKING:
    import torch  # imported inside the functions: `tnlora bench --help` must not load it

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM (datasheet), the MFU denominator of issue 5


@dataclass
class BenchResult:
    """One configuration's figures."""

    name: str
    tokens_per_s: float
    mfu: float
    peak_gib: float
    step_s: float
    loss: float


def environment_line() -> str:
    """Card, versions and commit, for the table header."""
    import torch
    import transformers

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "-"
    try:
        import fla

        fla_v = getattr(fla, "__version__", "?")
    except ImportError:
        fla_v = "-"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = "?"
    return (
        f"card {card} | torch {torch.__version__} | triton {triton_v} | transformers {transformers.__version__}"
        f" | fla-core {fla_v} | commit {commit or '?'}"
    )


def synthetic_examples(
    lengths: list[tuple[int, int]], vocab_size: int, seed: int = 0
) -> list[Any]:
    """Random-id examples with the given (prompt, learned) token counts; prompts masked like real data."""
    import torch

    from tnlora.data.encode import IGNORE_INDEX, EncodedExample

    gen = torch.Generator().manual_seed(seed)
    total = sum(p + learned for p, learned in lengths)
    pool = torch.randint(3, vocab_size, (total,), generator=gen).tolist()
    out, start = [], 0
    for prompt, learned in lengths:
        ids = pool[start : start + prompt + learned]
        start += prompt + learned
        out.append(EncodedExample(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def read_lengths(path: str | Path) -> list[tuple[int, int]]:
    """(prompt, learned) pairs from a lengths file written from the data pipeline's statistics."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))["rows"]
    return [(int(p), int(learned)) for p, learned in rows]


def build_model(preset: str, attention_impl: str, device: str) -> torch.nn.Module:
    """A preset with random weights built directly on ``device``, in bf16 on CUDA (no fp32 CPU copy of a
    7B), fp32 on the CPU."""
    import torch

    from tnlora.model import TransnormerForCausalLM, config_from_preset
    from tnlora.train.run import set_attention_impl

    config = config_from_preset(preset)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = TransnormerForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(dtype)
    set_attention_impl(model, attention_impl)
    model.config.use_cache = False
    return model


class _StepTimer:
    """A TrainerCallback that times the optimizer steps after a warm-up.

    It syncs only where the timed region starts and ends: a sync after every step would stop the host from
    running ahead into the next step, as it does in ``tnlora train``.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.tokens0, self.steps, self.t1, self.tokens1 = warmup, 0.0, 0, 0, 0.0, 0
        # Python's garbage collections in the timed steps: generation -> (count, seconds).
        self.gc: dict[int, list[float]] = {}
        self._gc_start = 0.0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            entry = self.gc.setdefault(info["generation"], [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - self._gc_start

    def gc_report(self) -> str:
        """The collections of the timed steps, by generation."""
        parts = [f"gen {g}: {int(n)} ({1e3 * t:.1f} ms)" for g, (n, t) in sorted(self.gc.items())]
        return "python gc in the timed steps: " + (", ".join(parts) if parts else "none")

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if state.global_step not in (self.warmup, state.max_steps):
            return control
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step == self.warmup:
            self.t0, self.tokens0 = time.perf_counter(), int(state.num_input_tokens_seen)
            if state.global_step < state.max_steps:  # no timed steps, nothing to watch (and no end to unhook it)
                gc.callbacks.append(self._on_gc)
        elif state.global_step > self.warmup:
            self.t1, self.tokens1, self.steps = time.perf_counter(), int(state.num_input_tokens_seen), (
                state.global_step - self.warmup
            )
            if self._on_gc in gc.callbacks:
                gc.callbacks.remove(self._on_gc)
        return control

    # The Trainer calls every hook by name; the rest do nothing.
    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def _profile_region() -> torch.profiler.profile:
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def _print_profile(prof: torch.profiler.profile, trace: str = "") -> None:
    """The top kernels (device time when there is a GPU) of a finished profile; the timeline to ``trace``."""
    import torch

    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
    if trace:
        prof.export_chrome_trace(trace)
        print(f"timeline: {trace} (chrome://tracing, or benchmarks/trace_gaps.py)")


class _Profiler:
    """A TrainerCallback that profiles the optimizer step after the warm-up and prints its top kernels."""

    def __init__(self, warmup: int, trace: str = "") -> None:
        self.warmup, self.prof, self.trace = warmup, None, trace

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.prof = _profile_region()
            self.prof.__enter__()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if self.prof is not None and state.global_step == self.warmup + 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            _print_profile(self.prof, self.trace)
            self.prof = None
        return control

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def train_bench(args: argparse.Namespace, lengths: list[tuple[int, int]], name: str) -> BenchResult:
    """Real LoRA training steps through ``build_trainer``; figures from the timed steps after warm-up."""
    import tempfile

    import torch

    from tnlora.config import RunConfig
    from tnlora.model.tokenizer import ByteTokenizer
    from tnlora.train.lora import count_parameters
    from tnlora.train.run import (
        build_trainer,
        bundle_from_examples,
        prepare_for_training,
        resolve_for_this_machine,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.cuda.empty_cache() if device == "cuda" else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = args.warmup + args.steps
    if args.seq_len:
        cutoff = args.seq_len
    elif args.train_defaults:
        cutoff = RunConfig.cutoff_len  # tnlora train's default, whatever the data's longest example
    else:
        cutoff = max(p + learned for p, learned in lengths)
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(
            model_name_or_path=args.model,
            output_dir=out,
            overwrite_output_dir=True,
            finetuning_type="lora",
            lora_rank=args.lora_rank,
            lora_alpha=4 * args.lora_rank,
            lora_dropout=args.lora_dropout,
            cutoff_len=cutoff,
            packing=args.packing,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            learning_rate=1e-4,
            max_steps=steps,
            bf16=device == "cuda",
            gradient_checkpointing=args.gradient_checkpointing,
            use_unsloth_gc=args.use_unsloth_gc,
            torch_compile=args.torch_compile,
            attention_impl=args.attn,
            logging_steps=10**6,
            save_steps=10**6,
            report_to="none",
            seed=0,
        )
        # Explicit values above stay; the rules between keys (use_unsloth_gc → checkpointing) apply as in train,
        # and with --train_defaults the values left open are picked as train's preflight picks them on this GPU
        # (the run's length unknown, so compiled on a GPU).
        cfg = resolve_for_this_machine(cfg)
        per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        print(f"resolved: {cfg.per_device_train_batch_size} x {cfg.cutoff_len} tokens a micro-batch, "
              f"{cfg.gradient_accumulation_steps} a step, packing {cfg.packing}, "
              f"gradient_checkpointing {cfg.gradient_checkpointing}, torch_compile {cfg.torch_compile}", flush=True)
        model = build_model(args.model, args.attn, device)
        model.config.norm_kernel = args.norm_kernel
        n_params = count_parameters(model)[1]  # the tied embedding once
        # As `tnlora train` does (fp32 adapter weights, compiled layers); warm-up steps absorb compile time.
        model = prepare_for_training(model, cfg)
        # Enough examples for every timed step; packing packs them into cutoff-length rows first.
        mean_len = sum(p + learned for p, learned in lengths) / len(lengths)
        need = steps * per_step * (math.ceil(1.1 * cutoff / mean_len) if args.packing else 1)
        rng = random.Random(0)
        chosen = [lengths[rng.randrange(len(lengths))] for _ in range(need)]
        examples = synthetic_examples(chosen, model.config.vocab_size)
        data = bundle_from_examples(cfg, examples, [], pad_token_id=0)
        timer = _StepTimer(args.warmup)
        audit = SyncAudit(args.warmup) if args.sync_audit else None
        callbacks: list[Any] = [audit, timer] if audit else [timer]  # the audit closes before the timer syncs
        if args.profile:
            callbacks.append(_Profiler(args.warmup, args.trace))
        trainer = build_trainer(cfg, model, ByteTokenizer(), data, callbacks=callbacks)
        trainer.train()
        if audit:
            print(audit.report())
        print(timer.gc_report(), flush=True)
        loss = float(trainer.state.log_history[-1].get("train_loss", math.nan))
    seconds = timer.t1 - timer.t0
    tokens = timer.tokens1 - timer.tokens0
    tps = tokens / seconds if seconds > 0 else math.nan
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else math.nan
    del trainer, model
    return BenchResult(name, tps, 4 * n_params * tps / H100_BF16_FLOPS, peak, seconds / max(1, timer.steps), loss)


def decode_cuda_graphs(args: argparse.Namespace) -> bool:
    """``--cuda_graphs`` as given, else on exactly when a GPU is present (the fast default)."""
    import torch

    return torch.cuda.is_available() if args.cuda_graphs is None else args.cuda_graphs


class DecodeResult(NamedTuple):
    """One batch size's decoding figures."""

    tokens_per_s: float  # the whole generate() call, prefill included, over the batch
    ms_per_step: float  # the whole call ÷ new tokens
    step_ms: float  # one decode step alone: (call − a 1-token call) ÷ (new tokens − 1)


def with_decode_adapter(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """``model`` with ``--decode_adapter``: a random LoRA adapter of rank ``--lora_rank`` on every linear
    layer, kept as peft layers ("unmerged", fp32 adapter weights as a loaded adapter has them) or folded into
    the base weights ("merged", as ``tnlora chat`` / ``generate`` load one by default); "none": as it is."""
    import torch

    if args.decode_adapter == "none":
        return model
    from tnlora.config import RunConfig
    from tnlora.train.lora import apply_finetuning

    cfg = RunConfig(model_name_or_path=args.model, dataset="d", output_dir="o", lora_rank=args.lora_rank,
                    lora_alpha=2 * args.lora_rank)  # fmt: skip
    net = apply_finetuning(model, cfg)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # peft's zero B would merge to nothing (the same kernels either way)
    return net.merge_and_unload() if args.decode_adapter == "merged" else net


def decode_step_bytes(model: torch.nn.Module, batch: int) -> int:
    """The bytes one decode step has to move at least: every layer's weights, the final norm's and the LM
    head's read once (the head's although tied to the embedding, of which B rows are read), and each layer's
    recurrent state read and written."""
    from tnlora.model.decode_graph import state_layout

    def size(params: Any) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # an unmerged adapter's
    core = model.model
    weights = size(core.layers.parameters()) + size(core.final_norm.parameters()) + size(model.lm_head.parameters())
    rows = batch * core.embed_tokens.weight[0].numel() * core.embed_tokens.weight.element_size()
    states = 0
    for layer in core.layers:
        shape, dtype = state_layout(layer.token_mixer, batch)
        states += 2 * math.prod(shape) * dtype.itemsize
    return weights + rows + states


def copy_bandwidth(size_bytes: int = 2**30, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write), the median of ``repeats``: what a step bound by
    memory traffic can reach at most, measured rather than the datasheet's."""
    import torch

    src = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * size_bytes / sorted(times)[len(times) // 2]


def decode_bench(args: argparse.Namespace, batch: int) -> DecodeResult:
    """Greedy decoding through ``generate()``: the whole call, and one decode step alone.

    With CUDA graphs the untimed warm-up call captures the step graph for this batch size; the timed call
    replays it (as every later ``generate()`` of a chat or a batch job would). The step alone is the timed
    call less a 1-token call (the prefill and generate()'s set-up), over the remaining steps.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = getattr(args, "_decode_model", None)
    if model is None:
        model = with_decode_adapter(build_model(args.model, args.attn, device), args).eval()
        model.config.use_cache = True
        args._decode_model = model
    model.config.decode_cuda_graphs = decode_cuda_graphs(args)
    model.config.decode_kernel = args.decode_kernel
    prompt = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), device=device)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def timed(new_tokens: int, region: Any = None) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with region or contextlib.nullcontext():
            model.generate(prompt, **{**kwargs, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens})
            if device == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.inference_mode():
        timed(4)  # captures the step graph (with CUDA graphs)
        prof = _profile_region() if args.profile else None
        seconds = timed(args.new_tokens, prof)
        first = sorted(timed(1) for _ in range(3))[1]
    if prof is not None:
        print(f"batch {batch}: {1e3 * seconds / args.new_tokens:.2f} ms/step (profiled)")
        _print_profile(prof, args.trace)
    step = (seconds - first) / max(1, args.new_tokens - 1)
    return DecodeResult(batch * args.new_tokens / seconds, 1e3 * seconds / args.new_tokens, 1e3 * step)


class SyncAudit:
    """A TrainerCallback that lists every operation that makes the host wait for the GPU (PyTorch's sync debug
    mode) from the end of warm-up step ``warmup`` to the end of the last step, by the Python line calling it
    (``sites``) and the first frame outside torch on the way there (``callers``: who called torch's own
    function, such as ``torch.cuda.synchronize``).

    The window closes at the last step's end, before the Trainer's final logging and saving; register it
    ahead of callbacks that synchronise on purpose (the step timer)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.sites, self.callers, self.steps = warmup, Counter(), Counter(), 0
        self._record: warnings.catch_warnings | None = None

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if state.global_step == self.warmup and torch.cuda.is_available():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # switching the mode on counts as a sync itself (torch 2.11)
                torch.cuda.set_sync_debug_mode("warn")
            self._record = warnings.catch_warnings()
            self._record.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._show
        elif self._record is not None:
            self.steps += 1
            if state.global_step >= state.max_steps:
                self._close()
        return control

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        import torch

        if "synchroniz" not in str(message):
            return
        self.sites[f"{filename}:{lineno}"] += 1
        torch_dir = str(Path(torch.__file__).parent)
        for frame in reversed(traceback.extract_stack()[:-1]):
            if not frame.filename.startswith(torch_dir) and frame.filename != warnings.__file__:
                self.callers[f"{frame.filename}:{frame.lineno}"] += 1
                break

    def _close(self) -> None:
        import torch

        torch.cuda.set_sync_debug_mode("default")
        self._record.__exit__(None, None, None)
        self._record = None

    def report(self) -> str:
        lines = [f"host syncs in {self.steps} optimizer steps after the warm-up: {sum(self.sites.values())}"]
        lines += [f"  {n:5d}  {site}" for site, n in self.sites.most_common()]
        lines += ["  first callers outside torch:"] + [f"  {n:5d}  {site}" for site, n in self.callers.most_common()]
        return "\n".join(lines)

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tnlora bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="1B", help="preset: tiny, 385M, 1B, 7B")
    parser.add_argument("--lengths", default="benchmarks/huanhuan_lengths.json",
                        help="lengths file (prompt/learned per record) for data-shaped runs")
    parser.add_argument("--seq_len", type=int, default=0,
                        help="one fixed-length sequence per row instead of the lengths file (0: use the file)")
    parser.add_argument("--pack_len", type=int, default=0, help="packed row length for data-shaped runs")
    parser.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="default: off (with --train_defaults: as tnlora train picks)")
    parser.add_argument("--use_unsloth_gc", action=argparse.BooleanOptionalAction, default=False,
                        help="checkpointing with the layer inputs offloaded to CPU memory (use_unsloth_gc: true)")
    parser.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile each decoder layer (torch_compile: true of a run config); default: off "
                             "(with --train_defaults: as tnlora train picks)")
    parser.add_argument("--attn", default="auto", choices=["auto", "fla", "chunked"])
    parser.add_argument("--batch_size", type=int, default=None,
                        help="rows a micro-batch; default 4 (with --train_defaults: as tnlora train picks)")
    parser.add_argument("--grad_accum", type=int, default=None,
                        help="micro-batches a step; default 4 (with --train_defaults: tnlora train's, 1)")
    parser.add_argument("--train_defaults", action="store_true",
                        help="leave micro-batch, accumulation, checkpointing, compile and (data-shaped) cutoff_len "
                             "unset unless given, so they resolve as `tnlora train` resolves them on this card")
    parser.add_argument("--gpu_memory_gib", type=float, default=0.0,
                        help="let this process allocate at most this much GPU memory (the card's size for the "
                             "defaults too): stands in for a smaller card, e.g. 79.6 for an 80 GB H100")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--decode", action="store_true", help="measure generate() decoding instead of training")
    parser.add_argument("--decode_batch", default="1,32")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--cuda_graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="decode steps as replayed CUDA graphs (config decode_cuda_graphs; default: on with CUDA)")
    parser.add_argument("--decode_kernel", default="auto", choices=["auto", "torch", "triton"],
                        help="recurrence of the CUDA-graph decode step (config decode_kernel): in-place torch ops, "
                             "the fused Triton kernel, or auto (triton when it imports)")
    parser.add_argument("--decode_adapter", default="none", choices=["none", "unmerged", "merged"],
                        help="decode with a random LoRA adapter of rank --lora_rank on every linear layer: kept as "
                             "peft layers, or merged into the weights (tnlora chat / generate's default)")
    parser.add_argument("--norm_kernel", default="auto", choices=["auto", "torch", "triton"],
                        help="norms of the eager training layers (config norm_kernel): PyTorch ops, the Triton "
                             "forward and backward kernels, or auto (triton on CUDA when it imports)")
    parser.add_argument("--name", default="", help="row label")
    parser.add_argument("--profile", action="store_true",
                        help="print the top CUDA kernels of one timed training step (or generate() call)")
    parser.add_argument("--sync_audit", action="store_true",
                        help="list the operations that make the host wait for the GPU in the timed steps")
    parser.add_argument("--trace", default="",
                        help="profile, and also write the timeline (Chrome trace JSON) here")
    args = parser.parse_args(argv)
    args.profile = args.profile or bool(args.trace)
    if not args.train_defaults:  # the bench's own fixed defaults
        for key, value in (("batch_size", 4), ("grad_accum", 4), ("gradient_checkpointing", False),
                           ("torch_compile", False)):
            if getattr(args, key) is None:
                setattr(args, key, value)
    elif args.grad_accum is None:
        args.grad_accum = 1  # RunConfig's default
    return args


def cap_gpu_memory(gib: float) -> str:
    """Let this process allocate at most ``gib`` GiB of the current GPU; the config line's note."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if not 0 < gib * 2**30 <= total:
        raise ConfigError(f"--gpu_memory_gib: {gib:g} is not within this card's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total)
    return f" gpu_memory={gib:g}GiB of {total / 2**30:.1f}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tnlora bench``."""
    args = parse_args(argv)  # before torch loads: --help answers at once
    import torch

    print(environment_line(), flush=True)
    cap = ""
    if args.gpu_memory_gib:
        if not torch.cuda.is_available():
            raise ConfigError("--gpu_memory_gib needs a CUDA GPU")
        cap = cap_gpu_memory(args.gpu_memory_gib)
    if args.decode:
        graphs = decode_cuda_graphs(args) and torch.cuda.is_available()  # graphs need CUDA
        if args.decode_kernel == "triton" and not graphs:
            # Only the static CUDA-graph step reads decode_kernel: an eager run would time the torch step.
            raise ConfigError("--decode_kernel triton needs CUDA-graph decoding (a GPU and --cuda_graphs)")
        from tnlora.model.decode_graph import resolve_decode_kernel

        # What the static step runs ("auto" resolved); eager decoding (no graphs) never reads it.
        kernel = resolve_decode_kernel(args.decode_kernel, "cuda") if graphs else "torch"
        print(f"config: {args.model} decode cuda_graphs={graphs} decode_kernel={args.decode_kernel} ({kernel}) "
              f"prompt={args.prompt_len} new_tokens={args.new_tokens} adapter={args.decode_adapter}{cap}", flush=True)
        copy = copy_bandwidth() if torch.cuda.is_available() else math.nan
        if torch.cuda.is_available():
            print(f"copy bandwidth: {copy / 1e9:,.0f} GB/s (device-to-device copies of 1 GiB, read + write)")
        print("| model | cuda graphs | decode kernel | batch | tokens/s | ms/step | decode step ms | step GB/s | "
              "of copy bandwidth |\n|---|---|---|---|---|---|---|---|---|")
        for batch in [int(b) for b in args.decode_batch.split(",")]:
            r = decode_bench(args, batch)
            rate = decode_step_bytes(args._decode_model, batch) / (r.step_ms / 1e3)
            share = f"{100 * rate / copy:.0f}%" if math.isfinite(copy) else "–"
            print(f"| {args.model} | {graphs} | {kernel} | {batch} | {r.tokens_per_s:,.0f} | {r.ms_per_step:.2f} | "
                  f"{r.step_ms:.2f} | {rate / 1e9:,.0f} | {share} |", flush=True)
        return 0
    if args.seq_len:
        lengths = [(0, args.seq_len)]
        args.packing = False
    else:
        lengths = read_lengths(args.lengths)
        if args.packing and args.pack_len:
            args.seq_len = args.pack_len
    settings = (
        f"pack={args.packing}{f' pack_len={args.seq_len}' if args.packing and args.seq_len else ''}"
        f" attn={args.attn} ckpt={args.gradient_checkpointing} offload={args.use_unsloth_gc} compile={args.torch_compile}"
        f" b={args.batch_size}x{args.grad_accum} norms={args.norm_kernel}"
        f"{' train_defaults' if args.train_defaults else ''}{cap}"
    )
    # Printed even under a custom --name, so every table row can be traced to its settings.
    print(f"config: {args.model} {settings}", flush=True)
    name = args.name or (
        f"{args.model} {'len ' + str(lengths[0][1]) if lengths[0][0] == 0 and len(lengths) == 1 else 'data-shaped'}"
        f" {settings}"
    )
    r = train_bench(args, lengths, name)
    print("| run | tokens/s | MFU | peak GiB | s/step | loss |\n|---|---|---|---|---|---|")
    print(f"| {r.name} | {r.tokens_per_s:,.0f} | {100 * r.mfu:.1f}% | {r.peak_gib:.1f} | {r.step_s:.3f} | {r.loss:.3f} |",
          flush=True)
    return 0
