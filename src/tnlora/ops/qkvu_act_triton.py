"""The Triton kernels of :mod:`tnlora.ops.qkvu_act` (see there for what they compute).

This module imports triton at import; ``tnlora.ops.qkvu_act`` imports it on first use only.
"""

import triton
import triton.language as tl


@triton.jit
def _tile(T, H, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's rows (program axis 0) and its columns within each part (axis 1), and their mask."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = (rows < T)[:, None] & (cols < H)[None, :]
    return rows, cols, ok


@triton.jit
def _widen(x, FP64: tl.constexpr):
    return x.to(tl.float64) if FP64 else x.to(tl.float32)


@triton.jit
def _silu(w):
    return w / (1.0 + tl.exp(-w))


@triton.jit
def _silu_backward(g, w):
    """g times silu's derivative at w: σ(w) (1 + w (1 − σ(w)))."""
    s = 1.0 / (1.0 + tl.exp(-w))
    return g * s * (1.0 + w * (1.0 - s))


@triton.jit
def qkvu_act_kernel(
    x_ptr, keep_ptr, q_ptr, k_ptr, v_ptr, u_ptr, stride_x, T, H,
    HAS_KEEP: tl.constexpr, FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """q = silu(x[:, :H]), k = silu(x[:, H:2H]), v = x[:, 2H:3H] (zero where not kept), u = x[:, 3H:], each
    written [T, H] contiguous; the activation in fp32 (fp64 for fp64 rows)."""
    rows, cols, ok = _tile(T, H, BLOCK_T, BLOCK_H)
    src = x_ptr + rows[:, None] * stride_x + cols[None, :]
    dst = rows[:, None] * H + cols[None, :]
    wq = _widen(tl.load(src, mask=ok, other=0.0), FP64)
    tl.store(q_ptr + dst, _silu(wq).to(q_ptr.dtype.element_ty), mask=ok)
    wk = _widen(tl.load(src + H, mask=ok, other=0.0), FP64)
    tl.store(k_ptr + dst, _silu(wk).to(k_ptr.dtype.element_ty), mask=ok)
    xv = tl.load(src + 2 * H, mask=ok, other=0.0)
    if HAS_KEEP:
        kept = tl.load(keep_ptr + rows, mask=rows < T, other=0) != 0
        xv = tl.where(kept[:, None], xv, tl.zeros_like(xv))
    tl.store(v_ptr + dst, xv, mask=ok)
    tl.store(u_ptr + dst, tl.load(src + 3 * H, mask=ok, other=0.0), mask=ok)


@triton.jit
def qkvu_act_backward_kernel(
    x_ptr, keep_ptr, dq_ptr, dk_ptr, dv_ptr, du_ptr, dx_ptr,
    stride_x, stride_dq, stride_dk, stride_dv, stride_du, T, H,
    HAS_KEEP: tl.constexpr, FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """dx [T, 4H] of the forward above, each part written into its own columns: silu's derivative times dq and
    dk, dv where kept (zero elsewhere), du as it is."""
    rows, cols, ok = _tile(T, H, BLOCK_T, BLOCK_H)
    src = x_ptr + rows[:, None] * stride_x + cols[None, :]
    dst = dx_ptr + rows[:, None] * (4 * H) + cols[None, :]
    r = rows[:, None]
    c = cols[None, :]
    dq = _widen(tl.load(dq_ptr + r * stride_dq + c, mask=ok, other=0.0), FP64)
    wq = _widen(tl.load(src, mask=ok, other=0.0), FP64)
    tl.store(dst, _silu_backward(dq, wq).to(dx_ptr.dtype.element_ty), mask=ok)
    dk = _widen(tl.load(dk_ptr + r * stride_dk + c, mask=ok, other=0.0), FP64)
    wk = _widen(tl.load(src + H, mask=ok, other=0.0), FP64)
    tl.store(dst + H, _silu_backward(dk, wk).to(dx_ptr.dtype.element_ty), mask=ok)
    dv = tl.load(dv_ptr + r * stride_dv + c, mask=ok, other=0.0)
    if HAS_KEEP:
        kept = tl.load(keep_ptr + rows, mask=rows < T, other=0) != 0
        dv = tl.where(kept[:, None], dv, tl.zeros_like(dv))
    tl.store(dst + 2 * H, dv.to(dx_ptr.dtype.element_ty), mask=ok)
    du = tl.load(du_ptr + r * stride_du + c, mask=ok, other=0.0)
    tl.store(dst + 3 * H, du.to(dx_ptr.dtype.element_ty), mask=ok)
