"""The chunked loss's per-chunk work after the LM head's matmul: each row's cross-entropy and its logit gradient.

For a chunk of logits [M, V] and one target per row, the loss of a row is lse − logit[target] and its gradient
with respect to the logits is softmax − onehot(target). PyTorch's composition (:func:`cross_entropy_grad_reference`
and the cast back, what ``modeling._LinearCrossEntropySum`` runs with ``loss_kernel: torch``) makes an fp32 copy
of the logits and passes over it about six times (the cast, the max and the sum of the log-sum-exp, the
softmax's read and write, the cast back), ~28 bytes moved per logit with bf16 logits. :func:`cross_entropy_grad_`
is one Triton kernel (``loss_kernel: triton``): it reads the logits twice and writes the gradient over them in
their dtype, ~6 bytes per logit, computing in fp32 (fp64 for fp64 logits) as the composition does. The results
are the composition's up to the order of the sums.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

BLOCK_V = 4096  # logits per step of a row's passes


def _kernel() -> Any:
    """The Triton kernel, imported on first use so that importing this module never imports triton."""
    from tnlora.ops.cross_entropy_triton import cross_entropy_grad_kernel

    return cross_entropy_grad_kernel


def _accumulation_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def cross_entropy_grad_reference(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(the rows' losses, softmax − onehot) by PyTorch ops, both in fp32 or wider; the caller casts the gradient
    back (after dropping the fp32 logits, so that two fp32 chunks are the most alive at a time)."""
    wide = logits.to(_accumulation_dtype(logits))
    lse = torch.logsumexp(wide, dim=-1)
    losses = lse - wide.gather(1, targets[:, None]).squeeze(1)
    grad = torch.softmax(wide, dim=-1)
    grad[torch.arange(targets.shape[0], device=grad.device), targets] -= 1
    return losses, grad


def cross_entropy_grad_(logits: Tensor, targets: Tensor) -> Tensor:
    """The rows' losses (fp32, fp64 for fp64 logits); ``logits`` [M, V] (rows contiguous) is overwritten with
    softmax − onehot(targets) in its dtype. One Triton kernel; targets [M] must lie in [0, V)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [rows, vocabulary] with contiguous rows, got shape {tuple(logits.shape)}")
    rows, vocab = logits.shape
    if targets.shape != (rows,):
        raise ValueError(f"targets must be one per row ({rows}), got shape {tuple(targets.shape)}")
    losses = torch.empty(rows, dtype=_accumulation_dtype(logits), device=logits.device)
    if rows:
        _kernel()[(rows,)](
            logits,
            logits,
            targets,
            losses,
            logits.stride(0),
            logits.stride(0),
            V=vocab,
            FP64=logits.dtype == torch.float64,
            BLOCK_V=min(BLOCK_V, 1 << (vocab - 1).bit_length()),
            num_warps=8,
        )
    return losses


__all__ = ["cross_entropy_grad_", "cross_entropy_grad_reference"]
