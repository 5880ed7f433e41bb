"""LoRA's dropout without the dropped input in memory: the mask drawn inside the kernels from a seed.

peft's LoRA computes B(A(drop(x))) · s. PyTorch's dropout writes drop(x) and its kept-mask (3 bytes an element),
the adapter's GEMM reads drop(x) again, the backward reads it for dA and passes g A through the mask in one more
kernel: about 10 bytes an element of every adapted layer's input beyond the products themselves (at 7B, 8 × 1,024
tokens, ~5 % of a training step), and the dropped inputs stay in memory until the backward. Here one seed a
layer call (an int64 tensor drawn from PyTorch's generator on the input's device, so a checkpointed recompute
that restores the random state draws it again) defines the mask, which the forward's kernel draws tile by tile
and keeps as bits (one byte a group of 8 columns: 1/16 of x's bf16 bytes) for the backward's two:

- :func:`dropout_down`: h = (x ⊙ keep) Aᵀ, reading x once, and the mask's bits (the forward);
- :func:`dropout_grad_a`: gᵀ (x ⊙ keep), reading x and the bits once (the backward's dA);
- :func:`dropout_up`: (g A) ⊙ keep, written once or added to a tensor in place (the backward's share of dx).

Drawing the mask again in each backward kernel instead of reading bits made those kernels slower than PyTorch's
(Philox's integer work at every element, three times; benchmarks/RESULTS.md).

The mask (:func:`keep_mask_reference`, and :func:`keep_mask` from the kernels' own generator): element (t, c) of a
[T, K] input is kept where the 16-bit half c mod 2 of word (c mod 8) // 2 of Philox4x32-10(key = seed, counter =
t · ⌈K/8⌉ + c // 8) is ≥ round(p · 65536): one draw a row and group of 8 columns, so the rate of dropping is p to
within 2⁻¹⁷. The kept values are scaled by 1/(1 − p) as PyTorch's dropout scales them (the factor is folded into
A or the result here). The draw is not PyTorch's own: the same seed gives other masks than ``F.dropout`` would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# The splits of a reduction give every SM several programs, as tnlora.ops.lora_grad's.
PROGRAMS_PER_SM = 4


@dataclass(frozen=True)
class Launch:
    """A kernel's launch: the tile (``block_t`` rows of x by ``block_k`` columns, a multiple of 8), warps and
    pipeline stages a program (``benchmarks/lora_dropout.py --sweep`` tries others). The mask does not depend on
    it."""

    block_t: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
# Philox4x32's constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), as Triton uses.
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_MASK32 = np.uint64(0xFFFFFFFF)


def keep_threshold(p: float) -> int:
    """The 16-bit threshold of dropping rate ``p`` (0 ≤ p < 1): a half below it is dropped."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {p}")
    return min(65535, round(p * 65536))


def draw_seed(device: torch.device | str) -> Tensor:
    """One int64 seed on ``device`` from PyTorch's generator there (no host sync on CUDA)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _philox4x32(counter: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 of counters (c0, c1) = the low and high words of ``counter`` (uint64), (c2, c3) = 0, key = the
    low and high words of ``seed``: four uint32 words (as uint64 arrays)."""
    c0 = counter & _MASK32
    c1 = counter >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    a, b = np.uint64(_ROUND_A), np.uint64(_ROUND_B)
    for _ in range(_ROUNDS):
        pa, pb = a * c0, b * c2  # exact: both factors < 2**32
        c0, c1, c2, c3 = (
            (pb >> np.uint64(32)) ^ c1 ^ np.uint64(k0),
            pb & _MASK32,
            (pa >> np.uint64(32)) ^ c3 ^ np.uint64(k1),
            pa & _MASK32,
        )
        k0, k1 = (k0 + _KEY_A) & 0xFFFFFFFF, (k1 + _KEY_B) & 0xFFFFFFFF
    return c0, c1, c2, c3


def keep_mask_reference(seed: int | Tensor, rows: int, cols: int, p: float) -> Tensor:
    """The kept-mask ([rows, cols] bool, on the CPU) of ``seed`` and rate ``p``, as the module's docstring defines
    it: Philox in NumPy, independent of the kernels."""
    seed = int(seed.item()) if isinstance(seed, Tensor) else int(seed)
    groups = -(-cols // 8)
    counter = (np.arange(rows, dtype=np.uint64)[:, None] * np.uint64(groups) + np.arange(groups, dtype=np.uint64))
    words = _philox4x32(counter, seed)
    halves = np.stack([h for w in words for h in (w & np.uint64(0xFFFF), w >> np.uint64(16))], axis=-1)
    kept = halves.reshape(rows, groups * 8)[:, :cols] >= keep_threshold(p)
    return torch.from_numpy(np.ascontiguousarray(kept))


def _grid_span(length: int, block: int, other_programs: int, processors: int, largest: int) -> int:
    """The span (a power of two of ``block``, at most ``largest``) one program walks along a dimension of
    ``length``, the fewest steps that still give about PROGRAMS_PER_SM programs a processor beside
    ``other_programs`` along the other dimension."""
    wanted = -(-PROGRAMS_PER_SM * processors // max(1, other_programs))
    span = largest
    while span > block and -(-length // span) < wanted:
        span //= 2
    return span


def _processors(t: Tensor) -> int:
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 8


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rank_block(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())


def _rows(t: Tensor, name: str, width: int | None = None) -> Tensor:
    if t.dim() != 2 or (width is not None and t.shape[1] != width):
        raise ValueError(f"{name} must be 2-D{'' if width is None else f' with {width} columns'}, got {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def unpack_keep(bits: Tensor, cols: int) -> Tensor:
    """The kept-mask [T, cols] (bool) of its bits [T, ⌈cols/8⌉] (uint8; bit s of byte j: column 8j + s)."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.int32)
    kept = (bits.to(torch.int32)[:, :, None] >> shifts) & 1
    return kept.reshape(bits.shape[0], -1)[:, :cols].bool()


def keep_mask(seed: Tensor, rows: int, cols: int, p: float, launch: Launch = Launch()) -> Tensor:
    """The kept-mask ([rows, cols] bool, on ``seed``'s device) from the kernels' generator."""
    from tnlora.ops.lora_dropout_triton import keep_bits_kernel

    groups = -(-cols // 8)
    bits = torch.empty((rows, groups), dtype=torch.uint8, device=seed.device)
    grid = (-(-rows // launch.block_t), -(-cols // launch.block_k))
    keep_bits_kernel[grid](
        seed, bits, rows, groups, keep_threshold(p), BLOCK_T=launch.block_t, BLOCK_K=launch.block_k
    )
    return unpack_keep(bits, cols)


def dropout_down(
    x: Tensor, lora_a: Tensor, seed: Tensor, p: float, launch: Launch = Launch()
) -> tuple[Tensor, Tensor]:
    """((x ⊙ keep) Aᵀ [T, r] in x's dtype, the mask's bits [T, ⌈K/8⌉] uint8) for x [T, K], A [r, K] (scale
    folded into A by the caller)."""
    from tnlora.ops.lora_dropout_triton import dropout_down_kernel

    x = _rows(x, "x")
    rows, cols = x.shape
    lora_a = _rows(lora_a, "lora_a", cols)
    rank = lora_a.shape[0]
    block_t, block_k = launch.block_t, launch.block_k
    row_programs = -(-rows // block_t)
    span = _grid_span(cols, block_k, row_programs, _processors(x), max(block_k, 1 << (cols - 1).bit_length()))
    splits = -(-cols // span)
    part = torch.empty((splits, rows, rank), dtype=_acc_dtype(x), device=x.device)
    bits = torch.empty((rows, -(-cols // 8)), dtype=torch.uint8, device=x.device)
    dropout_down_kernel[(row_programs, splits)](
        x, lora_a, part, bits, seed, rows, cols, rank, x.stride(0), lora_a.stride(0), -(-cols // 8), keep_threshold(p),
        COLS_PER_PROGRAM=span, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_R=_rank_block(rank),
        FP64=x.dtype == torch.float64, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    return (part[0] if splits == 1 else part.sum(0)).to(x.dtype), bits


def _bits_of(bits: Tensor, rows: int, cols: int) -> Tensor:
    if bits.dtype != torch.uint8 or tuple(bits.shape) != (rows, -(-cols // 8)) or not bits.is_contiguous():
        raise ValueError(f"bits must be contiguous uint8 [{rows}, {-(-cols // 8)}], got {bits.dtype} {tuple(bits.shape)}")
    return bits


def dropout_grad_a(g: Tensor, x: Tensor, bits: Tensor, scale: float, launch: Launch = Launch()) -> Tensor:
    """``scale`` · gᵀ (x ⊙ keep) [r, K] for g [T, r], x [T, K] and the mask's ``bits`` (:func:`dropout_down`), in
    x's dtype (summed in fp32, fp64 for fp64)."""
    from tnlora.ops.lora_dropout_triton import dropout_grad_a_kernel

    x = _rows(x, "x")
    rows, cols = x.shape
    g = _rows(g, "g")
    if g.shape[0] != rows:
        raise ValueError(f"g and x must have the same rows, got {tuple(g.shape)} and {tuple(x.shape)}")
    rank = g.shape[1]
    bits = _bits_of(bits, rows, cols)
    block_t, block_k = launch.block_t, launch.block_k
    col_programs = -(-cols // block_k)
    span = _grid_span(rows, block_t, col_programs, _processors(x), max(block_t, 4096))
    row_programs = -(-rows // span)
    part = torch.empty((row_programs, rank, cols), dtype=_acc_dtype(x), device=x.device)
    dropout_grad_a_kernel[(col_programs, row_programs)](
        g, x, part, bits, rows, cols, rank, g.stride(0), x.stride(0), -(-cols // 8), ROWS_PER_PROGRAM=span, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_R=_rank_block(rank),
        FP64=x.dtype == torch.float64, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    return (part[0] if row_programs == 1 else part.sum(0)).mul_(scale).to(x.dtype)


def dropout_up(
    g: Tensor, lora_a: Tensor, bits: Tensor, out: Tensor | None = None, launch: Launch = Launch()
) -> Tensor:
    """(g A) ⊙ keep [T, K] for g [T, r], A [r, K] (scale folded into A by the caller) and the mask's ``bits``
    (:func:`dropout_down`): a new tensor in g's dtype, or added to ``out`` in place (one rounding of the sum) and
    ``out`` returned."""
    from tnlora.ops.lora_dropout_triton import dropout_up_kernel

    g = _rows(g, "g")
    rows, rank = g.shape
    lora_a = _rows(lora_a, "lora_a")
    if lora_a.shape[0] != rank:
        raise ValueError(f"g has rank {rank}, lora_a {tuple(lora_a.shape)}")
    cols = lora_a.shape[1]
    bits = _bits_of(bits, rows, cols)
    accumulate = out is not None
    if out is None:
        out = torch.empty((rows, cols), dtype=g.dtype, device=g.device)
    elif tuple(out.shape) != (rows, cols) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{rows}, {cols}] with unit column stride, got {tuple(out.shape)}")
    grid = (-(-rows // launch.block_t), -(-cols // launch.block_k))
    dropout_up_kernel[grid](
        g, lora_a, out, bits, rows, cols, rank, g.stride(0), lora_a.stride(0), out.stride(0), -(-cols // 8),
        ACCUMULATE=accumulate, BLOCK_T=launch.block_t, BLOCK_K=launch.block_k,
        BLOCK_R=_rank_block(rank), FP64=g.dtype == torch.float64, num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )  # fmt: skip
    return out


__all__ = [
    "Launch",
    "draw_seed",
    "dropout_down",
    "dropout_grad_a",
    "dropout_up",
    "keep_mask",
    "keep_mask_reference",
    "keep_threshold",
    "unpack_keep",
]
