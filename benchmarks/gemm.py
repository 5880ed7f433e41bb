"""The training step's frozen-weight GEMMs alone: how fast cuBLAS runs each projection's shape, plain and in the
forms the fused LoRA layer uses, and whether the card holds its clock under a long run of them.

In the traced 7B steps (RESULTS.md, "Where the training step's time goes") the frozen weights' GEMMs run at
~670–690 TFLOP/s, against ~785 for a short run of 8192³ products on the same card. This separates the
possible causes: the shape and layout (forward x Wᵀ, input gradient dy W), the β = 1 epilogue that adds the
adapter's output already in y (``addmm_``), and the clock under a sustained load (nvidia-smi sampled while a
few seconds of one shape run back to back).

With ``--fp8`` each shape also runs the forms ``fp8: true`` trains with (tnlora.ops.fp8): the e4m3 GEMM with
row scales alone (operands quantized beforehand), and as the fused LoRA layer calls it (x or dy quantized per
token first, the weight's transpose made for the input gradient, the adapter's part added after): what the fp8
tensor cores give against the bf16 rows of the same shape, and what the quantization costs around them.

``--stacked`` compares, for the GLU's l1 and l2 (one input, two weights of one shape), the two β = 1 GEMMs the
fused pair runs with one GEMM over the weights stacked [W₁; W₂] (forward y₁₂ += x [W₁; W₂]ᵀ; input gradient
dx += [dy₁ dy₂] [W₁; W₂]), each form run back to back for a second at a time, alternating, so that both meet the
card's clock under its power cap alike.

``--appended`` compares each projection's fused LoRA layer as the tree runs it (:mod:`tnlora.ops.lora`: x Aᵀ, the
adapter's output written, the frozen GEMM adding to it; in the backward g = dy B, dB, dA and the input gradient
written then added to) with the adapter appended to the frozen GEMM's reduction: y = [x | s·h] [W | B]ᵀ with
K = k + r, and [dx | g] = dy [W | B] in one GEMM (then dB and dA as in the tree). The appended forms leave work to
the kernels around the layer (s·h written beside x by the kernel that writes x, s·g A added by the one that reads
dx), so they bound what moving the rank-r products there could give; the K and N tails of k + r are their price.
"with its cats" builds [x | s·h] and [W | B] in the call, and the last column adds the rank-r pass over dx too: what
the appended form costs where nothing around it takes those passes over.

``--quantize`` times the per-token quantization alone instead: Inductor's kernel (what the layer runs) against
the Triton kernel (``quantize_rows_triton``, the candidate), and whether the Triton kernel's result is the eager
reference's bit for bit.

    python3 benchmarks/gemm.py [--models 7B,1B] [--rows 16384,131072] [--sustain 4] [--fp8 | --quantize | --stacked | --appended]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
from torch import Tensor

from tnlora.bench.common import cuda_seconds, environment_line, median_seconds

# (name, N, K) of y = x Wᵀ, W [N, K], for each layer's projections.
SHAPES = {
    "7B": [("qkvu", 16384, 4096), ("out_proj", 4096, 4096), ("l1/l2", 11008, 4096), ("l3", 4096, 11008)],
    "1B": [("qkvu", 8192, 2048), ("out_proj", 2048, 2048), ("l1/l2", 5632, 2048), ("l3", 2048, 5632)],
}


def operands(m: int, n: int, k: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    """Random x [m, k], W [n, k], dy [m, n] and the accumulators y [m, n], dx [m, k]."""
    return {
        "x": torch.randn(m, k, device=device, dtype=dtype),
        "w": torch.randn(n, k, device=device, dtype=dtype) / k**0.5,
        "dy": torch.randn(m, n, device=device, dtype=dtype),
        "y": torch.randn(m, n, device=device, dtype=dtype),
        "dx": torch.randn(m, k, device=device, dtype=dtype),
    }


def forms(t: dict[str, Tensor]) -> dict[str, tuple[Callable[[], Tensor], float]]:
    """Each form's callable and its FLOPs on the operands ``t``: forward y = x Wᵀ and input gradient dx = dy W,
    each written fresh (β = 0) and accumulated into a tensor already holding the adapter's part (β = 1, in
    place: the accumulators change with every call)."""
    x, w, dy, y, dx = t["x"], t["w"], t["dy"], t["y"], t["dx"]
    flops = 2.0 * x.shape[0] * w.shape[0] * w.shape[1]
    return {
        "fwd x Wᵀ (β=0)": (lambda: torch.mm(x, w.t()), flops),
        "fwd y += x Wᵀ (β=1)": (lambda: y.addmm_(x, w.t()), flops),
        "dgrad dy W (β=0)": (lambda: torch.mm(dy, w), flops),
        "dgrad dx += dy W (β=1)": (lambda: dx.addmm_(dy, w), flops),
    }


def fp8_forms(t: dict[str, Tensor]) -> dict[str, tuple[Callable[[], Tensor], float]]:
    """The fp8 forms of :func:`forms` (tnlora.ops.fp8): the scaled GEMM alone on operands quantized beforehand,
    and each GEMM as the fused LoRA layer runs it (quantizing x / dy per token, the transposed weight for the
    input gradient, then y += adapter's part as a β = 1 rank-8 GEMM standing in for it: the forms' extra passes)."""
    from tnlora.ops.fp8 import (
        fp8_linear,
        fp8_linear_input_grad,
        quantize_rows,
        quantize_rows_triton,
        quantize_weight,
    )

    x, w, dy = t["x"], t["w"], t["dy"]
    flops = 2.0 * x.shape[0] * w.shape[0] * w.shape[1]
    wq, ws = quantize_weight(w)
    wt = wq.t().contiguous()
    xq, xs = quantize_rows(x)
    dyq, dys = quantize_rows(dy, ws)
    ones = torch.ones((1, w.shape[1]), device=x.device)
    rank = 8
    h = torch.randn(x.shape[0], rank, device=x.device, dtype=x.dtype)
    b = torch.randn(w.shape[0], rank, device=x.device, dtype=x.dtype)
    a = torch.randn(rank, w.shape[1], device=x.device, dtype=x.dtype)

    def layer_forward() -> Tensor:
        return fp8_linear(x, wq, ws, x.dtype).addmm_(h, b.t())

    def layer_input_grad() -> Tensor:
        return fp8_linear_input_grad(dy, wq, ws, dy.dtype).addmm_(h, a)

    def layer_forward_triton() -> Tensor:
        return fp8_linear(x, wq, ws, x.dtype, x_fp8=quantize_rows_triton(x)).addmm_(h, b.t())

    def layer_input_grad_triton() -> Tensor:
        operands = (*quantize_rows_triton(dy, ws), wq.t().contiguous())
        return fp8_linear_input_grad(dy, wq, ws, dy.dtype, operands).addmm_(h, a)

    # One scale a tensor instead of a row (cuBLAS's fp8 GEMM rather than the row-scaled kernel): what row scales
    # cost in the GEMM itself, for the same operands' values.
    one = torch.ones((), device=x.device)

    return {
        "fp8 fwd x Wᵀ (GEMM alone)": (
            lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=x.dtype), flops),
        "fp8 dgrad dy W (GEMM alone)": (
            lambda: torch._scaled_mm(dyq, wt.t(), scale_a=dys, scale_b=ones, out_dtype=x.dtype), flops),
        "fp8 fwd x Wᵀ, fast accumulation (GEMM alone)": (
            lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=x.dtype, use_fast_accum=True),
            flops),
        "fp8 fwd x Wᵀ, one scale a tensor (GEMM alone)": (
            lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=x.dtype), flops),
        "fp8 dgrad dy W, one scale a tensor (GEMM alone)": (
            lambda: torch._scaled_mm(dyq, wt.t(), scale_a=one, scale_b=one, out_dtype=x.dtype), flops),
        "fp8 fwd as the layer runs it": (layer_forward, flops),
        "fp8 dgrad as the layer runs it": (layer_input_grad, flops),
        "fp8 fwd as the layer runs it, the Triton quantization": (layer_forward_triton, flops),
        "fp8 dgrad as the layer runs it, the Triton quantization": (layer_input_grad_triton, flops),
    }  # fmt: skip


def quantize_table(models: list[str], rows: list[int], repeats: int) -> None:
    """The per-token quantization alone (tnlora.ops.fp8): the Triton kernel against the reference compiled by
    Inductor, for each projection's x (its input width) and dy ⊙ s_w (its output width): ms and the bytes moved
    (bf16 in, e4m3 and a scale out) per second."""
    from tnlora.ops.fp8 import quantize_rows, quantize_rows_reference, quantize_rows_triton

    print("| model | operand | rows × width | Inductor ms | Triton ms | Triton GB/s | equal |")
    print("|---|---|---|---|---|---|---|")
    for model in models:
        for name, n, k in SHAPES[model]:
            for operand, width, col in ((f"{name} x", k, None), (f"{name} dy ⊙ s_w", n, n)):
                for m in rows:
                    t = torch.randn(m, width, device="cuda", dtype=torch.bfloat16)
                    scale = torch.rand(1, col, device="cuda") + 0.5 if col else None
                    times = [median_seconds(functools.partial(fn, t, scale), repeats)
                             for fn in (quantize_rows, quantize_rows_triton)]  # fmt: skip
                    q, s = quantize_rows_triton(t, scale)
                    q_ref, s_ref = quantize_rows_reference(t, scale)
                    equal = torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
                    moved = m * width * 3 + m * 4
                    print(f"| {model} | {operand} | {m} × {width} | {times[0] * 1e3:.3f} | {times[1] * 1e3:.3f} | "
                          f"{moved / times[1] / 1e9:,.0f} | {equal} |", flush=True)
                    del t
                torch.cuda.empty_cache()


def stacked_forms(
    m: int, n: int, k: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16
) -> dict[str, tuple[Callable[[], Tensor], float]]:
    """The GLU pair's frozen GEMMs for m rows, two weights [n, k]: as two β = 1 GEMMs (the pair's form) and as one
    over the stacked weights [2n, k] (the stacked form), forward and input gradient; each callable with its
    FLOPs (the same for both forms). The callables return the accumulators they added to (the two-GEMM forward
    both y₁ and y₂), which change with every call."""
    t = operands(m, 2 * n, k, device, dtype)
    x, w12, dy12, y12, dx = t["x"], t["w"], t["dy"], t["y"], t["dx"]
    w1, w2 = w12[:n], w12[n:]
    y1, y2 = torch.zeros_like(y12[:, :n]), torch.zeros_like(y12[:, n:])
    dy1, dy2 = dy12[:, :n].contiguous(), dy12[:, n:].contiguous()
    flops = 2.0 * 2 * m * n * k
    return {
        "fwd, two GEMMs": (lambda: (y1.addmm_(x, w1.t()), y2.addmm_(x, w2.t())), flops),
        "fwd, stacked": (lambda: y12.addmm_(x, w12.t()), flops),
        "dgrad, two GEMMs": (lambda: dx.addmm_(dy1, w1).addmm_(dy2, w2), flops),
        "dgrad, stacked": (lambda: dx.addmm_(dy12, w12), flops),
    }


def appended_forms(
    m: int, n: int, k: int, rank: int = 8, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
    one_read: bool = False,
) -> tuple[dict[str, Callable[[], object]], dict[str, Tensor]]:
    """One adapted projection (W [n, k], A [r, k], B [n, r], scaling 2) of m rows: the tree's fused forward and
    backward (``tnlora.ops.lora``'s GEMMs; ``one_read`` as its rule picks) against the adapter appended to the
    frozen GEMM's reduction (:data:`__doc__`), each a callable returning what it computed: the forward y, the
    backward (dx or [dx | g], dA, dB). "dx += s·g A" is the rank-r pass the appended backward leaves to dx's reader,
    timed alone. Returned with the operands (x, w, a, b, dy, scaling)."""
    from tnlora.ops.lora import _backward_gemms, _forward_gemms

    scaling = 2.0
    t = operands(m, n, k, device, dtype)
    x, w, dy = t["x"], t["w"], t["dy"]
    a = torch.randn(rank, k, device=device, dtype=dtype) / k**0.5
    b = torch.randn(n, rank, device=device, dtype=dtype)
    hs = x @ (a.t() * scaling)
    xp = torch.cat([x, hs], dim=1)  # what the kernel writing x would write
    wp = torch.cat([w, b], dim=1)
    sa = a * scaling
    dx, g = torch.randn(m, k, device=device, dtype=dtype), torch.randn(m, rank, device=device, dtype=dtype)

    def tree_backward() -> tuple:
        return _backward_gemms(dy, w, a, b, x, hs, None, scaling, 0.0, (True, True, True), one_read)

    def appended_backward(wp: Tensor) -> tuple:
        dxp = torch.mm(dy, wp)
        g = dxp[:, k:]
        return dxp, (g.t() @ x).mul_(scaling), dy.t() @ hs

    def appended_with_cats() -> Tensor:
        return torch.mm(torch.cat([x, x @ sa.t()], dim=1), torch.cat([w, b], dim=1).t())

    forms = {
        "fwd, the tree": lambda: _forward_gemms(x, w, None, a, b, scaling, 0.0, True)[0],
        "fwd, appended": lambda: torch.mm(xp, wp.t()),
        "fwd, appended with its cats": appended_with_cats,
        "dgrad, the tree": tree_backward,
        "dgrad, appended": lambda: appended_backward(wp),
        "dgrad, appended with its cat": lambda: appended_backward(torch.cat([w, b], dim=1)),
        "dx += s·g A": lambda: dx.addmm_(g, sa),
    }
    return forms, {"x": x, "w": w, "a": a, "b": b, "dy": dy, "scaling": torch.tensor(scaling)}


def appended_table(models: list[str], rows: dict[str, int], rounds: int = 3, seconds: float = 0.5) -> None:
    """Each projection's fused layer, the tree against appended (:func:`appended_forms`): ms a call, the median of
    ``rounds`` alternating rounds of ``seconds`` each."""
    from tnlora.ops.lora import reads_dy_once

    print("| model | projection | rows | fwd: tree | appended | with its cats | dgrad: tree | appended | with its cat "
          "| dx += s·g A | appended saves (fwd + dgrad) | with the cats and the dx pass |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in models:
        m = rows[model]
        for name, n, k in SHAPES[model]:
            every, _ = appended_forms(m, n, k, one_read=reads_dy_once("auto", m, n, True))
            for fn in every.values():
                rate(fn, 1e12, 0.1)
            times: dict[str, list[float]] = {form: [] for form in every}
            for _ in range(rounds):
                for form, fn in every.items():
                    times[form].append(1e3 / rate(fn, 1e12, seconds))  # rate(): calls a second here
            ms = {form: statistics.median(v) for form, v in times.items()}
            tree = ms["fwd, the tree"] + ms["dgrad, the tree"]
            bound = tree - ms["fwd, appended"] - ms["dgrad, appended"]
            plain = tree - ms["fwd, appended with its cats"] - ms["dgrad, appended with its cat"] - ms["dx += s·g A"]
            print(f"| {model} | {name} ({n}×{k}) | {m} | " + " | ".join(f"{v:.3f}" for v in ms.values())
                  + f" | {bound:.3f} | {plain:.3f} |", flush=True)
            del every
            torch.cuda.empty_cache()


def rate(fn: Callable[[], object], flops: float, seconds: float) -> float:
    """TFLOP/s of ``fn`` run back to back for ``seconds``."""
    torch.cuda.synchronize()
    t0, done = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn()
        done += 1
        if done % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return flops * done / (time.perf_counter() - t0) / 1e12


def stacked_table(models: list[str], rows: list[int], rounds: int = 3, seconds: float = 1.0) -> None:
    """The GLU pair's GEMMs, two against stacked (:func:`stacked_forms`): TFLOP/s of each round, alternating."""
    print("| model | rows | GEMM | two GEMMs, TFLOP/s by round | stacked, TFLOP/s by round | stacked / two |")
    print("|---|---|---|---|---|---|")
    glu = {"7B": (11008, 4096), "1B": (5632, 2048)}
    for model in models:
        n, k = glu[model]
        for m in rows:
            every = stacked_forms(m, n, k)
            for kind in ("fwd", "dgrad"):
                two, one = every[f"{kind}, two GEMMs"], every[f"{kind}, stacked"]
                for fn, flops in (two, one):
                    rate(fn, flops, 0.2)
                a, b = [], []
                for _ in range(rounds):
                    a.append(rate(*two, seconds))
                    b.append(rate(*one, seconds))
                print(f"| {model} | {m} | {kind} | {', '.join(f'{r:.0f}' for r in a)} | "
                      f"{', '.join(f'{r:.0f}' for r in b)} | {statistics.median(b) / statistics.median(a):.3f} |",
                      flush=True)
            del every
            torch.cuda.empty_cache()


def clock_sampler() -> subprocess.Popen | None:
    """nvidia-smi printing the SM clock, power and throttle reasons every 100 ms, or None without it."""
    query = "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    try:
        return subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-lms", "100"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
    except OSError:
        return None


def sustained(fn: Callable[[], object], flops: float, seconds: float) -> str:
    """TFLOP/s over each second of ``fn`` run back to back for ``seconds``, with the SM clock and power seen."""
    sampler = clock_sampler()
    rates, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        rates.append(rate(fn, flops, 1.0))
    samples = []
    if sampler is not None:
        sampler.terminate()
        out, _ = sampler.communicate()
        for line in out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 4:
                samples.append(parts)
    seen = ""
    if samples:
        clocks = [float(s[0]) for s in samples]
        power = [float(s[1]) for s in samples]
        reasons = sorted({s[3] for s in samples})
        seen = (
            f"; SM clock {min(clocks):.0f}–{max(clocks):.0f} MHz (median {statistics.median(clocks):.0f}), power up "
            f"to {max(power):.0f} W, {samples[-1][2]} °C at the end, throttle reasons {', '.join(reasons)}"
        )
    return "TFLOP/s per second: " + ", ".join(f"{r:.0f}" for r in rates) + seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="7B,1B")
    parser.add_argument("--rows", default="16384,131072", help="tokens (GEMM rows), comma-separated")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sustain", type=float, default=4.0, help="seconds of the 7B l1 forward back to back")
    parser.add_argument("--fp8", action="store_true", help="also the fp8 forms fp8: true trains with")
    parser.add_argument("--quantize", action="store_true", help="only the fp8 per-token quantization, Inductor's "
                        "against the Triton kernel")
    parser.add_argument("--stacked", action="store_true", help="only the GLU pair's GEMMs: two against one over "
                        "the stacked weights")
    parser.add_argument("--appended", action="store_true", help="only each projection's fused LoRA layer: the "
                        "tree's GEMMs against the adapter appended to the frozen GEMM's reduction")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "error: benchmarks/gemm.py measures a CUDA GPU's GEMMs; this machine has none\n")
    print(environment_line(), flush=True)
    if args.quantize:
        quantize_table(args.models.split(","), [int(r) for r in args.rows.split(",")], args.repeats)
        return
    if args.stacked:
        stacked_table(args.models.split(","), [int(r) for r in args.rows.split(",")])
        return
    if args.appended:  # each model at its training defaults' micro-batch on an H200
        appended_table(args.models.split(","), {"7B": 16384, "1B": 32768})
        return
    ref = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        ref @ ref
    t = statistics.median(cuda_seconds(lambda: ref @ ref, args.repeats))
    print(f"8192³ reference: {2 * 8192**3 / t / 1e12:.0f} TFLOP/s", flush=True)
    print("| model | projection | rows | form | ms | TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for name, n, k in SHAPES[model]:
            for m in (int(r) for r in args.rows.split(",")):
                tensors = operands(m, n, k)
                every = {**forms(tensors), **(fp8_forms(tensors) if args.fp8 else {})}
                for form, (fn, flops) in every.items():
                    t = median_seconds(fn, args.repeats)
                    print(f"| {model} | {name} ({n}×{k}) | {m} | {form} | {t * 1e3:.3f} | {flops / t / 1e12:.0f} |",
                          flush=True)
                torch.cuda.empty_cache()
    if args.sustain > 0:
        fn, flops = forms(operands(131072, 11008, 4096))["fwd y += x Wᵀ (β=1)"]
        print(f"sustained 7B l1 forward (β=1, 131072 rows): {sustained(fn, flops, args.sustain)}", flush=True)
        if args.fp8:
            fn, flops = fp8_forms(operands(131072, 11008, 4096))["fp8 fwd x Wᵀ (GEMM alone)"]
            print(f"sustained 7B l1 forward (fp8, 131072 rows): {sustained(fn, flops, args.sustain)}", flush=True)


if __name__ == "__main__":
    main()
