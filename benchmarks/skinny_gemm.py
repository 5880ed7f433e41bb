"""The decode step's projections at small batch (GPU): y [M, N] = x [M, K] @ W [N, K]ᵀ, bf16, M = batch.

Usage: python benchmarks/skinny_gemm.py [--m 32] [--reps 20]

At M = 32 a projection is a weight read (W is 32–90 MB, x a few hundred KB), so the figure is the bandwidth
reached: weight bytes ÷ time, against the card's copy bandwidth (a device-to-device copy of the same bytes).
Each variant runs ``--reps`` projections on distinct weights (more bytes than L2 holds) inside one CUDA graph,
as in the decode step; the median of 20 replays. Variants: cuBLAS through ``F.linear`` (what the step runs),
the same with cuBLASLt preferred, and a Triton split-K kernel written here for the measurement, over a few
tile sizes (the best is printed).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# 7B projections: qkvu, out_proj, GLU l1 / l2, l3 (N, K); 1B: the same with 2,048 / 5,632.
SHAPES = {"qkvu": (16384, 4096), "out_proj": (4096, 4096), "l1": (11008, 4096), "l3": (4096, 11008)}


@triton.jit
def _splitk_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, stride_os,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * span, tl.minimum(K, (pid_k + 1) * span), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
        acc += tl.dot(x, tl.trans(w))
    ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)


def splitk_linear(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, split_k: int, warps: int,
                  stages: int) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    block_m = max(16, triton.next_power_of_2(m))
    if split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        stride_s = 0
    else:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
        stride_s = out.stride(0)
    grid = (triton.cdiv(n, block_n), split_k)
    _splitk_kernel[grid](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(-2), stride_s,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                         num_warps=warps, num_stages=stages)
    return out if split_k == 1 else out.sum(0).to(x.dtype)


def time_graph(fn, reps: int) -> float:
    """Median microseconds of one call of ``fn(i)`` (i = 0 … reps−1), replayed as one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(reps):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    times = []
    for _ in range(21):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / reps)
    return statistics.median(times[1:])


def measure(name: str, n: int, k: int, m: int, reps: int) -> str:
    """One table row: cuBLAS, cuBLASLt and the best Triton split-K config for W [n, k], M = m."""
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(reps)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    dst = [torch.empty_like(w) for w in ws[:2]]
    gb = n * k * 2 / 1e9
    copy_us = time_graph(lambda i: dst[i % 2].copy_(ws[i]), reps)
    want = x.float() @ ws[0].float().t()
    cublas = time_graph(lambda i: F.linear(x, ws[i]), reps)
    torch.backends.cuda.preferred_blas_library("cublaslt")
    lt = time_graph(lambda i: F.linear(x, ws[i]), reps)
    torch.backends.cuda.preferred_blas_library("cublas")
    best = (float("inf"), "")
    for block_n in (32, 64):
        for block_k in (128, 256):
            for split_k in (1, 2, 4):
                for warps, stages in ((4, 4), (8, 3)):
                    cfg = (block_n, block_k, split_k, warps, stages)
                    try:
                        got = splitk_linear(x, ws[0], *cfg).float()
                        err = ((got - want).abs().max() / want.abs().max()).item()
                        if err > 2e-2:
                            print(name, cfg, "wrong", err)
                            continue
                        us = time_graph(lambda i, cfg=cfg: splitk_linear(x, ws[i], *cfg), reps)
                    except Exception as exc:  # a config Triton cannot build (shared memory, ...)
                        print(name, cfg, type(exc).__name__)
                        continue
                    if us < best[0]:
                        best = (us, f"BN {block_n} BK {block_k} split {split_k} warps {warps} stages {stages}")
    return (f"| {name} {n} x {k} | {m} | {cublas:.1f} ({gb / cublas * 1e6:,.0f}) | {lt:.1f} "
            f"({gb / lt * 1e6:,.0f}) | {best[0]:.1f} ({gb / best[0] * 1e6:,.0f}) | {best[1]} | "
            f"{2 * gb / copy_us * 1e6:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--reps", type=int, default=12)
    opts = parser.parse_args()
    torch.manual_seed(0)
    print(f"card {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    rows = ["| shape (N x K) | M | cuBLAS us (GB/s) | cuBLASLt us (GB/s) | Triton split-K best us (GB/s) | config | "
            "copy GB/s |", "|---|---|---|---|---|---|---|"]
    for name, (n, k) in SHAPES.items():
        rows.append(measure(name, n, k, opts.m, opts.reps))
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
