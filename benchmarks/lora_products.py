"""Every rank-r product of the fused LoRA layers' training step alone, at each projection's shape: cuBLAS (what
``tnlora.ops.lora`` runs) against the Triton kernels of ``tnlora.ops.lora_dropout`` without a mask and the one read
of dy (``tnlora.ops.lora_grad``).

The products, for x [T, K] in, y [T, N] out, rank r (the GLU's l1 / l2 pair: r₁ + r₂ = 2r where x is read):
forward hs = x (s A)ᵀ and the adapter's part of y, hs Bᵀ; backward g = dy B, dB = dyᵀ hs, dA = gᵀ x and the
adapter's part of dx, g (s A). Each is memory-bound: its bytes (the [T, K] or [T, N] operand it reads or writes) ÷
time against the card's copy rate tells what a faster form could save. The last lines sum a decoder layer's
products for each form and for the faster of the two at each product, times the model's layers: the ms a
training step spends in them (no recompute).

    python3 benchmarks/lora_products.py [--shapes 1B:32768,7B:16384] [--rank 8] [--sweep]    # on a GPU
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from tnlora.bench.common import cuda_seconds, environment_line, median_seconds
from tnlora.ops.lora_dropout import Launch, dropout_down, dropout_grad_a, dropout_up
from tnlora.ops.lora_grad import lora_dy_products

# (hidden, GLU width, layers) of each model
MODELS = {"1B": (2048, 5632, 16), "7B": (4096, 11008, 30), "385M": (1024, 2816, 24)}


def projections(hidden: int, glu: int) -> list[tuple[str, int, int, int, int]]:
    """(name, K, N, rank multiple where x is read, outputs) of a layer: the pair reads x once at rank 2r and writes
    two outputs of N each."""
    return [("qkvu", hidden, 4 * hidden, 1, 1), ("out_proj", hidden, hidden, 1, 1), ("l1/l2", hidden, glu, 2, 2),
            ("l3", glu, hidden, 1, 1)]  # fmt: skip


def copy_rate(nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (read and write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), 20) / 1e9


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def product_forms(tokens: int, k: int, n: int, down_rank: int, up_rank: int, scale: float = 2.0):
    """{product: (bytes, cuBLAS fn, Triton fn)} for one projection: the products of x (x Aᵀ, dA, g A) at
    ``down_rank``, those of one output (hs Bᵀ, g and dB) at ``up_rank``."""
    gen = torch.Generator(device="cuda").manual_seed(k * 7 + n)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, k, generator=gen, **bf)
    dy = torch.randn(tokens, n, generator=gen, **bf)
    a = torch.randn(down_rank, k, generator=gen, **bf) * 0.02
    b = torch.randn(n, up_rank, generator=gen, **bf) * 0.02
    hs = torch.randn(tokens, up_rank, generator=gen, **bf)
    g = torch.randn(tokens, down_rank, generator=gen, **bf)
    sa, bt = a * scale, b.t().contiguous()
    two = 2  # bytes a bf16 element
    return {
        "x Aᵀ": (tokens * k * two, lambda: x @ sa.t(), lambda launch=None: dropout_down(x, None, sa, launch)),
        "hs Bᵀ": (tokens * n * two, lambda: hs @ b.t(), lambda launch=None: dropout_up(hs, bt, None, launch=launch)),
        "g, dB": (2 * tokens * n * two, lambda: (dy @ b, dy.t() @ hs), lambda launch=None: lora_dy_products(dy, b, hs)),
        "dA": (tokens * k * two, lambda: (g.t() @ x).mul_(scale),
               lambda launch=None: dropout_grad_a(g, x, None, scale, launch)),
        "g A": (tokens * k * two, lambda: g @ sa, lambda launch=None: dropout_up(g, sa, None, launch=launch)),
    }  # fmt: skip


SWEEP = [
    Launch(t, c, w, s) for t, c, w, s in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2, 3, 4))
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1B:32768,7B:16384", help="model:tokens, comma-separated")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--sweep", action="store_true", help="the Triton forms' launches too (the fastest shown)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "error: benchmarks/lora_products.py measures CUDA kernels; this machine has none\n")
    print(environment_line(), flush=True)
    rate = copy_rate()
    print(f"copy bandwidth {rate:,.0f} GB/s", flush=True)
    print("| model | tokens | projection | product | cuBLAS ms (GB/s) | Triton ms (GB/s) | Triton error |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.shapes.split(","):
        model, tokens = spec.split(":")
        hidden, glu, layers = MODELS[model]
        sums = {"cuBLAS": 0.0, "Triton": 0.0, "faster": 0.0, "copy rate": 0.0}
        for name, k, n, multiple, outputs in projections(hidden, glu):
            forms = product_forms(int(tokens), k, n, args.rank * multiple, args.rank)  # each output: rank r
            for product, (nbytes, cublas, triton_form) in forms.items():
                count = outputs if product in ("hs Bᵀ", "g, dB") else 1
                tc = median_seconds(cublas, args.repeats, warmup=3)
                tt = median_seconds(triton_form, args.repeats, warmup=3)
                want, got = cublas(), triton_form()
                err = max(rel_error(u, v) for u, v in zip(got, want, strict=True)) if isinstance(want, tuple) \
                    else rel_error(got, want)  # fmt: skip
                best = ""
                if args.sweep and product != "g, dB":
                    best = sweep(triton_form, tt)
                print(f"| {model} | {tokens} | {name}{' ×2' if count > 1 else ''} | {product} | {tc * 1e3:.3f} "
                      f"({nbytes / tc / 1e9:,.0f}) | {tt * 1e3:.3f} ({nbytes / tt / 1e9:,.0f}){best} | {err:.1e} |",
                      flush=True)  # fmt: skip
                sums["cuBLAS"] += count * tc
                sums["Triton"] += count * tt
                sums["faster"] += count * min(tc, tt)
                sums["copy rate"] += count * nbytes / (rate * 1e9)
            del forms
            torch.cuda.empty_cache()
        line = ", ".join(f"{form} {seconds * layers * 1e3:.1f} ms" for form, seconds in sums.items())
        print(
            f"{model} at {tokens} tokens, a step's rank-{args.rank} products ({layers} layers): {line}",
            flush=True,
        )


def sweep(form, default_seconds: float) -> str:
    """The fastest launch of ``form`` over SWEEP, as ' [best ms at launch]' (launches that fail are left out)."""
    times = {}
    for launch in SWEEP:
        try:
            form(launch)
        except Exception:  # a launch that does not compile (shared memory) is left out
            continue
        times[launch] = statistics.median(cuda_seconds(lambda launch=launch: form(launch), 10))
    if not times:
        return ""
    launch, seconds = min(times.items(), key=lambda item: item[1])
    mark = " (faster than the default)" if seconds < default_seconds else ""
    return f" [best {seconds * 1e3:.3f} at {launch.block_t}:{launch.block_k}:{launch.num_warps}:{launch.num_stages}{mark}]"


if __name__ == "__main__":
    main()
