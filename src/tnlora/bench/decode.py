"""`tnlora bench decode`: greedy ``generate()`` on a preset with random weights, at several batch sizes.

For each batch size: the whole call (prefill included) as tokens/s and ms per new token, and one decode step
alone, (call − a 1-token call) ÷ (new tokens − 1), with the bytes the step has to move (weights once, the
recurrent states read and written) as GB/s and as a share of a measured device-to-device copy. With CUDA
graphs (the default on a GPU, as ``tnlora chat`` runs) the untimed warm-up call captures the step graph; the
timed call replays it.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import math
import pstats
import sys
import time
from typing import Any, NamedTuple

import torch

from tnlora.bench.common import (
    cap_gpu_memory,
    cuda_seconds,
    environment_line,
    print_profile,
    profile_region,
    random_model,
)
from tnlora.bench.options import decode_args as parse_args
from tnlora.errors import ConfigError


class DecodeResult(NamedTuple):
    """One batch size's decoding figures."""

    tokens_per_s: float  # the whole generate() call, prefill included, over the batch
    ms_per_step: float  # the whole call ÷ new tokens
    step_ms: float  # one decode step alone


def with_adapter(model: torch.nn.Module, mode: str, rank: int, preset: str) -> torch.nn.Module:
    """``model`` with a random LoRA adapter of ``rank`` on every linear layer, kept as peft layers ("unmerged",
    fp32 adapter weights as a loaded adapter has them) or folded into the base weights ("merged"); "none":
    as it is."""
    if mode == "none":
        return model
    from tnlora.config import RunConfig
    from tnlora.train.lora import apply_finetuning

    cfg = RunConfig(model_name_or_path=preset, dataset="d", output_dir="o", lora_rank=rank, lora_alpha=2 * rank)
    net = apply_finetuning(model, cfg)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # peft's zero B would merge to nothing (the same kernels either way)
    return net.merge_and_unload() if mode == "merged" else net


def decode_step_bytes(model: torch.nn.Module, batch: int, state_writes: float = 1.0) -> int:
    """The bytes one decode step has to move at least: every layer's weights, the final norm's and the LM
    head's read once (the head's although tied to the embedding, of which B rows are read), and each layer's
    recurrent state read, and written ``state_writes`` times a step (1 ÷ the steps between write-backs where
    they are deferred)."""
    from tnlora.infer.decode_graph import state_layout

    def size(params: Any) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # an unmerged adapter's
    core = model.model
    weights = size(core.layers.parameters()) + size(core.final_norm.parameters()) + size(model.lm_head.parameters())
    rows = batch * core.embed_tokens.weight[0].numel() * core.embed_tokens.weight.element_size()
    states = 0
    for layer in core.layers:
        shape, dtype = state_layout(layer.token_mixer, batch)
        states += math.prod(shape) * dtype.itemsize
    return weights + rows + round(states * (1 + state_writes))


def copy_bandwidth(size_bytes: int = 2**30, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write), the median of ``repeats``: what a step bound by
    memory traffic can reach at most, measured rather than the datasheet's."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = cuda_seconds(functools.partial(dst.copy_, src), repeats)
    del src, dst
    return 2 * size_bytes / sorted(times)[len(times) // 2]


def decode_bench(
    model: torch.nn.Module,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    profile: bool = False,
    trace: str = "",
    host_profile: int = 0,
) -> DecodeResult:
    """Greedy decoding of ``batch`` random prompts through ``generate()``: the whole call and one step alone.
    ``host_profile``: afterwards, print that many functions by cumulative and by own host time of a 1-token and
    of a whole call (cProfile: where the host spends its time while the device runs what it queued)."""
    device = next(model.parameters()).device
    prompt = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=device)

    def timed(tokens: int, region: Any = None) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with region or contextlib.nullcontext():
            model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.inference_mode():
        timed(4)  # captures the step graph (with CUDA graphs)
        prof = profile_region() if profile or trace else None
        seconds = timed(new_tokens, prof)
        first = sorted(timed(1) for _ in range(3))[1]
        for tokens in dict.fromkeys([1, new_tokens]) if host_profile else ():
            host = cProfile.Profile()
            with host:
                timed(tokens)
            print(f"host profile, batch {batch}, a {tokens}-token call:")
            for order in ("cumulative", "tottime"):
                pstats.Stats(host, stream=sys.stdout).sort_stats(order).print_stats(host_profile)
    if prof is not None:
        print(f"batch {batch}: {1e3 * seconds / new_tokens:.2f} ms/step (profiled)")
        print_profile(prof, trace)
    step = (seconds - first) / max(1, new_tokens - 1)
    return DecodeResult(batch * new_tokens / seconds, 1e3 * seconds / new_tokens, 1e3 * step)


def main(argv: list[str]) -> int:
    """Entry point of ``tnlora bench decode``."""
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The bench with parsed options: the environment line, the settings, one table row per batch size."""
    from tnlora.infer.decode_graph import (
        DEFER_MIN_BATCH,
        DEFER_STEPS,
        GEMV_MAX_BATCH,
        ROWS_MIN_BATCH,
        defer_steps_error,
        install_graph_decoding,
        installed_graphs,
    )
    from tnlora.ops.gemv import ROWS_MAX
    from tnlora.ops.select import kernel_impl

    print(environment_line(), flush=True)
    cuda = torch.cuda.is_available()
    cap = cap_gpu_memory(args.gpu_memory_gib) if args.gpu_memory_gib else ""
    graphs = cuda if args.graphs is None else args.graphs
    if graphs and not cuda:
        raise ConfigError("--graphs needs a CUDA GPU")
    if args.decode_kernel == "triton" and not graphs:
        # Only the static CUDA-graph step reads decode_kernel: an eager run would time the torch step.
        raise ConfigError("--decode_kernel triton needs CUDA-graph decoding (a GPU and --graphs)")
    kernel = kernel_impl(args.decode_kernel, "cuda", "decode_kernel") if graphs else "torch"
    if args.gemv and not (graphs and kernel == "triton"):
        raise ConfigError("--gemv needs CUDA-graph decoding with the triton kernel")
    gemv = graphs and kernel == "triton" if args.gemv is None else args.gemv
    most = GEMV_MAX_BATCH if args.gemv_max_batch is None else args.gemv_max_batch
    if not 1 <= most <= ROWS_MAX:
        raise ConfigError(f"--gemv_max_batch must be 1 to {ROWS_MAX}, got {most}")
    least = ROWS_MIN_BATCH if args.rows_min_batch is None else args.rows_min_batch
    if not 2 <= least <= ROWS_MAX:
        raise ConfigError(f"--rows_min_batch must be 2 to {ROWS_MAX}, got {least}")
    step = f"gemv 1,{least}..{most} {'pdl' if args.pdl else 'no-pdl'}" if gemv else "layers"
    step += "" if args.branches else " no-branches"
    defer = DEFER_STEPS if args.defer_steps is None else args.defer_steps
    if defer_steps_error(defer):
        raise ConfigError(f"--defer_steps: {defer_steps_error(defer)}")
    defer_min = DEFER_MIN_BATCH if args.defer_min_batch is None else args.defer_min_batch
    step += f" defer={defer} from batch {defer_min}" if defer else " defer=0"
    print(f"config: {args.model} decode graphs={graphs} decode_kernel={args.decode_kernel} ({kernel}) "
          f"prompt={args.prompt_len} new_tokens={args.new_tokens} adapter={args.adapter} step={step} "
          f"prefill={args.lightning_impl}{' graphs' if graphs and args.prefill_graphs else ''}{cap}",
          flush=True)
    model = random_model(args.model, args.lightning_impl, "cuda" if cuda else "cpu")
    model = with_adapter(model, args.adapter, args.lora_rank, args.model).eval()
    model.config.use_cache = True
    model.config.decode_kernel = args.decode_kernel
    if graphs:
        install_graph_decoding(model, gemv=gemv, pdl=args.pdl, prefill=args.prefill_graphs, gemv_max_batch=most,
                               branches=args.branches, defer_steps=defer, defer_min_batch=defer_min,
                               rows_min_batch=least)
    copy = copy_bandwidth() if cuda else math.nan
    if cuda:
        print(f"copy bandwidth: {copy / 1e9:,.0f} GB/s (device-to-device copies of 1 GiB, read + write)")
    print("| model | cuda graphs | decode kernel | batch | tokens/s | ms/step | decode step ms | step GB/s | "
          "of copy bandwidth |\n|---|---|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batch.split(",")]:
        r = decode_bench(model, batch, args.prompt_len, args.new_tokens, args.profile, args.trace, args.host_profile)
        # The state writes the timed call's steps made: its greedy device loop's (GreedyDeviceSteps.defer_steps).
        runner = installed_graphs(model).runners.get(batch) if graphs else None
        deferred = max((steps.defer_steps for steps in runner.greedy.values()), default=0) if runner else 0
        rate = decode_step_bytes(model, batch, 1 / deferred if deferred else 1.0) / (r.step_ms / 1e3)
        share = f"{100 * rate / copy:.0f}%" if math.isfinite(copy) else "–"
        print(f"| {args.model} | {graphs} | {kernel} | {batch} | {r.tokens_per_s:,.0f} | {r.ms_per_step:.2f} | "
              f"{r.step_ms:.2f} | {rate / 1e9:,.0f} | {share} |", flush=True)
    return 0
