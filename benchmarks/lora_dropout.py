"""LoRA's dropout alone: PyTorch's dropout and the products on the dropped input (what the fused LoRA layer runs
by default) against the kernels of ``tnlora.ops.lora_dropout`` that read x beside a byte mask.

Each row: one adapted input width at a micro-batch's tokens, rank 8, p = 0.1; milliseconds of the forward
(PyTorch: the dropout kernel writing drop(x) and its mask, then drop(x) (s Aᵀ); the kernels: the byte mask drawn
by ``bernoulli_``, then (x ⊙ keep) Aᵀ in one read of x and the mask) and of the backward's two products that see
the mask (PyTorch: dA = gᵀ drop(x), and dx's share, g A through the mask; the kernels: gᵀ (x ⊙ keep) and
(g A) ⊙ keep), x's bytes ÷ time, and the kernels' largest error
against an fp32 composition on their own mask, relative to its largest value.

    python3 benchmarks/lora_dropout.py [--shapes 1B:32768,7B:8192] [--sweep]    # on a GPU

``--sweep`` also tries each kernel's launches (tile, warps, stages) on every shape and prints, per kernel, the
launch of least summed time with the default's.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from tnlora.bench.common import environment_line, median_seconds
from tnlora.ops.lora_dropout import Launch, draw_keep, dropout_down, dropout_grad_a, dropout_up

# The adapted layers' input widths (in_features): qkvu, out_proj, l1 and l2 read the model width, l3 the GLU's.
INPUTS = {"7B": [("qkvu/out_proj/l1/l2", 4096), ("l3", 11008)], "1B": [("qkvu/out_proj/l1/l2", 2048), ("l3", 5632)]}
P, SCALE, RANK = 0.1, 4.0, 8
COEF = SCALE / (1 - P)


def torch_forward(x, a):
    xd, mask = torch.ops.aten.native_dropout(x, P, True)
    return xd @ (a.t() * SCALE), xd, mask


def torch_backward(g, a, xd, mask):
    return (g.t() @ xd).mul_(SCALE), torch.ops.aten.native_dropout_backward(g @ a, mask, COEF)


def kernel_forward(x, a):
    keep = draw_keep(x, P)
    return dropout_down(x, keep, a * COEF), keep


def kernel_backward(g, a, x, keep):
    return dropout_grad_a(g, x, keep, COEF), dropout_up(g, a * COEF, keep)


def median_ms(fn, repeats: int) -> float:
    return median_seconds(fn, repeats, warmup=3) * 1e3


def errors(x, a, g) -> str:
    """The kernels' largest errors (h, dA, dx) against the fp32 composition on the kernels' mask."""
    h, keep = kernel_forward(x, a)
    kept = keep.float()
    xd = x.float() * kept
    want = (xd @ a.float().t() * COEF, COEF * g.float().t() @ xd, (g.float() @ a.float()) * kept * COEF)
    got = (h, *kernel_backward(g, a, x, keep))
    return " / ".join(f"{((u.float() - w).abs().max() / w.abs().max()).item():.1e}" for u, w in zip(got, want, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1B:32768,7B:8192,7B:16384", help="model:tokens, comma-separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also try each kernel's launches on every shape")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "error: benchmarks/lora_dropout.py measures CUDA kernels; this machine has none\n")
    print(environment_line(), flush=True)
    print("| model | input | tokens × K | forward: PyTorch ms (GB/s) | kernel ms (GB/s) | backward: PyTorch ms | "
          "kernels ms | kernels' error h / dA / dx |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    totals: dict[tuple[str, Launch], float] = {}
    for spec in args.shapes.split(","):
        model, tokens = spec.split(":")
        for name, width in INPUTS[model]:
            measure(f"| {model} | {name} | {tokens} × {width} |", int(tokens), width, args, totals)
            torch.cuda.empty_cache()
    for kernel in ("down", "grad_a", "up"):
        ranked = sorted(((launch, t) for (k, launch), t in totals.items() if k == kernel), key=lambda item: item[1])
        if ranked:
            best = "; ".join(f"{t:.3f} ms {launch}" for launch, t in ranked[:3])
            print(f"sweep {kernel}: default {totals.get((kernel, Launch()), float('nan')):.3f} ms summed; best {best}")


def measure(label: str, tokens: int, width: int, args: argparse.Namespace, totals: dict) -> None:
    """One row: both forms' forward and backward on [tokens, width] inputs (and the sweep, with ``args.sweep``)."""
    gen = torch.Generator(device="cuda").manual_seed(width)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, generator=gen)
    a = torch.randn(RANK, width, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    g = torch.randn(tokens, RANK, device="cuda", dtype=torch.bfloat16, generator=gen)
    _, xd, mask = torch_forward(x, a)
    _, keep = kernel_forward(x, a)
    gb = x.numel() * x.element_size() / 1e9
    tf = median_ms(lambda: torch_forward(x, a), args.repeats)
    kf = median_ms(lambda: kernel_forward(x, a), args.repeats)
    tb = median_ms(lambda: torch_backward(g, a, xd, mask), args.repeats)
    kb = median_ms(lambda: kernel_backward(g, a, x, keep), args.repeats)
    print(f"{label} {tf:.3f} ({gb / tf * 1e3:,.0f}) | {kf:.3f} ({gb / kf * 1e3:,.0f}) | {tb:.3f} | {kb:.3f} | "
          f"{errors(x, a, g)} |", flush=True)  # fmt: skip
    if args.sweep:
        sweep(x, a, g, keep, args.repeats, totals)


def sweep(x, a, g, keep, repeats: int, totals: dict) -> None:
    """Each kernel alone at every launch of the grid; summed ms a launch and kernel into ``totals``."""
    scaled = a * COEF
    kernels = {
        "down": lambda launch: dropout_down(x, keep, scaled, launch),
        "grad_a": lambda launch: dropout_grad_a(g, x, keep, COEF, launch),
        "up": lambda launch: dropout_up(g, scaled, keep, launch=launch),
    }
    for (kernel, fn), (block_t, block_k, warps, stages) in itertools.product(
        kernels.items(), itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (3,))
    ):
        launch = Launch(block_t, block_k, warps, stages)
        try:
            ms = median_ms(lambda fn=fn, launch=launch: fn(launch), repeats)
        except Exception as exc:  # a launch that does not compile (shared memory, registers) is left out
            print(f"sweep {kernel} {tuple(x.shape)}: {launch} failed: {type(exc).__name__}", flush=True)
            continue
        totals[kernel, launch] = totals.get((kernel, launch), 0.0) + ms


if __name__ == "__main__":
    main()
