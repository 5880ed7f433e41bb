"""The two products of a LoRA layer's backward that read the output gradient dy, from one read of it.

In the fused LoRA layer's backward (:mod:`tnlora.ops.lora`) dy [T, N] is read by the frozen weight's input
gradient dy W, and twice more by the adapter's rank-r products: g = dy B [T, r] (the gradient reaching the
adapter's hidden h) and dB = dyᵀ (s · h) [N, r]. Those two are memory-bound (r = 8 columns): at 131,072 tokens a
7B layer's dy is 12.2 GB over its five projections, each read at about the copy rate (benchmarks/RESULTS.md,
"Next rungs"). :func:`lora_dy_products` computes both from one pass over dy in a Triton kernel: each program
takes a block of rows and BLOCK_N columns and walks down its rows tile by tile, storing each tile's g over its
columns to a per-column-split fp32 partial and keeping its share of dB in registers; the partials are summed
after. Accumulation is in fp32 (fp64 for fp64 inputs), as cuBLAS accumulates; the sums are grouped differently,
so results equal the two GEMMs' up to rounding.

The fused LoRA layer's backward uses it with ``grad_kernel: "triton"`` (a ``FusedLoraLinear`` attribute; ``tnlora
bench train --lora_grad_kernel``), and with "auto" (the default) where dy holds
``tnlora.ops.lora.LORA_GRAD_MIN_ELEMENTS`` elements, on CUDA tensors. On an H200 it streams dy at 2.0–3.1 TB/s
against cuBLAS's 3.0–4.3 for two reads, so it wins where dy is large (7B at 65,536 and 131,072 rows: 18–30 % less
time; the widest projections at 16,384 and 32,768) and loses on the narrow projections of shorter micro-batches
(``benchmarks/lora_grad.py``, ``benchmarks/lora_products.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The default launch (Launch), the fastest summed over the 1B and 7B projections at 16,384 / 32,768 / 131,072
# rows of `benchmarks/lora_grad.py --sweep` on an H200 (8 % under the first choice of 32 × 512 tiles, 4 warps).
BLOCK_T = 64
BLOCK_N = 256
# The most rows one program walks; fewer where the card needs more programs (each row block adds a partial dB).
MAX_ROWS_PER_PROGRAM = 4096
# Programs per streaming multiprocessor the row blocks aim for, so that every SM has several to overlap.
PROGRAMS_PER_SM = 4


@dataclass(frozen=True)
class Launch:
    """The kernel's launch: the tile (``block_t`` rows by ``block_n`` columns), warps and pipeline stages a
    program, and the programs a processor the row blocks aim for (``benchmarks/lora_grad.py --sweep`` tries
    others)."""

    block_t: int = BLOCK_T
    block_n: int = BLOCK_N
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = PROGRAMS_PER_SM


def lora_dy_products_reference(dy: Tensor, lora_b: Tensor, hs: Tensor) -> tuple[Tensor, Tensor]:
    """PyTorch's two products: g = dy B [T, r] and dB = dyᵀ hs [N, r], for dy [T, N], B [N, r], hs [T, r]."""
    return dy @ lora_b, dy.t() @ hs


def launch_grid(rows: int, cols: int, processors: int, launch: Launch = Launch()) -> tuple[int, int, int]:
    """(row programs, column splits, rows a program): the columns in splits of ``launch.block_n``, the rows in
    blocks of the most rows (a power of two of ``block_t`` tiles, at most MAX_ROWS_PER_PROGRAM: the span is a
    compile-time constant of the kernel, so few compiled variants) that still give about ``programs_per_sm``
    programs a processor."""
    splits = max(1, -(-cols // launch.block_n))
    wanted = -(-launch.programs_per_sm * processors // splits)  # row programs
    rows_each = program_span(rows, launch.block_t, MAX_ROWS_PER_PROGRAM, wanted)
    return max(1, -(-rows // rows_each)), splits, rows_each


def program_span(length: int, block: int, largest: int, wanted: int) -> int:
    """The span one program walks along a dimension of ``length``: the largest power of two of ``block`` (at most
    ``largest``) that still gives ``wanted`` programs along it, or ``block``. Few compiled variants: the span is a
    compile-time constant of the kernels that walk it."""
    span = largest
    while span > block and -(-length // span) < wanted:
        span //= 2
    return span


def processor_count(t: Tensor) -> int:
    """The streaming multiprocessors of ``t``'s CUDA device; 8 for CPU tensors (Triton's CPU interpreter)."""
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 8


def rank_block(rank: int) -> int:
    """A rank-``rank`` operand's width in a kernel: the next power of two, at least 16 (``tl.dot``'s least)."""
    return max(16, _next_power_of_2(rank))


def lora_dy_products(dy: Tensor, lora_b: Tensor, hs: Tensor, launch: Launch = Launch()) -> tuple[Tensor, Tensor]:
    """g = dy B [T, r] and dB = dyᵀ hs [N, r] as :func:`lora_dy_products_reference`, reading dy once (CUDA tensors,
    or CPU ones under Triton's CPU interpreter); results in dy's dtype."""
    from tnlora.ops.lora_grad_triton import lora_dy_products_kernel

    if dy.dim() != 2 or lora_b.dim() != 2 or hs.dim() != 2:
        raise ValueError("dy, lora_b and hs must be 2-D ([T, N], [N, r], [T, r])")
    rows, cols = dy.shape
    rank = lora_b.shape[1]
    if lora_b.shape[0] != cols or tuple(hs.shape) != (rows, rank):
        raise ValueError(f"shapes do not match: dy {tuple(dy.shape)}, lora_b {tuple(lora_b.shape)}, hs {tuple(hs.shape)}")
    dy, lora_b, hs = (t if t.stride(-1) == 1 else t.contiguous() for t in (dy, lora_b, hs))
    fp64 = dy.dtype == torch.float64
    acc = torch.float64 if fp64 else torch.float32
    row_programs, splits, rows_each = launch_grid(rows, cols, processor_count(dy), launch)
    g_part = torch.empty((splits, rows, rank), dtype=acc, device=dy.device)
    db_part = torch.empty((row_programs, cols, rank), dtype=acc, device=dy.device)
    lora_dy_products_kernel[(row_programs, splits)](
        dy, lora_b, hs, g_part, db_part, dy.stride(0), lora_b.stride(0), hs.stride(0), rows, cols, rank,
        rows_each, FP64=fp64, BLOCK_T=launch.block_t, BLOCK_N=launch.block_n,
        BLOCK_R=rank_block(rank), num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    return g_part.sum(0).to(dy.dtype), db_part.sum(0).to(dy.dtype)


def _next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n (n ≥ 1)."""
    return 1 << (n - 1).bit_length()


__all__ = ["Launch", "launch_grid", "lora_dy_products", "lora_dy_products_reference"]
