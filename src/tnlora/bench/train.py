"""`tnlora bench train`: real LoRA training steps on a preset with random weights, timed after a warm-up.

Training goes through the same code as ``tnlora train``: the run config (any key of it can be given, as to
``tnlora train``, and the keys left open resolve as ``tnlora train`` resolves them on this machine, the run's
length taken as unknown), ``prepare_for_training`` (peft LoRA, fp32 adapter weights, compiled layers), the data
layer's collators and the ``Trainer`` built by ``build_trainer``. Only the examples are synthetic: random token
ids whose prompt / response lengths come from a lengths file (by default the profile of huanhuan.json under
the chatml template shipped with tnlora) or one fixed long sequence (``--seq_len``). One table row: real
(non-pad) tokens/s, MFU, peak memory, seconds a step, final loss.

MFU = 4 · N · tokens/s ÷ 989 TFLOP/s, N the parameter count (tied embedding once): the forward plus the
input-gradient half of the backward; LoRA skips the frozen weights' gradients.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from tnlora.bench.common import (
    H100_BF16_FLOPS,
    cap_gpu_memory,
    environment_line,
    print_profile,
    profile_region,
    random_model,
)
from tnlora.bench.options import train_args as parse_args

DEFAULT_LENGTHS = "huanhuan_lengths.json"  # package data: (prompt, learned) tokens of huanhuan.json's records


@dataclass
class TrainBenchResult:
    """One configuration's figures."""

    name: str
    tokens_per_s: float
    mfu: float
    peak_gib: float
    step_s: float
    loss: float

    def row(self) -> str:
        return (f"| {self.name} | {self.tokens_per_s:,.0f} | {100 * self.mfu:.1f}% | {self.peak_gib:.1f} | "
                f"{self.step_s:.3f} | {self.loss:.3f} |")  # fmt: skip


def read_lengths(path: str | Path | None) -> list[tuple[int, int]]:
    """(prompt, learned) token pairs from a lengths file (None: the huanhuan.json profile shipped with tnlora)."""
    text = (
        resources.files("tnlora.resources").joinpath(DEFAULT_LENGTHS).read_text(encoding="utf-8")
        if path is None
        else Path(path).read_text(encoding="utf-8")
    )
    return [(int(p), int(learned)) for p, learned in json.loads(text)["rows"]]


def synthetic_examples(lengths: list[tuple[int, int]], vocab_size: int, seed: int = 0) -> list[Any]:
    """Random-id examples with the given (prompt, learned) token counts; prompts masked like real data."""
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


class StepTimer(TrainerCallback):
    """Times the optimizer steps after ``warmup`` ones, and Python's garbage collections within them.

    It syncs only where the timed region starts and ends: a sync after every step would stop the host from
    running ahead into the next step, as it does in ``tnlora train``.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.tokens0, self.steps, self.t1, self.tokens1 = warmup, 0.0, 0, 0, 0.0, 0
        self.gc: dict[int, list[float]] = {}  # generation -> [count, seconds]
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

    def on_train_begin(self, args, state, control, **kwargs):
        if self.warmup == 0:  # no warm-up step ends before the timed ones: they start here
            self._start(state)
        return control

    def _start(self, state) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t0, self.tokens0 = time.perf_counter(), int(state.num_input_tokens_seen)
        if state.global_step < state.max_steps:  # no timed steps, nothing to watch (and no end to unhook it)
            gc.callbacks.append(self._on_gc)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step not in (self.warmup, state.max_steps):
            return control
        if state.global_step == self.warmup:
            self._start(state)
        elif state.global_step > self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t1, self.tokens1 = time.perf_counter(), int(state.num_input_tokens_seen)
            self.steps = state.global_step - self.warmup
            if self._on_gc in gc.callbacks:
                gc.callbacks.remove(self._on_gc)
        return control


class StepProfiler(TrainerCallback):
    """Profiles the last optimizer step and prints its top kernels (the timeline to ``trace``).

    The profiler starts one step earlier without recording it: the recorded step's first operation on the
    autograd engine's thread (the loss's ``DivBackward0``, inside which a 1B trace started with the recorded step
    showed 2.7 ms of idle device) then runs under a profiler already set up. With two or more timed steps the
    recorded one is not the first: that one starts after the step timer's synchronize, so the host's batch
    preparation and the forward's first launches show as idle device time that later steps overlap with the
    device's work on the step before."""

    def __init__(self, trace: str = "") -> None:
        self.prof, self.trace = None, trace

    def on_step_begin(self, args, state, control, **kwargs):
        # global_step counts the steps finished: the step beginning now ends as global_step + 1.
        lead = min(state.max_steps - 1, 1)
        if state.global_step == state.max_steps - 1 - lead and self.prof is None:
            self.prof = profile_region(lead)
            self.prof.__enter__()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and state.global_step < state.max_steps:
            self.prof.step()  # the lead step ends: record from here
        elif self.prof is not None and state.global_step == state.max_steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            print_profile(self.prof, self.trace)
            self.prof = None
        return control


class SyncAudit(TrainerCallback):
    """Lists every operation that makes the host wait for the GPU (PyTorch's sync debug mode) from the end of
    warm-up step ``warmup`` to the end of the last step, by the Python line calling it (``sites``) and the first
    frame outside torch on the way there (``callers``: who called torch's own function, such as
    ``torch.cuda.synchronize``).

    The window closes at the last step's end, before the Trainer's final logging and saving; register it
    ahead of callbacks that synchronise on purpose (the step timer)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.sites, self.callers, self.steps = warmup, Counter(), Counter(), 0
        self._record: warnings.catch_warnings | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup and torch.cuda.is_available():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # switching the mode on is reported as a sync itself
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
        if "synchroniz" not in str(message):
            return
        self.sites[f"{filename}:{lineno}"] += 1
        torch_dir = str(Path(torch.__file__).parent)
        for frame in reversed(traceback.extract_stack()[:-1]):
            if not frame.filename.startswith(torch_dir) and frame.filename != warnings.__file__:
                self.callers[f"{frame.filename}:{frame.lineno}"] += 1
                break

    def _close(self) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._record.__exit__(None, None, None)
        self._record = None

    def report(self) -> str:
        lines = [f"host syncs in {self.steps} optimizer steps after the warm-up: {sum(self.sites.values())}"]
        lines += [f"  {n:5d}  {site}" for site, n in self.sites.most_common()]
        lines += ["  first callers outside torch:"] + [f"  {n:5d}  {site}" for site, n in self.callers.most_common()]
        return "\n".join(lines)


def run_config(args: argparse.Namespace, keys: dict[str, Any], lengths: list[tuple[int, int]], output_dir: str):
    """The run config of the bench: its fixed keys, the given ones, the rest resolved for this machine."""
    from tnlora.config import build_config
    from tnlora.train.run import resolve_for_this_machine

    cuda = torch.cuda.is_available()
    values: dict[str, Any] = {
        "model_name_or_path": args.model,
        "dataset": "synthetic",
        "output_dir": output_dir,
        "overwrite_output_dir": True,
        "learning_rate": 1e-4,
        "max_steps": args.warmup + args.steps,
        "logging_steps": 10**6,
        "save_steps": 10**6,
        "report_to": "none",
        "seed": 0,
        "bf16": True if cuda else None,  # None: resolved (fp32 on the CPU), so the CPU refusals come first
    }
    if args.seq_len:
        values.update(cutoff_len=args.seq_len, packing=False)
    fixed = set(values) - {"bf16"}
    for key, value in keys.items():
        if key in fixed:
            from tnlora.errors import ConfigError

            raise ConfigError(f"--{key}: set by the bench (use its own options)")
        values[key] = value
    if args.seq_len:
        # one sequence a row means one row a micro-batch unless given: unpacked rows would otherwise default to
        # the padded batch (8 rows) and the memory fit would then only add checkpointing
        values.setdefault("per_device_train_batch_size", 1)
    cfg = build_config({k: (v, f"--{k}") for k, v in values.items()})
    return resolve_for_this_machine(cfg)


def memory_note(cfg) -> str:
    """The memory estimate the defaults went by, beside the peak the row measures (on a GPU)."""
    if not torch.cuda.is_available():
        return ""
    from tnlora.train.memory import MemoryFit, device_memory

    fit = MemoryFit(device_memory())
    return f", memory {fit.describe(cfg)}"


def train_bench(args: argparse.Namespace, keys: dict[str, Any], name: str) -> TrainBenchResult:
    """Real LoRA training steps through ``build_trainer``; figures from the timed steps after the warm-up."""
    from tnlora.model.tokenizer import ByteTokenizer
    from tnlora.train.lora_fused import FusedLoraLinear
    from tnlora.train.memory import parameter_count
    from tnlora.train.run import bundle_from_examples, prepare_for_training, quantization_of
    from tnlora.train.trainer import build_trainer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    lengths = [(0, args.seq_len)] if args.seq_len else read_lengths(args.lengths)
    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(args, keys, lengths, out)
        per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        regions = f"checkpoint_regions {cfg.checkpoint_regions}, " if cfg.checkpoint_regions == "mixers" else ""
        regions += f"uncheckpointed_layers {cfg.uncheckpointed_layers}, " if cfg.uncheckpointed_layers else ""
        print(f"resolved: {cfg.per_device_train_batch_size} x {cfg.cutoff_len} tokens a micro-batch, "
              f"{cfg.gradient_accumulation_steps} a step, packing {cfg.packing}, "
              f"gradient_checkpointing {cfg.gradient_checkpointing}, use_unsloth_gc {cfg.use_unsloth_gc}, "
              f"{regions}"
              f"torch_compile {cfg.torch_compile}, attention {cfg.attention_impl}, "
              f"quantization_bit {cfg.quantization_bit}{', fp8' if cfg.fp8 else ''}{memory_note(cfg)}",
              flush=True)  # fmt: skip
        model = random_model(args.model, cfg.attention_impl, device, quantization=quantization_of(cfg))
        model.config.norm_kernel, model.config.loss_kernel = args.norm_kernel, args.loss_kernel
        model.config.act_kernel = args.act_kernel
        model.config.trim_last_layer = args.trim_last_layer
        model.select_kernels()
        n_params = parameter_count(model.config)  # the tied embedding once, 4-bit weights at their full count
        model = prepare_for_training(model, cfg)  # as `tnlora train` does; warm-up steps absorb compile time
        for module in model.modules():
            if isinstance(module, FusedLoraLinear):
                module.compiled_op = args.lora_compiled_op  # read when the layers compile, at the first step
                module.paired = args.lora_pair
                module.grad_kernel = args.lora_grad_kernel
                module.dropout_kernel = args.lora_dropout_kernel
        # Enough examples for every timed step; packing packs them into cutoff-length rows first.
        kept = [pair for pair in lengths if sum(pair) <= cfg.cutoff_len] or lengths
        mean_len = sum(p + learned for p, learned in kept) / len(kept)
        need = (args.warmup + args.steps) * per_step * (math.ceil(1.1 * cfg.cutoff_len / mean_len) if cfg.packing else 1)
        rng = random.Random(0)
        examples = synthetic_examples([kept[rng.randrange(len(kept))] for _ in range(need)], model.config.vocab_size)
        data = bundle_from_examples(cfg, examples, [], pad_token_id=0)
        timer = StepTimer(args.warmup)
        audit = SyncAudit(args.warmup) if args.sync_audit else None
        callbacks: list[Any] = [audit, timer] if audit else [timer]  # the audit closes before the timer syncs
        if args.profile or args.trace:
            callbacks.append(StepProfiler(args.trace))
        trainer = build_trainer(cfg, model, ByteTokenizer(), data, callbacks=callbacks)
        trainer.train()
        if audit:
            print(audit.report())
        print(timer.gc_report(), flush=True)
        loss = float(trainer.state.log_history[-1].get("train_loss", math.nan))
    seconds = timer.t1 - timer.t0
    tps = (timer.tokens1 - timer.tokens0) / seconds if seconds > 0 else math.nan
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else math.nan
    del trainer, model
    return TrainBenchResult(name, tps, 4 * n_params * tps / H100_BF16_FLOPS, peak, seconds / max(1, timer.steps), loss)


def main(argv: list[str]) -> int:
    """Entry point of ``tnlora bench train``."""
    return run(*parse_args(argv))


def run(args: argparse.Namespace, keys: dict[str, Any]) -> int:
    """The bench with parsed options and run-config keys: the environment line, the settings, one table row."""
    print(environment_line(), flush=True)
    cap = cap_gpu_memory(args.gpu_memory_gib) if args.gpu_memory_gib else ""
    shape = f"one {args.seq_len}-token sequence a row" if args.seq_len else "data-shaped"
    given = " ".join(f"{k}={v}" for k, v in keys.items())
    op = "" if args.lora_compiled_op else " no-lora_compiled_op"
    op += "" if args.lora_pair else " no-lora_pair"
    kernels = f" act={args.act_kernel}" if args.act_kernel != "auto" else ""
    kernels += f" lora_grad={args.lora_grad_kernel}" if args.lora_grad_kernel != "auto" else ""
    kernels += f" lora_dropout={args.lora_dropout_kernel}" if args.lora_dropout_kernel != "auto" else ""
    kernels += "" if args.trim_last_layer else " no-trim_last_layer"
    settings = f"{shape}{' ' + given if given else ''} norms={args.norm_kernel} loss={args.loss_kernel}{kernels}{op}{cap}"
    print(f"config: {args.model} {settings}", flush=True)  # every row can be traced to its settings
    r = train_bench(args, keys, args.name or f"{args.model} {settings}")
    print("| run | tokens/s | MFU | peak GiB | s/step | loss |\n|---|---|---|---|---|---|")
    print(r.row(), flush=True)
    return 0
