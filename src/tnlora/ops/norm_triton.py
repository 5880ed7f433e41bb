"""The Triton kernels of :mod:`tnlora.ops.norm` (see there for what they compute).

This module imports triton at import; ``tnlora.ops.norm`` imports it on first use only, so that importing tnlora
never imports triton.
"""

import triton
import triton.language as tl


@triton.jit
def _load_row(x_ptr, stride_x, D, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """This program's row of x: its index, the columns and their mask, x as stored and widened to fp32 (fp64
    for fp64 rows)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    xf = x.to(tl.float64) if FP64 else x.to(tl.float32)
    return row, cols, ok, x, xf


@triton.jit
def rms_norm_kernel(
    x_ptr,
    delta_ptr,
    gate_ptr,
    h_ptr,
    y_ptr,
    rstd_ptr,
    stride_x,
    stride_delta,
    stride_gate,
    stride_h,
    stride_y,
    D,
    eps,
    HAS_DELTA: tl.constexpr,
    HAS_GATE: tl.constexpr,
    STORE_RSTD: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, cols, ok, x, xf = _load_row(x_ptr, stride_x, D, FP64, BLOCK)
    if HAS_DELTA:
        # The residual add rounds to the model dtype before the norm reads it, as `x + delta` does.
        xf = xf + tl.load(delta_ptr + row * stride_delta + cols, mask=ok, other=0.0).to(xf.dtype)
        x = xf.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, x, mask=ok)
        xf = x.to(xf.dtype)
    mean_square = tl.sum(xf * xf, axis=0) / D
    rstd = 1.0 / tl.sqrt(mean_square + eps)
    if STORE_RSTD:
        tl.store(rstd_ptr + row, rstd)
    y = (xf * rstd).to(y_ptr.dtype.element_ty)
    if HAS_GATE:
        gate = tl.load(gate_ptr + row * stride_gate + cols, mask=ok, other=0.0)
        y = (gate.to(xf.dtype) * y.to(xf.dtype)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + cols, y, mask=ok)


@triton.jit
def rms_norm_backward_kernel(
    x_ptr,
    gate_ptr,
    rstd_ptr,
    dout_ptr,
    dx_ptr,
    dgate_ptr,
    stride_x,
    stride_gate,
    stride_dout,
    stride_dx,
    stride_dgate,
    D,
    HAS_GATE: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, cols, ok, _, xf = _load_row(x_ptr, stride_x, D, FP64, BLOCK)
    rstd = tl.load(rstd_ptr + row)
    normed = xf * rstd
    g = tl.load(dout_ptr + row * stride_dout + cols, mask=ok, other=0.0).to(xf.dtype)
    if HAS_GATE:
        gate = tl.load(gate_ptr + row * stride_gate + cols, mask=ok, other=0.0)
        # d gate = dout ⊙ y with y rounded to the model dtype, as the forward's product read it.
        y = normed.to(dx_ptr.dtype.element_ty).to(xf.dtype)
        tl.store(dgate_ptr + row * stride_dgate + cols, (g * y).to(dgate_ptr.dtype.element_ty), mask=ok)
        g = g * gate.to(xf.dtype)
    # d x = rstd · (g − x̂ · mean(g ⊙ x̂)), x̂ = x · rstd.
    dot = tl.sum(g * normed, axis=0) / D
    dx = rstd * (g - normed * dot)
    tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
