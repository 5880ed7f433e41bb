"""The backward of TNL's GLU product h = y₁ ⊙ y₂ with its two adapters' products of the gradients it writes.

Where the GLU's ``l1`` and ``l2`` are adapted layers (:func:`tnlora.ops.lora.lora_glu`), the product's backward
writes dy₁ = dm ⊙ y₂ and dy₂ = dm ⊙ y₁ ([T, N] each, N the GLU's width), and each adapter's backward then reads its
dy twice more for two rank-r products: g = dy B (the gradient reaching the adapter's hidden) and dB = dyᵀ hs. Those
four reads (at 1B's 32,768 tokens 1.5 GB a layer) move no new information: :func:`glu_backward` forms both
products in the kernel that writes dy₁ and dy₂, from the tiles it holds. Each program takes BLOCK_N columns and walks
down a block of rows; each tile's g over its columns goes to a per-column-split fp32 partial and its share of dB to
sums in registers, stored per row block; the partials are summed after (as :mod:`tnlora.ops.lora_grad` does).
The products read the stored (rounded) dy values, as the GEMMs they replace do, and accumulate in fp32 (fp64 for
fp64 inputs); the sums are grouped differently, so results equal the composition's up to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tnlora.ops.lora_grad import Launch, launch_grid, processor_count, rank_block


def glu_backward_reference(
    dm: Tensor, y1: Tensor, y2: Tensor, lora_b1: Tensor, lora_b2: Tensor, hs: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dy₁, dy₂, g, dB) in PyTorch's ops for dm, y1, y2 [T, N], B₁ [N, r₁], B₂ [N, r₂] and hs [T, r₁ + r₂] (both
    adapters' s · h side by side): g = [dy₁ B₁, dy₂ B₂] [T, r₁ + r₂], dB = [dy₁ᵀ hs₁, dy₂ᵀ hs₂] [N, r₁ + r₂]."""
    r1 = lora_b1.shape[1]
    dy1, dy2 = dm * y2, dm * y1
    g = torch.cat([dy1 @ lora_b1, dy2 @ lora_b2], dim=1)
    db = torch.cat([dy1.t() @ hs[:, :r1], dy2.t() @ hs[:, r1:]], dim=1)
    return dy1, dy2, g, db


def glu_backward(
    dm: Tensor, y1: Tensor, y2: Tensor, lora_b1: Tensor, lora_b2: Tensor, hs: Tensor, launch: Launch | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`glu_backward_reference` in one kernel that reads dm, y1 and y2 once and dy₁, dy₂ not at all (CUDA
    tensors, or CPU ones under Triton's CPU interpreter); results in dm's dtype. ``launch``: the tiles and warps
    (:class:`tnlora.ops.lora_grad.Launch`; its default)."""
    rows, cols = dm.shape
    r1, r2 = lora_b1.shape[1], lora_b2.shape[1]
    shapes = (tuple(y1.shape), tuple(y2.shape), tuple(lora_b1.shape[:1]), tuple(lora_b2.shape[:1]), tuple(hs.shape))
    if shapes != ((rows, cols), (rows, cols), (cols,), (cols,), (rows, r1 + r2)):
        raise ValueError(
            f"shapes do not match: dm {tuple(dm.shape)}, y1 {tuple(y1.shape)}, y2 {tuple(y2.shape)}, "
            f"B1 {tuple(lora_b1.shape)}, B2 {tuple(lora_b2.shape)}, hs {tuple(hs.shape)}"
        )
    dm, y1, y2, lora_b1, lora_b2, hs = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (dm, y1, y2, lora_b1, lora_b2, hs)
    )
    from tnlora.ops.glu_grad_triton import glu_backward_kernel

    launch = launch or Launch()
    fp64 = dm.dtype == torch.float64
    acc = torch.float64 if fp64 else torch.float32
    row_programs, splits, rows_each = launch_grid(rows, cols, processor_count(dm), launch)
    dy1, dy2 = torch.empty_like(dm), torch.empty_like(dm)
    g_part = torch.empty((splits, rows, r1 + r2), dtype=acc, device=dm.device)
    db_part = torch.empty((row_programs, cols, r1 + r2), dtype=acc, device=dm.device)
    glu_backward_kernel[(row_programs, splits)](
        dm, y1, y2, lora_b1, lora_b2, hs, dy1, dy2, g_part, db_part, dm.stride(0), y1.stride(0), y2.stride(0),
        lora_b1.stride(0), lora_b2.stride(0), hs.stride(0), rows, cols, r1, r2, rows_each, FP64=fp64,
        BLOCK_T=launch.block_t, BLOCK_N=launch.block_n, BLOCK_R=rank_block(max(r1, r2)), num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )  # fmt: skip
    return dy1, dy2, g_part.sum(0).to(dm.dtype), db_part.sum(0).to(dm.dtype)


__all__ = ["glu_backward", "glu_backward_reference"]
