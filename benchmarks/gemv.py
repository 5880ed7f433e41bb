"""Batch-1 decode projections: cuBLAS and cuBLASLt against a Triton GEMV, y = x Wᵀ with x of one row.

The 7B decode step at batch 1 spends ~3.8 of its ~4.3 ms of kernels in cuBLAS GEMMs at ~86 % of the copy rate
(RESULTS.md, "The decode step alone"); issue 23's aim for batch 1 needs the weights streamed faster than that.
This answers the first question before any fused decode kernel is built on a GEMV: can a plain Triton GEMV
read one layer's weight faster than cuBLAS at M = 1? Per projection shape of the 7B and 1B layers, each
implementation runs inside a CUDA graph over REPEATS distinct weights (more than L2 holds, as in a decode
step), median of the replays; GB/s = the weights' bytes ÷ time, against a device-to-device copy of 1 GiB.
The Triton kernel tries CONFIGS (rows per program, columns per iteration, K split into parts whose fp32
partial sums meet by atomic adds) and reports the best; every result is checked against an fp32 product.

    python3 benchmarks/gemv.py [--models 7B,1B] [--repeats 12]        # on a GPU
    python3 benchmarks/gemv.py --fused     # tnlora.ops.gemv's fused forms against what they replace
    python3 benchmarks/gemv.py --sweep     # tnlora.ops.gemv's launches (GemvConfig grid) per form and shape
    python3 benchmarks/gemv.py --rows 32   # batch 32: cuBLAS against a Triton skinny GEMM (weights read once)
    python3 benchmarks/gemv.py --glu --rows 32   # the GLU's l1 and l2: two GEMMs, side by side, or one stacked
    TRITON_INTERPRET=1 python3 benchmarks/gemv.py --check --device cpu   # the kernel's arithmetic, on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tnlora.bench.common import cuda_seconds
from tnlora.bench.decode import copy_bandwidth
from tnlora.infer.decode_graph import blas_library

# (name, N, K) of y = x Wᵀ, W [N, K]: qkvu, out_proj, l1 / l2, l3 and the LM head of each layer.
SHAPES = {
    "7B": [("qkvu", 16384, 4096), ("out_proj", 4096, 4096), ("l1/l2", 11008, 4096), ("l3", 4096, 11008),
           ("lm_head", 64000, 4096)],
    "1B": [("qkvu", 8192, 2048), ("out_proj", 2048, 2048), ("l1/l2", 5632, 2048), ("l3", 2048, 5632),
           ("lm_head", 64000, 2048)],
}
# (BLOCK_N rows per program, BLOCK_K columns per iteration, SPLIT_K parts of K, num_warps): a small grid, each
# shape compiles each config once (ITERS is a constant of the kernel).
CONFIGS = [(bn, bk, sk, 4) for bn in (4, 8, 16) for bk, sk in ((512, 1), (1024, 1), (512, 2), (256, 4))]
REPLAYS = 20


@triton.jit
def _k_part(K, BLOCK_K: tl.constexpr, ITERS: tl.constexpr):
    """[start, end) of the columns of K that this program's split-K part (program axis 1) covers."""
    start = tl.program_id(1) * ITERS * BLOCK_K
    return start, tl.minimum(K, start + ITERS * BLOCK_K)


@triton.jit
def gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SPLIT_K: tl.constexpr, ITERS: tl.constexpr):
    """y[n] (+)= Σ_k W[n, k] x[k] over this program's rows and its part of K (ITERS steps of BLOCK_K columns);
    fp32 accumulation. With SPLIT_K > 1, y is an fp32 buffer the parts add into."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    k_start, k_end = _k_part(K, BLOCK_K, ITERS)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for i in range(0, ITERS):
        cols = k_start + i * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=row_ok)
    else:
        tl.atomic_add(y_ptr + rows, out, mask=row_ok)


def _split_k_output(x: torch.Tensor, shape: tuple[int, ...], split_k: int) -> torch.Tensor:
    """The kernels' output: in x's dtype, or a zeroed fp32 buffer that split-K parts add into."""
    if split_k > 1:
        return torch.zeros(shape, dtype=torch.float32, device=x.device)
    return torch.empty(shape, dtype=x.dtype, device=x.device)


def _split_k_steps(k: int, split_k: int, block_k: int) -> int:
    """BLOCK_K steps a split-K part takes (a constant of the kernel: one compiled kernel per shape)."""
    return triton.cdiv(triton.cdiv(k, split_k), block_k)


def triton_gemv(x: torch.Tensor, w: torch.Tensor, config: tuple[int, int, int, int]) -> torch.Tensor:
    """x [K] (one row), w [N, K] row-major → y [N] in x's dtype."""
    block_n, block_k, split_k, warps = config
    n, k = w.shape
    y = _split_k_output(x, (n,), split_k)
    gemv_kernel[(triton.cdiv(n, block_n), split_k)](
        x, w, y, n, k, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        ITERS=_split_k_steps(k, split_k, block_k), num_warps=warps)
    return y.to(x.dtype)


@triton.jit
def skinny_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, ITERS: tl.constexpr):
    """Y[:, n] (+)= X W[n]ᵀ for all M (≤ BLOCK_M) rows of X over this program's BLOCK_N outputs and its part of
    K: each weight tile is read once for every row (tensor-core dots, fp32 accumulation). With SPLIT_K > 1, Y
    is an fp32 buffer the parts add into."""
    rows = tl.arange(0, BLOCK_M)
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    out_ok = outs < N
    k_start, k_end = _k_part(K, BLOCK_K, ITERS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, ITERS):
        ks = k_start + i * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + outs[None, :].to(tl.int64) * stride_w + ks[:, None],
                    mask=out_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc)
    offsets = y_ptr + rows[:, None] * stride_y + outs[None, :]
    if SPLIT_K == 1:
        tl.store(offsets, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])
    else:
        tl.atomic_add(offsets, acc, mask=row_ok[:, None] & out_ok[None, :])


# (BLOCK_N outputs per program, BLOCK_K, SPLIT_K, num_warps) of the skinny GEMM (M rows, M ≤ 64).
SKINNY_CONFIGS = [(bn, bk, sk, 4) for bn in (64, 128) for bk in (128, 256) for sk in (1, 2, 4)]


def triton_skinny(x: torch.Tensor, w: torch.Tensor, config: tuple[int, int, int, int]) -> torch.Tensor:
    """x [M, K] (rows contiguous, M ≤ 64), w [N, K] row-major → y [M, N] in x's dtype."""
    block_n, block_k, split_k, warps = config
    m, k = x.shape
    n = w.shape[0]
    y = _split_k_output(x, (m, n), split_k)
    skinny_kernel[(triton.cdiv(n, block_n), split_k)](
        x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, ITERS=_split_k_steps(k, split_k, block_k),
        num_warps=warps)
    return y.to(x.dtype)


def graph_seconds(step: Callable[[int], object], repeats: int, library: str = "cublas") -> float:
    """Median seconds of one call, from replays of a graph of ``repeats`` calls on distinct weights."""
    with blas_library(library):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(repeats):
                step(i)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(repeats):
                step(i)
    graph.replay()
    return statistics.median(cuda_seconds(graph.replay, REPLAYS)) / repeats


def close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """y against an fp32 product, for x one row [K] or rows [M, K]."""
    reference = F.linear(x.float(), w.float())
    return bool(torch.allclose(y.float(), reference, atol=2e-2, rtol=2e-2))


def check(device: str) -> int:
    """The kernel's arithmetic on small shapes (on a CPU: under TRITON_INTERPRET=1)."""
    gen = torch.Generator().manual_seed(0)
    failures = 0
    for n, k in [(24, 64), (33, 100), (8, 256)]:
        w = torch.randn(n, k, generator=gen).to(device=device, dtype=torch.bfloat16)
        x = torch.randn(k, generator=gen).to(device=device, dtype=torch.bfloat16)
        for config in [(4, 32, 1, 4), (8, 64, 2, 4), (16, 32, 3, 4)]:
            ok = close(triton_gemv(x, w, config), x, w)
            failures += not ok
            print(f"N={n} K={k} config={config}: {'ok' if ok else 'WRONG'}")
        for m in (3, 32):
            # fp32: the interpreter's dots do not take bf16 (timing runs check bf16 results on the GPU)
            xs, wf = torch.randn(m, k, generator=gen).to(device), w.float()
            for config in [(16, 32, 1, 4), (32, 64, 2, 4), (16, 32, 3, 4)]:
                ok = close(triton_skinny(xs, wf, config), xs, wf)
                failures += not ok
                print(f"M={m} N={n} K={k} skinny config={config}: {'ok' if ok else 'WRONG'}")
    return 1 if failures else 0


def measure(models: list[str], repeats: int, m: int = 1) -> int:
    """Each projection at M rows of x (the decode step at batch M) on cuBLAS, cuBLASLt and a Triton kernel: the
    GEMV for one row, else the skinny GEMM, which reads each weight tile once for all rows; the best config."""
    if m == 1:
        configs, label = CONFIGS, "Triton"

        def kernel(x, w, config):
            return triton_gemv(x[0], w, config)[None]
    else:
        configs, label, kernel = SKINNY_CONFIGS, "Triton skinny", triton_skinny
    print(f"copy bandwidth: {copy_bandwidth() / 1e9:,.0f} GB/s (device-to-device copies of 1 GiB, read + write)")
    print(f"| model | projection | M × N × K | cuBLAS µs (GB/s) | cuBLASLt µs (GB/s) | {label} µs (GB/s) "
          "| best config |\n|---|---|---|---|---|---|---|")
    for model in models:
        for name, n, k in SHAPES[model]:
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(repeats)]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            gb = n * k * 2 / 1e9  # the weight's bytes: what bounds a step at small M
            cells = []
            for library in ("cublas", "cublaslt"):
                seconds = graph_seconds(lambda i, x=x, ws=weights: F.linear(x, ws[i]), repeats, library)
                cells.append(f"{seconds * 1e6:.1f} ({gb / seconds:,.0f})")
            best: tuple[float, tuple[int, int, int, int]] | None = None
            for config in configs:
                if not close(kernel(x, weights[0], config), x, weights[0]):
                    print(f"{model} {name} {config}: WRONG result", file=sys.stderr)
                    continue
                seconds = graph_seconds(lambda i, c=config, x=x, ws=weights: kernel(x, ws[i], c), repeats)
                if best is None or seconds < best[0]:
                    best = (seconds, config)
            triton_cell = f"{best[0] * 1e6:.1f} ({gb / best[0]:,.0f})" if best else "–"
            print(f"| {model} | {name} | {m} × {n:,} × {k:,} | {cells[0]} | {cells[1]} | {triton_cell} | "
                  f"{best[1] if best else '–'} |", flush=True)
    return 0


# (projection, fused form) of the batch-1 GEMV step (DecodeStepRunner._forward_gemv), per model.
FUSED_FORMS = [("qkvu", "norm"), ("out_proj", "residual"), ("l1/l2", "glu"), ("l3", "residual"), ("lm_head", "norm")]


def measure_fused(models: list[str], repeats: int, rows: int = 1) -> int:
    """Each projection of the GEMV step in its fused form (``tnlora.ops.gemv.gemv``) against the same form
    without fusion (the plain ``gemv``) and against the layer forwards' composition on cuBLASLt (the norm
    kernel, the GEMM(s), the product or the add); µs per call and the weights' GB/s. ``rows`` above 1: x of
    that many rows (the rows kernel, its launches from ``ROWS_TUNED``)."""
    from tnlora.ops.gemv import gemv
    from tnlora.ops.norm import add_rms_norm

    eps = 1e-6
    lead = () if rows == 1 else (rows,)
    print("| model | rows | projection | fused form | composition on cuBLASLt µs | plain gemv µs | fused gemv µs "
          "(GB/s) |\n|---|---|---|---|---|---|---|")
    for model in models:
        shapes = {name: (n, k) for name, n, k in SHAPES[model]}
        for name, form in FUSED_FORMS:
            n, k = shapes[name]
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(repeats)]
            ws2 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(repeats)]
            x = torch.randn(*lead, k, device="cuda", dtype=torch.bfloat16)
            residual = torch.randn(*lead, n, device="cuda", dtype=torch.bfloat16)
            if form == "norm":
                def composed(i, x=x, ws=ws):
                    return F.linear(add_rms_norm(x[None], None, eps)[1], ws[i])

                def fused(i, x=x, ws=ws):
                    return gemv(x, ws[i], norm_eps=eps)
            elif form == "glu":
                def composed(i, x=x, ws=ws, ws2=ws2):
                    normed = add_rms_norm(x[None], None, eps)[1]
                    return F.linear(normed, ws[i]) * F.linear(normed, ws2[i])

                def fused(i, x=x, ws=ws, ws2=ws2):
                    return gemv(x, ws[i], weight2=ws2[i], norm_eps=eps)
            else:
                def composed(i, x=x, ws=ws, residual=residual):
                    return residual + F.linear(x[None], ws[i])

                def fused(i, x=x, ws=ws, residual=residual):
                    return gemv(x, ws[i], residual=residual)
            gb = n * k * 2 * (2 if form == "glu" else 1) / 1e9
            composed_s = graph_seconds(composed, repeats, "cublaslt")
            plain_s = graph_seconds(lambda i, x=x, ws=ws: gemv(x, ws[i]), repeats) * (2 if form == "glu" else 1)
            fused_s = graph_seconds(fused, repeats)
            print(f"| {model} | {rows} | {name} | {form} | {composed_s * 1e6:.1f} | {plain_s * 1e6:.1f}"
                  f"{' (two)' if form == 'glu' else ''} | {fused_s * 1e6:.1f} ({gb / fused_s:,.0f}) |", flush=True)
    return 0


# (projection, form) of the GEMV step's kernels, and the launches tried for each (rows × columns per program
# kept ≤ 8,192 values: the tile accumulator lives in registers).
SWEEP_FORMS = [("qkvu", "norm"), ("out_proj", "gated"), ("l1/l2", "glu"), ("l1/l2", "norm"), ("l3", "residual"),
               ("lm_head", "norm")]
SWEEP_CONFIGS = [(bn, bk, warps, stages, row_sum) for bn in (2, 4, 8, 16) for bk in (256, 512, 1024)
                 if bn * bk <= 8192 for warps in (4, 8) for stages in (1, 3) for row_sum in (False, True)]


def _sweep_case(model: str, name: str, form: str, repeats: int) -> tuple[Callable, Callable]:
    """A call ``(i, config, pdl) -> y`` of one form at one shape on the i-th of ``repeats`` weights, and the
    model's composition ``(i) -> y`` it is checked against."""
    from tnlora.ops.gemv import GemvConfig, gemv, gemv_reference

    n, k = {p: (n, k) for p, n, k in SHAPES[model]}[name]
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(repeats)]
    ws2 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(repeats)] if form == "glu" else []
    x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    options = {"norm": {"norm_eps": 1e-6}, "gated": {"norm_eps": 1e-6, "gate": gate, "residual": residual},
               "residual": {"residual": residual}, "glu": {"norm_eps": 1e-6}}[form]

    def operands(i: int) -> dict:
        return {**options, "weight2": ws2[i]} if ws2 else options

    def call(i: int, config: tuple, pdl: bool = False) -> torch.Tensor:
        return gemv(x, ws[i], config=GemvConfig(*config), pdl=pdl, **operands(i))

    def reference(i: int) -> torch.Tensor:
        return gemv_reference(x, ws[i], **operands(i))

    return call, reference


def _sweep_compile(part: int, parts: int, models: list[str]) -> int:
    """Compile this worker's share of the sweep's kernels (one call each), so that the timing process finds
    them in Triton's cache."""
    calls = 0
    for model in models:
        for name, form in SWEEP_FORMS:
            call, _ = _sweep_case(model, name, form, 1)
            for j, config in enumerate(SWEEP_CONFIGS):
                if j % parts == part:
                    call(0, config)
                    calls += 1
    torch.cuda.synchronize()
    return calls


def measure_sweep(models: list[str], repeats: int, workers: int) -> int:
    """Per form and shape of the GEMV step: the default launch (``gemv_config``), the best of SWEEP_CONFIGS,
    and that launch as programmatic dependent launches (each call's first weight tile read while the call
    before finishes; a graph of ``repeats`` calls in a row, as in the step). µs per call in CUDA graphs."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tnlora.ops.gemv import gemv_config, pdl_supported

    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        compiled = sum(pool.map(_sweep_compile, range(workers), [workers] * workers, [models] * workers))
    print(f"compiled {compiled} kernels in {workers} processes", flush=True)
    print("| model | projection | form | default µs (config) | best µs (GB/s) | best config | best, dependent "
          "launches µs |\n|---|---|---|---|---|---|---|")
    for model in models:
        shapes = {p: (n, k) for p, n, k in SHAPES[model]}
        for name, form in SWEEP_FORMS:
            n, k = shapes[name]
            call, reference = _sweep_case(model, name, form, repeats)
            gb = n * k * 2 * (2 if form == "glu" else 1) / 1e9
            default = tuple(gemv_config(n, k, glu=form == "glu"))
            times = {}
            for config in dict.fromkeys([default, *SWEEP_CONFIGS]):
                times[config] = graph_seconds(lambda i, c=config, f=call: f(i, c), repeats)
            best = min(times, key=times.get)
            want = reference(0).float()
            if not torch.allclose(call(0, best).float(), want, atol=2e-2 * want.abs().max().item(), rtol=2e-2):
                print(f"{model} {name} {form} {best}: WRONG result", file=sys.stderr)
            dependent = "–"
            if pdl_supported("cuda"):
                dependent = f"{graph_seconds(lambda i, c=best, f=call: f(i, c, True), repeats) * 1e6:.1f}"
            print(f"| {model} | {name} | {form} | {times[default] * 1e6:.1f} {default} | {times[best] * 1e6:.1f} "
                  f"({gb / times[best]:,.0f}) | {best} | {dependent} |", flush=True)
    return 0


def _glu_row(model: str, repeats: int, rows: int) -> str:
    """One model's row of :func:`measure_glu`."""
    n, k = next((n, k) for name, n, k in SHAPES[model] if name == "l1/l2")
    stacked = [torch.randn(2 * n, k, device="cuda", dtype=torch.bfloat16) for _ in range(repeats)]
    firsts = [w[:n].clone() for w in stacked]
    seconds_ = [w[n:].clone() for w in stacked]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    branch = torch.cuda.Stream()

    def two(i: int) -> torch.Tensor:
        return F.linear(x, firsts[i]) * F.linear(x, seconds_[i])

    def side(i: int) -> torch.Tensor:
        main = torch.cuda.current_stream()
        branch.wait_stream(main)
        with torch.cuda.stream(branch):
            b = F.linear(x, seconds_[i])
        a = F.linear(x, firsts[i])
        main.wait_stream(branch)
        return a * b

    def one(i: int) -> torch.Tensor:
        both = F.linear(x, stacked[i])
        return both[:, :n] * both[:, n:]

    error = (one(0).float() - two(0).float()).abs().max().item()
    gb = 2 * n * k * 2 / 1e9
    cells = []
    for step in (two, side, one):
        seconds = graph_seconds(step, repeats, "cublaslt")
        cells.append(f"{seconds * 1e6:.1f} ({gb / seconds:,.0f})")
    return f"| {model} | {rows} × {n:,} × {k:,} | {' | '.join(cells)} | {error:.3g} |"


def measure_glu(models: list[str], repeats: int, rows: int) -> int:
    """The GLU's l1 and l2 at ``rows`` rows of x, each with the product l1(x) ⊙ l2(x), on cuBLASLt: two GEMMs one
    after the other, the two side by side on two streams (the decode graphs' branches), and one GEMM over the
    two weights stacked [2F, K] (one launch, twice the columns: the wide qkvu projection streams its weight
    faster than l1 or l2 alone, RESULTS.md "The batch-32 step"). µs a call and the weights' bytes ÷ time."""
    print(f"copy bandwidth: {copy_bandwidth() / 1e9:,.0f} GB/s (device-to-device copies of 1 GiB, read + write)")
    print("| model | M × F × K | two GEMMs µs (GB/s) | side by side µs (GB/s) | stacked µs (GB/s) | stacked − two, largest difference "
          "|\n|---|---|---|---|---|---|")
    for model in models:
        print(_glu_row(model, repeats, rows), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="7B,1B")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--check", action="store_true", help="check the kernel's results on small shapes only")
    parser.add_argument("--fused", action="store_true", help="time tnlora.ops.gemv's fused forms instead")
    parser.add_argument("--sweep", action="store_true", help="time tnlora.ops.gemv's launches per form instead")
    parser.add_argument("--workers", type=int, default=12, help="processes compiling the sweep's kernels")
    parser.add_argument("--glu", action="store_true", help="time the GLU's two projections: apart, side by side, "
                        "stacked")
    parser.add_argument("--rows", type=int, default=1,
                        help="rows of x (the decode batch); above 1: cuBLAS against a Triton skinny GEMM (with "
                             "--fused: the fused forms of that many rows)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="of --check")
    args = parser.parse_args()
    if args.check:
        return check(args.device)
    if not torch.cuda.is_available():
        print("gemv.py: timing needs a CUDA GPU (use --check on a CPU)", file=sys.stderr)
        return 2
    if args.sweep:
        return measure_sweep(args.models.split(","), args.repeats, args.workers)
    if args.glu:
        return measure_glu(args.models.split(","), args.repeats, args.rows)
    if args.fused:
        return measure_fused(args.models.split(","), args.repeats, args.rows)
    return measure(args.models.split(","), args.repeats, args.rows)


if __name__ == "__main__":
    sys.exit(main())
