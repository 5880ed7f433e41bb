"""The token mixer's activation of its fused projection, with a backward that writes the projection's gradient in
place of a concatenation.

For qkvu [..., 4H] (the qkvu_proj output): q = silu(qkvu[..., :H]), k = silu(qkvu[..., H:2H]),
v = qkvu[..., 2H:3H] with padded tokens zeroed (``keep`` False), u = qkvu[..., 3H:]; each returned [..., H].

PyTorch's form (``qkvu_act_reference``) leaves the backward to autograd: the four parts' gradients meet in one
concatenation, which Inductor compiles as a single pointwise kernel selecting its source per element with masks
(1B: 755 µs a layer for 1.3 GB, ~1.7 TB/s; 7B at 131,072 tokens: 6.8 ms, ~1.6 TB/s; benchmarks/RESULTS.md) and
which no Inductor option changed. Here the backward is one kernel whose programs each take one tile of rows and
columns and write it in each of the four parts, so every load and store is a plain 2-D block.

The forward (``forward`` argument of :func:`qkvu_act`): "torch", the default, is PyTorch's form, which compiled
layers fuse with their neighbours and where u stays a view of qkvu; "kernel" is one Triton kernel, where u is
returned as its own tensor (an operator's outputs cannot alias its input), a [..., H] copy that the gate keeps
for its backward: 2 bytes per token and unit of width more activation memory. Alone, Inductor's fused form of
the forward ran in 45–71 % of the kernel's time at 1B's 32,768 tokens (two machines; benchmarks/RESULTS.md).

Custom operators (``tnlora::qkvu_act`` and ``tnlora::qkvu_act_backward``), so that compiled layers call them as
they are; the model uses the backward where ``act_kernel`` resolves to triton (the model config; "auto", the
default: on CUDA where triton imports). Results equal the reference up to the rounding of silu and its
derivative in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK_T = 32
BLOCK_H = 128


def qkvu_act_reference(qkvu: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PyTorch's form: q, k, v, u [..., H] of qkvu [..., 4H], ``keep`` [...] (bool) the tokens whose v counts."""
    q, k, v, u = qkvu.chunk(4, dim=-1)
    if keep is not None:
        v = v.masked_fill(~keep[..., None], 0)
    return F.silu(q), F.silu(k), v, u


FORWARDS = ("torch", "kernel")


def qkvu_act(
    qkvu: Tensor, keep: Tensor | None = None, *, forward: str = "torch"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The same as :func:`qkvu_act_reference`, its backward through the Triton kernel (CUDA tensors, or CPU ones
    under Triton's interpreter) and its forward as ``forward`` says ("torch": PyTorch's ops, u a view of qkvu;
    "kernel": the forward operator, every output its own tensor); gradients flow to qkvu."""
    if qkvu.shape[-1] % 4:
        raise ValueError(f"qkvu's last dim must be 4 · H, got {qkvu.shape[-1]}")
    if keep is not None and tuple(keep.shape) != tuple(qkvu.shape[:-1]):
        raise ValueError(f"keep must be {tuple(qkvu.shape[:-1])}, got {tuple(keep.shape)}")
    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
    flat_keep = keep.reshape(-1).to(torch.uint8) if keep is not None else None
    rows = qkvu.reshape(-1, qkvu.shape[-1])
    if forward == "kernel":
        q, k, v, u = _qkvu_act_op(rows, flat_keep)
    else:
        q, k, v, u = _TorchForward.apply(rows, flat_keep)
    shape = (*qkvu.shape[:-1], q.shape[-1])
    return q.view(shape), k.view(shape), v.view(shape), u.view(shape)


class _TorchForward(torch.autograd.Function):
    """PyTorch's forward of the rows [T, 4H] (``keep`` [T] uint8 or None) and the backward operator."""

    @staticmethod
    def forward(ctx: Any, qkvu: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[override]
        ctx.save_for_backward(qkvu, keep)
        return qkvu_act_reference(qkvu, keep.bool() if keep is not None else None)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, None]:  # type: ignore[override]
        return _backward(ctx, *grads)


def _rows(x: Tensor) -> Tensor:
    """x [T, W] with a contiguous last dim (a copy only where it is not)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _grid(rows: int, width: int) -> tuple[int, int]:
    """Programs over row blocks (axis 0) and the column blocks of one part (axis 1)."""
    return (-(-rows // BLOCK_T), -(-width // BLOCK_H))


@torch.library.custom_op("tnlora::qkvu_act", mutates_args=())
def _qkvu_act_op(qkvu: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from tnlora.ops.qkvu_act_triton import qkvu_act_kernel

    x = _rows(qkvu)
    rows, hidden = x.shape[0], x.shape[1] // 4
    q, k, v, u = (torch.empty((rows, hidden), dtype=x.dtype, device=x.device) for _ in range(4))
    qkvu_act_kernel[_grid(rows, hidden)](
        x, keep if keep is not None else x, q, k, v, u, x.stride(0), rows, hidden,
        HAS_KEEP=keep is not None, FP64=x.dtype == torch.float64, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H,
    )  # fmt: skip
    return q, k, v, u


@_qkvu_act_op.register_fake
def _qkvu_act_op_fake(qkvu: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    shape = (qkvu.shape[0], qkvu.shape[1] // 4)
    return tuple(qkvu.new_empty(shape) for _ in range(4))  # type: ignore[return-value]


@torch.library.custom_op("tnlora::qkvu_act_backward", mutates_args=())
def _qkvu_act_backward_op(
    dq: Tensor, dk: Tensor, dv: Tensor, du: Tensor, qkvu: Tensor, keep: Tensor | None
) -> Tensor:
    from tnlora.ops.qkvu_act_triton import qkvu_act_backward_kernel

    x = _rows(qkvu)
    rows, hidden = x.shape[0], x.shape[1] // 4
    grads = [_rows(g) for g in (dq, dk, dv, du)]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    qkvu_act_backward_kernel[_grid(rows, hidden)](
        x, keep if keep is not None else x, *grads, dx,
        x.stride(0), *(g.stride(0) for g in grads), rows, hidden,
        HAS_KEEP=keep is not None, FP64=x.dtype == torch.float64, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H,
    )  # fmt: skip
    return dx


@_qkvu_act_backward_op.register_fake
def _qkvu_act_backward_op_fake(
    dq: Tensor, dk: Tensor, dv: Tensor, du: Tensor, qkvu: Tensor, keep: Tensor | None
) -> Tensor:
    return torch.empty_like(qkvu, memory_format=torch.contiguous_format)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    qkvu, keep = inputs
    ctx.save_for_backward(qkvu, keep)


def _backward(ctx: Any, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None, du: Tensor | None):
    qkvu, keep = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    shape = (qkvu.shape[0], qkvu.shape[1] // 4)
    grads = [g if g is not None else qkvu.new_zeros(shape) for g in (dq, dk, dv, du)]
    return _qkvu_act_backward_op(*grads, qkvu, keep), None


_qkvu_act_op.register_autograd(_backward, setup_context=_setup)


__all__ = ["qkvu_act", "qkvu_act_reference"]
