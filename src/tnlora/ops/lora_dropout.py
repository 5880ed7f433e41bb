"""LoRA's dropout without the dropped input: the kernels read x and a mask of one byte an element.

peft's LoRA computes B(A(drop(x))) · s. PyTorch's dropout reads x and writes drop(x) and its kept-mask (5 bytes an
element of bf16 x), the adapter's GEMM reads drop(x), the backward reads it again for dA and passes g A through
the mask in a kernel of its own (g A written, read with the mask, written again): about 10 bytes an element of
every adapted layer's input beyond the products themselves (at 7B, 8 × 1,024 tokens, ~5 % of a training step),
and drop(x) stays in memory until the backward. Here the mask is drawn by PyTorch's generator as one byte an
element (``Tensor.bernoulli_``: a checkpointed recompute that restores the random state draws it again), and
three Triton kernels apply it where the products read x:

- :func:`dropout_down`: h = (x ⊙ keep) Aᵀ, reading x and the mask once (the forward);
- :func:`dropout_grad_a`: gᵀ (x ⊙ keep), reading x and the mask once (the backward's dA);
- :func:`dropout_up`: (g A) ⊙ keep, written once or added to a tensor in place (the backward's share of dx).

The 1/(1 − p) of the kept values is folded into A or the result by the caller. The mask is a Bernoulli draw of
its own, not the one ``F.dropout`` makes from the same generator state.

The mask was first drawn inside the kernels (Philox from one seed a call), again in each backward kernel (the
huanhuan step +1.7 % on an H100: Philox's integer work kept the backward's kernels slower than PyTorch's), then
once and kept as bits (−7 % on an H200: unpacking bits into the tile's layout). This form ties with PyTorch's
dropout in the 7B huanhuan step (−1.0 % and −0.2 % on an H100) and keeps 1.9 GiB less at the peak: an opt-in
(``dropout_kernel="triton"``) for memory, not the default (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tnlora.ops.lora_grad import PROGRAMS_PER_SM, processor_count, program_span, rank_block


@dataclass(frozen=True)
class Launch:
    """A kernel's launch: the tile (``block_t`` rows of x by ``block_k`` columns), warps and pipeline stages a
    program (``benchmarks/lora_dropout.py --sweep`` tries others)."""

    block_t: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3


# dA reduces over the rows: taller tiles halved its time on the H200 (benchmarks/lora_dropout.py --sweep).
GRAD_A_LAUNCH = Launch(block_t=128)
# fp64 (the tests) sums broadcast products in registers instead of a tensor-core product: small tiles.
FP64_LAUNCH = Launch(block_t=16, block_k=32, num_stages=1)


def draw_keep(x: Tensor, p: float) -> Tensor:
    """The kept-mask of ``x`` [T, K] at dropping rate ``p``: uint8 [T, K], 1 = kept, from PyTorch's generator on x's
    device."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {p}")
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device).bernoulli_(1.0 - p)


def _split_span(t: Tensor, length: int, block: int, largest: int, other_programs: int) -> int:
    """The span a program walks along a reduced dimension of ``length``: splits enough that, beside
    ``other_programs`` along the other dimension, every SM of ``t``'s device gets about PROGRAMS_PER_SM programs
    (as :func:`tnlora.ops.lora_grad.launch_grid` splits its rows)."""
    return program_span(length, block, largest, -(-PROGRAMS_PER_SM * processor_count(t) // max(1, other_programs)))


def _rows(t: Tensor, name: str, width: int | None = None) -> Tensor:
    if t.dim() != 2 or (width is not None and t.shape[1] != width):
        raise ValueError(f"{name} must be 2-D{'' if width is None else f' with {width} columns'}, got {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def _keep_of(keep: Tensor | None, rows: int, cols: int) -> Tensor | None:
    if keep is None:
        return None
    if keep.dtype != torch.uint8 or tuple(keep.shape) != (rows, cols):
        raise ValueError(f"keep must be uint8 [{rows}, {cols}], got {keep.dtype} {tuple(keep.shape)}")
    return keep if keep.stride(-1) == 1 else keep.contiguous()


def _or(keep: Tensor | None, stand_in: Tensor) -> Tensor:
    """The mask, or a tensor standing in for its pointer where there is none (the kernels then never read it)."""
    return stand_in if keep is None else keep


def _stride(keep: Tensor | None) -> int:
    return 0 if keep is None else keep.stride(0)


def _launch(t: Tensor, launch: Launch | None, default: Launch) -> Launch:
    if launch is not None:
        return launch
    return FP64_LAUNCH if t.dtype == torch.float64 else default


def dropout_down(x: Tensor, keep: Tensor | None, lora_a: Tensor, launch: Launch | None = None) -> Tensor:
    """(x ⊙ keep) Aᵀ [T, r] in x's dtype for x [T, K], its mask ``keep`` (:func:`draw_keep`; None: x Aᵀ) and A [r, K]
    (the scale folded in by the caller); summed in fp32 (fp64 for fp64)."""
    from tnlora.ops.lora_dropout_triton import dropout_down_kernel

    x = _rows(x, "x")
    rows, cols = x.shape
    keep = _keep_of(keep, rows, cols)
    lora_a = _rows(lora_a, "lora_a", cols)
    rank = lora_a.shape[0]
    launch = _launch(x, launch, Launch())
    row_programs = -(-rows // launch.block_t)
    largest = max(launch.block_k, 1 << (cols - 1).bit_length())
    span = _split_span(x, cols, launch.block_k, largest, row_programs)
    splits = -(-cols // span)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    part = torch.empty((splits, rows, rank), dtype=acc, device=x.device)
    dropout_down_kernel[(row_programs, splits)](
        x, _or(keep, x), lora_a, part, rows, cols, rank, x.stride(0), _stride(keep), lora_a.stride(0),
        COLS_PER_PROGRAM=span, BLOCK_T=launch.block_t, BLOCK_K=launch.block_k, BLOCK_R=rank_block(rank),
        FP64=x.dtype == torch.float64, HAS_KEEP=keep is not None, num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )  # fmt: skip
    return (part[0] if splits == 1 else part.sum(0)).to(x.dtype)


def dropout_grad_a(
    g: Tensor, x: Tensor, keep: Tensor | None, scale: float, launch: Launch | None = None
) -> Tensor:
    """``scale`` · gᵀ (x ⊙ keep) [r, K] in x's dtype for g [T, r], x [T, K] and its mask (None: gᵀ x); summed in fp32
    (fp64 for fp64)."""
    from tnlora.ops.lora_dropout_triton import dropout_grad_a_kernel

    x = _rows(x, "x")
    rows, cols = x.shape
    g = _rows(g, "g")
    if g.shape[0] != rows:
        raise ValueError(f"g and x must have the same rows, got {tuple(g.shape)} and {tuple(x.shape)}")
    keep = _keep_of(keep, rows, cols)
    rank = g.shape[1]
    launch = _launch(x, launch, GRAD_A_LAUNCH)
    col_programs = -(-cols // launch.block_k)
    span = _split_span(x, rows, launch.block_t, max(launch.block_t, 4096), col_programs)
    row_programs = -(-rows // span)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    part = torch.empty((row_programs, rank, cols), dtype=acc, device=x.device)
    dropout_grad_a_kernel[(col_programs, row_programs)](
        g, x, _or(keep, x), part, rows, cols, rank, g.stride(0), x.stride(0), _stride(keep), ROWS_PER_PROGRAM=span,
        BLOCK_T=launch.block_t, BLOCK_K=launch.block_k, BLOCK_R=rank_block(rank), FP64=x.dtype == torch.float64,
        HAS_KEEP=keep is not None, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    return (part[0] if row_programs == 1 else part.sum(0)).mul_(scale).to(x.dtype)


def dropout_up(
    g: Tensor, lora_a: Tensor, keep: Tensor | None, out: Tensor | None = None, launch: Launch | None = None
) -> Tensor:
    """(g A) ⊙ keep [T, K] for g [T, r], A [r, K] (the scale folded in by the caller) and the mask (None: g A): a new
    tensor in g's dtype, or added to ``out`` in place (one rounding of the sum) and ``out`` returned."""
    from tnlora.ops.lora_dropout_triton import dropout_up_kernel

    g = _rows(g, "g")
    rows, rank = g.shape
    lora_a = _rows(lora_a, "lora_a")
    if lora_a.shape[0] != rank:
        raise ValueError(f"g has rank {rank}, lora_a {tuple(lora_a.shape)}")
    cols = lora_a.shape[1]
    keep = _keep_of(keep, rows, cols)
    accumulate = out is not None
    if out is None:
        out = torch.empty((rows, cols), dtype=g.dtype, device=g.device)
    elif tuple(out.shape) != (rows, cols) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{rows}, {cols}] with unit column stride, got {tuple(out.shape)}")
    launch = _launch(g, launch, Launch())
    grid = (-(-rows // launch.block_t), -(-cols // launch.block_k))
    dropout_up_kernel[grid](
        g, lora_a, _or(keep, out), out, rows, cols, rank, g.stride(0), lora_a.stride(0), _stride(keep), out.stride(0),
        ACCUMULATE=accumulate, BLOCK_T=launch.block_t, BLOCK_K=launch.block_k, BLOCK_R=rank_block(rank),
        FP64=g.dtype == torch.float64, HAS_KEEP=keep is not None, num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )  # fmt: skip
    return out


__all__ = ["GRAD_A_LAUNCH", "Launch", "draw_keep", "dropout_down", "dropout_grad_a", "dropout_up"]
