"""The LoRA backward's two rank-r products of dy alone: cuBLAS's two GEMMs (g = dy B, dB = dyᵀ hs; what the fused
LoRA layer runs) against ``tnlora.ops.lora_grad.lora_dy_products`` (both from one read of dy).

Each row: one projection's shape at a micro-batch's tokens, milliseconds of each form, dy's bytes ÷ time (cuBLAS
reads dy twice, so its rate is twice dy's bytes ÷ time), and the largest error of each against an fp32
reference, relative to the reference's largest value.

    python3 benchmarks/lora_grad.py [--shapes 1B:32768,7B:16384,7B:131072] [--rank 8]    # on a GPU
"""

from __future__ import annotations

import argparse
import statistics

import torch

from tnlora.bench.common import cuda_seconds, environment_line
from tnlora.ops.lora_grad import lora_dy_products, lora_dy_products_reference

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
    for _ in range(3):
        fn(*inputs)
    seconds = statistics.median(cuda_seconds(lambda: fn(*inputs), repeats))
    return seconds, relative_errors(fn(*inputs), want)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1B:32768,7B:16384,7B:131072", help="model:tokens, comma-separated")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "error: benchmarks/lora_grad.py measures CUDA kernels; this machine has none\n")
    print(environment_line(), flush=True)
    print("| model | projection | tokens × N | cuBLAS ms (GB/s) | one read ms (GB/s) | error g / dB: cuBLAS; one read |")
    print("|---|---|---|---|---|---|")
    for spec in args.shapes.split(","):
        model, tokens = spec.split(":")
        for name, width in OUTPUTS[model]:
            inputs = operands(int(tokens), width, args.rank)
            dy_bytes = inputs[0].numel() * inputs[0].element_size()
            (tc, ec), (tf, ef) = (timed(fn, inputs, args.repeats) for fn in (lora_dy_products_reference, lora_dy_products))
            print(f"| {model} | {name} | {tokens} × {width} | {tc * 1e3:.3f} ({2 * dy_bytes / tc / 1e9:,.0f}) | "
                  f"{tf * 1e3:.3f} ({dy_bytes / tf / 1e9:,.0f}) | {ec}; {ef} |", flush=True)  # fmt: skip
            del inputs
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
