"""The LoRA backward's two rank-r products of dy alone: cuBLAS's two GEMMs (g = dy B, dB = dyᵀ hs; what the fused
LoRA layer runs) against ``tnlora.ops.lora_grad.lora_dy_products`` (both from one read of dy).

Each row: one projection's shape at a micro-batch's tokens, milliseconds of each form, dy's bytes ÷ time (cuBLAS
reads dy twice, so its rate is twice dy's bytes ÷ time), and the largest error of each against an fp32
reference, relative to the reference's largest value.

    python3 benchmarks/lora_grad.py [--shapes 1B:32768,7B:16384,7B:131072] [--rank 8]    # on a GPU

With ``--sweep`` each shape also tries the kernel's launches (tile, warps, stages, programs a processor) and
prints the fastest few with the default's time, and at the end the launch whose summed time over every shape is
least.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from tnlora.bench.common import cuda_seconds, environment_line, median_seconds
from tnlora.ops.lora_grad import Launch, lora_dy_products, lora_dy_products_reference

# (name, N) of each adapted projection's output width, the width of its dy.
OUTPUTS = {
    "7B": [("qkvu", 16384), ("out_proj", 4096), ("l1/l2", 11008), ("l3", 4096)],
    "1B": [("qkvu", 8192), ("out_proj", 2048), ("l1/l2", 5632), ("l3", 2048)],
}


def operands(tokens: int, width: int, rank: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """dy [tokens, width], B [width, rank], hs [tokens, rank]."""
    gen = torch.Generator(device=device).manual_seed(width)
    return (
        torch.randn(tokens, width, device=device, dtype=dtype, generator=gen),
        torch.randn(width, rank, device=device, dtype=dtype, generator=gen) * 0.05,
        torch.randn(tokens, rank, device=device, dtype=dtype, generator=gen),
    )


def relative_errors(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> str:
    """max |got − want| ÷ max |want| for each pair, as "g / dB"."""
    return " / ".join(f"{((a.float() - b).abs().max() / b.abs().max()).item():.1e}" for a, b in zip(got, want, strict=True))


def timed(fn, inputs: tuple[torch.Tensor, ...], repeats: int) -> tuple[float, str]:
    """Median seconds of ``fn(*inputs)`` after three untimed calls, and its errors against an fp32 reference."""
    want = lora_dy_products_reference(*(t.float() for t in inputs))
    seconds = median_seconds(lambda: fn(*inputs), repeats, warmup=3)
    return seconds, relative_errors(fn(*inputs), want)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1B:32768,7B:16384,7B:131072", help="model:tokens, comma-separated")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also try the kernel's launches on every shape")
    parser.add_argument("--tiles", default="32:256,32:512,64:256,64:512",
                        help="the sweep's tiles, rows:columns comma-separated (each with 4 and 8 warps, 2 to 4 "
                             "stages, 2 to 8 programs a processor)")  # fmt: skip
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "error: benchmarks/lora_grad.py measures CUDA kernels; this machine has none\n")
    print(environment_line(), flush=True)
    print("| model | projection | tokens × N | cuBLAS ms (GB/s) | one read ms (GB/s) | error g / dB: cuBLAS; one read |")
    print("|---|---|---|---|---|---|")
    totals: dict[Launch, tuple[float, int]] = {}
    tiles = [tuple(int(x) for x in text.split(":")) for text in args.tiles.split(",")]
    for spec in args.shapes.split(","):
        model, tokens = spec.split(":")
        for name, width in OUTPUTS[model]:
            inputs = operands(int(tokens), width, args.rank)
            dy_bytes = inputs[0].numel() * inputs[0].element_size()
            (tc, ec), (tf, ef) = (timed(fn, inputs, args.repeats) for fn in (lora_dy_products_reference, lora_dy_products))
            print(f"| {model} | {name} | {tokens} × {width} | {tc * 1e3:.3f} ({2 * dy_bytes / tc / 1e9:,.0f}) | "
                  f"{tf * 1e3:.3f} ({dy_bytes / tf / 1e9:,.0f}) | {ec}; {ef} |", flush=True)  # fmt: skip
            if args.sweep:
                sweep(inputs, args.repeats, f"{model} {name} {tokens}", totals, tiles)
            del inputs
            torch.cuda.empty_cache()
    if totals:
        # Only the launches that ran on every shape (some do not fit the shared memory) are compared.
        shapes = max(count for _, count in totals.values())
        ranked = sorted(((launch, t) for launch, (t, count) in totals.items() if count == shapes), key=lambda i: i[1])
        for launch, seconds in ranked[:5]:
            print(f"sweep total {seconds * 1e3:.3f} ms: {launch}")
        if Launch() in totals:  # the default's tile may be left out of --tiles
            print(f"sweep total {totals[Launch()][0] * 1e3:.3f} ms: the default {Launch()}")


def sweep(inputs: tuple[torch.Tensor, ...], repeats: int, label: str, totals: dict[Launch, tuple[float, int]],
          tiles: list[tuple[int, int]]) -> None:  # fmt: skip
    """Time every launch of the grid (``tiles`` by warps, stages and programs a processor) on ``inputs`` (each
    checked against the reference), print the fastest three and the default, and add each launch's time (and one
    shape) to ``totals``."""
    want = lora_dy_products_reference(*inputs)
    times = {}
    for (block_t, block_n), warps, stages, per_sm in itertools.product(tiles, (4, 8), (2, 3, 4), (2, 4, 8)):
        launch = Launch(block_t, block_n, warps, stages, per_sm)
        try:
            got = lora_dy_products(*inputs, launch)
        except Exception as exc:  # a launch that does not compile (shared memory, registers) is left out
            print(f"sweep {label}: {launch} failed: {type(exc).__name__}", flush=True)
            continue
        if any(not torch.allclose(a.float(), b.float(), atol=5e-2, rtol=5e-2) for a, b in zip(got, want, strict=True)):
            print(f"sweep {label}: {launch} gave wrong results", flush=True)
            continue
        times[launch] = statistics.median(cuda_seconds(lambda launch=launch: lora_dy_products(*inputs, launch), repeats))
        seconds, count = totals.get(launch, (0.0, 0))
        totals[launch] = (seconds + times[launch], count + 1)
    best = sorted(times.items(), key=lambda item: item[1])[:3]
    line = "; ".join(f"{t * 1e3:.3f} ms {launch}" for launch, t in best)
    print(f"sweep {label}: default {times.get(Launch(), float('nan')) * 1e3:.3f} ms; best {line}", flush=True)


if __name__ == "__main__":
    main()
