"""Greedy token choice of a decode step, on the device: what ``generate()``'s greedy loop does with a step's
logits, written for a captured step to run (``tnlora.infer.decode_graph.GreedyDeviceSteps``).

For each row b of ``logits`` [B, V]:

1. the scores, in fp32, with the ``eos`` ids' set to -inf while ``length < ban_below`` (transformers'
   ``MinLengthLogitsProcessor`` / ``MinNewTokensLengthLogitsProcessor``; ``length`` is the sequence's before
   this token);
2. the argmax (``torch.argmax``'s: the first maximum, a NaN counting as the largest);
3. a finished row (``out[0, b] == 0``) takes ``pad`` instead (transformers' eos padding); a row whose token is
   an eos id is finished from now on;
4. ``out[0]`` holds the flags, ``out[1]`` and ``ids`` [B, 1] the tokens, and ``position`` and ``length`` are one
   on.

With no eos ids the flags stay 1 and nothing is padded. :func:`choose_greedy` runs it as PyTorch ops (about
twenty small kernels) or as two Triton kernels, the maximum of each piece of the vocabulary and then, per
row, the piece maxima and the rest: bitwise the same tokens and flags.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Words of the vocabulary per program of the first kernel (64,000: 32 programs a row).
PIECE = 2048


def row_argmax(scores: Tensor, piece: int = 256) -> Tensor:
    """``torch.argmax(scores, dim=-1)`` for scores [B, V], the same indices (the first maximum; a NaN counts
    as the maximum), in two steps where V is a multiple of ``piece`` of at least 16 pieces: the maximum of each
    piece, then the piece holding the largest. A single row's argmax over a 64,000-word vocabulary runs on one
    thread block (~16 µs on an H200); in pieces it spreads over the card."""
    rows, words = scores.shape
    if words % piece or words < 16 * piece:
        return torch.argmax(scores, dim=-1)
    values, within = scores.view(rows, words // piece, piece).max(dim=-1)
    best = torch.argmax(values, dim=-1, keepdim=True)
    return (best * piece + within.gather(1, best)).squeeze(1)


def _check(logits: Tensor, eos: Tensor, out: Tensor, ids: Tensor) -> None:
    rows = logits.shape[0]
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [B, V] with contiguous rows, got shape {tuple(logits.shape)}")
    if out.shape != (2, rows) or not out.is_contiguous() or ids.shape != (rows, 1) or not ids.is_contiguous():
        raise ValueError(f"out must be a contiguous [2, {rows}] and ids a contiguous [{rows}, 1]")
    if eos.dim() != 1 or eos.dtype != torch.long or out.dtype != torch.long or ids.dtype != torch.long:
        raise ValueError("eos, out and ids must be int64 (eos one-dimensional)")


def choose_greedy(
    logits: Tensor,
    eos: Tensor,
    ban_below: Tensor,
    length: Tensor,
    pad: Tensor,
    out: Tensor,
    ids: Tensor,
    position: Tensor,
    kernel: str = "torch",
    pdl: bool = False,
) -> None:
    """The token choice (module docstring) for ``logits`` [B, V]: ``eos`` [E], ``ban_below``, ``length``,
    ``pad`` and ``position`` 0-dim, ``out`` [2, B] and ``ids`` [B, 1], all int64 on the logits' device.
    ``kernel``: "torch" (PyTorch ops, any device) or "triton" (two kernels; CUDA, or Triton's interpreter).
    ``pdl``: the Triton kernels launched as programmatic dependent launches (sm_90 and later), each launch
    overlapping the end of the kernel before (``tnlora.ops.gemv.pdl_supported``)."""
    _check(logits, eos, out, ids)
    if kernel == "torch":
        _choose_torch(logits, eos, ban_below, length, pad, out, ids, position)
    elif kernel == "triton":
        _choose_triton(logits, eos, ban_below, length, pad, out, ids, position, pdl=pdl)
    else:
        raise ValueError(f"kernel must be 'torch' or 'triton', got {kernel!r}")


def _choose_torch(logits: Tensor, *buffers: Tensor) -> None:
    eos, ban_below, length, pad, out, ids, position = buffers
    scores = logits.to(dtype=torch.float32, copy=True)
    scores.index_copy_(1, eos, torch.where(length < ban_below, float("-inf"), scores.index_select(1, eos)))
    unfinished = out[0]
    tokens = row_argmax(scores) * unfinished + pad * (1 - unfinished)
    unfinished.mul_(~torch.isin(tokens, eos))
    out[1].copy_(tokens)
    ids.copy_(tokens[:, None])
    position.add_(1)
    length.add_(1)


def _choose_triton(logits: Tensor, *buffers: Tensor, pdl: bool = False) -> None:
    from tnlora.ops.token_choice_triton import finish_kernel, pieces_kernel

    eos, ban_below, length, pad, out, ids, position = buffers
    launch = {"launch_pdl": True} if pdl else {}  # an option Triton before 3.3 does not know

    rows, words = logits.shape
    pieces = -(-words // PIECE)
    values = torch.empty(rows, pieces, dtype=torch.float32, device=logits.device)
    indices = torch.empty(rows, pieces, dtype=torch.int32, device=logits.device)
    pieces_kernel[(rows, pieces)](
        logits, logits.stride(0), words, eos, ban_below, length, values, indices, pieces, EOS=eos.numel(), PIECE=PIECE,
        PDL=pdl, **launch,
    )  # fmt: skip
    finish_kernel[(rows,)](
        values, indices, pieces, eos, pad, out, rows, ids, position, length,
        EOS=eos.numel(), PIECES=max(16, 1 << (pieces - 1).bit_length()), PDL=pdl, **launch,
    )  # fmt: skip


__all__ = ["PIECE", "choose_greedy", "row_argmax"]
