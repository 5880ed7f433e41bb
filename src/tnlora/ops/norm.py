"""SimpleRMSNorm as one Triton kernel, with the residual add or the output gate fused in; and its backward.

Per row x [D]:   y = x / sqrt(mean(x²) + eps)   (fp32 math, fp64 for fp64 rows; y cast back to x's dtype)

:func:`add_rms_norm` first adds the residual branch, h = x + delta (rounded to the model dtype, as
``x + delta`` is), and returns both h and its norm: a decoder layer's two residual adds and the norms after.
:func:`gated_rms_norm` returns gate ⊙ norm(o), the token mixer's ``u * self.norm(o)``, the product rounded
from the rounded norm as in PyTorch. Each replaces the ~7 small kernels of the PyTorch form (cast, square,
mean, add, rsqrt, multiply, cast; plus the add or the product), which dominate a decode step's norms at
large batch. Results equal ``SimpleRMSNorm`` up to the order of the sum over D.

Used by the static decode step with ``decode_kernel: triton`` (``infer.decode_graph.DecodeStepRunner``) and by
``SimpleRMSNorm`` in no-grad CUDA forwards (the prefill). :func:`rms_norm` is the differentiable form for
eager training (``norm_kernel``): the forward also keeps each row's 1/rms (fp32), and the backward is one
more kernel that reads x, the gate and the incoming gradient once. The PyTorch form saves an fp32 copy of x
for its backward and spends ~15 kernels on the pair; under ``torch.compile`` Inductor fuses that form
itself, so compiled layers keep it. Triton is imported on first use, never at import.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

NUM_WARPS = 8  # a 4,096-wide row is 16 values per thread


def _kernel() -> Any:
    """The forward kernel, imported on first use so that importing this module never imports triton."""
    from tnlora.ops.norm_triton import rms_norm_kernel

    return rms_norm_kernel


def _backward_kernel() -> Any:
    """The backward of ``gate ⊙ norm(x)`` (or of ``norm(x)``), one row per program."""
    from tnlora.ops.norm_triton import rms_norm_backward_kernel

    return rms_norm_backward_kernel


def _rows(x: Tensor, name: str) -> Tensor:
    """x as [rows, D] without a copy (the last dim must be contiguous; rows may be strided)."""
    if x.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dim")
    if x.dim() == 2:
        return x
    if x.dim() == 3 and (x.shape[1] == 1 or x.stride(0) == x.shape[1] * x.stride(1)):
        return x.reshape(-1, x.shape[-1])  # a view for these strides
    raise ValueError(f"{name} must be [rows, D], or [B, T, D] with rows of one stride")


def takes_rows(*tensors: Tensor | None) -> bool:
    """Whether every given tensor has a layout the kernel reads without a copy (what ``_rows`` accepts)."""
    for x in tensors:
        if x is None:
            continue
        if x.stride(-1) != 1 or x.dim() not in (2, 3):
            return False
        if x.dim() == 3 and not (x.shape[1] == 1 or x.stride(0) == x.shape[1] * x.stride(1)):
            return False
    return True


def _launch(
    x: Tensor, eps: float, delta: Tensor | None = None, gate: Tensor | None = None, rstd: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    rows = _rows(x, "x")
    n, width = rows.shape
    for other, name in ((delta, "delta"), (gate, "gate")):
        if other is not None and (tuple(other.shape) != tuple(x.shape) or other.dtype != x.dtype):
            raise ValueError(
                f"{name} must match x: {tuple(x.shape)} {x.dtype}, got {tuple(other.shape)} {other.dtype}"
            )
    delta_rows = _rows(delta, "delta") if delta is not None else rows
    gate_rows = _rows(gate, "gate") if gate is not None else rows
    y = torch.empty((n, width), dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if delta is not None else y  # unwritten without a delta
    _kernel()[(n,)](
        rows,
        delta_rows,
        gate_rows,
        h,
        y,
        rstd if rstd is not None else y,  # unwritten without rstd
        rows.stride(0),
        delta_rows.stride(0),
        gate_rows.stride(0),
        h.stride(0),
        y.stride(0),
        width,
        eps,
        HAS_DELTA=delta is not None,
        HAS_GATE=gate is not None,
        STORE_RSTD=rstd is not None,
        FP64=x.dtype == torch.float64,
        BLOCK=_block(width),
        num_warps=NUM_WARPS,
    )
    shape = (*x.shape[:-1], width)
    return h.view(shape), y.view(shape)


def _block(width: int) -> int:
    return 1 << (width - 1).bit_length()


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _RMSNorm(torch.autograd.Function):
    """``gate ⊙ norm(x)`` (``norm(x)`` without a gate) with the Triton forward and backward kernels."""

    @staticmethod
    def forward(ctx, x: Tensor, gate: Tensor | None, eps: float) -> Tensor:  # type: ignore[override]
        rstd = torch.empty(_rows(x, "x").shape[0], dtype=_stat_dtype(x), device=x.device)
        y = _launch(x, eps, gate=gate, rstd=rstd)[1]
        ctx.save_for_backward(x, gate, rstd)
        return y

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, gate, rstd = ctx.saved_tensors
        rows = _rows(x, "x")
        n, width = rows.shape
        grads = _rows(dout if takes_rows(dout) else dout.contiguous(), "dout")
        gate_rows = _rows(gate, "gate") if gate is not None else rows
        dx = torch.empty((n, width), dtype=x.dtype, device=x.device)
        dgate = torch.empty_like(dx) if gate is not None else dx  # unwritten without a gate
        _backward_kernel()[(n,)](
            rows,
            gate_rows,
            rstd,
            grads,
            dx,
            dgate,
            rows.stride(0),
            gate_rows.stride(0),
            grads.stride(0),
            dx.stride(0),
            dgate.stride(0),
            width,
            HAS_GATE=gate is not None,
            FP64=x.dtype == torch.float64,
            BLOCK=_block(width),
            num_warps=NUM_WARPS,
        )
        return dx.view(x.shape), dgate.view(x.shape) if gate is not None else None, None


def rms_norm(x: Tensor, gate: Tensor | None, eps: float) -> Tensor:
    """``gate ⊙ norm(x)`` (or ``norm(x)``), differentiable in x and the gate; x, gate [rows, D] or [B, T, D]
    with rows of one stride (what :func:`takes_rows` accepts), of one dtype and shape."""
    if gate is not None and (tuple(gate.shape) != tuple(x.shape) or gate.dtype != x.dtype):
        raise ValueError(f"gate must match x: {tuple(x.shape)} {x.dtype}, got {tuple(gate.shape)} {gate.dtype}")
    return _RMSNorm.apply(x, gate, eps)


def add_rms_norm(x: Tensor, delta: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """(h, norm(h)) with h = x + delta (x itself when delta is None); x, delta [rows, D] or [B, 1, D]."""
    if delta is None:
        return x, _launch(x, eps)[1]
    return _launch(x, eps, delta=delta)


def gated_rms_norm(x: Tensor, gate: Tensor, eps: float) -> Tensor:
    """gate ⊙ norm(x); gate may be a strided slice (a chunk of the fused projection's output)."""
    return _launch(x, eps, gate=gate)[1]


__all__ = ["add_rms_norm", "gated_rms_norm", "rms_norm", "takes_rows"]
