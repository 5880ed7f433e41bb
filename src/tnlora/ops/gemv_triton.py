"""The Triton kernel of :mod:`tnlora.ops.gemv` (see there for what it computes).

This module imports triton at import; ``tnlora.ops.gemv`` imports it on first use only.
"""

import triton
import triton.language as tl


@triton.jit
def gemv_kernel(
    x_ptr,
    w_ptr,
    w2_ptr,
    residual_ptr,
    y_ptr,
    N,
    stride_w,
    stride_w2,
    eps,
    K: tl.constexpr,
    NORM: tl.constexpr,
    GLU: tl.constexpr,
    RESIDUAL: tl.constexpr,
    EVEN_K: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """BLOCK_N rows of y = W x (x one vector of K), streaming W once in BLOCK_K-column steps; with NORM the
    same pass sums x² for x's RMS norm, applied to the dot products at the end. K is a constant (one
    compiled kernel per row width; a model has two or three), so the loop's trip count is known."""
    acc_dtype = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_offsets = rows[:, None].to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=acc_dtype)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=acc_dtype)
    squares = tl.zeros((BLOCK_K,), dtype=acc_dtype)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptr + cols).to(acc_dtype)
            w = tl.load(w_ptr + row_offsets * stride_w + cols[None, :], mask=row_ok[:, None], other=0.0)
        else:
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(acc_dtype)
            w = tl.load(w_ptr + row_offsets * stride_w + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
        acc += w.to(acc_dtype) * x[None, :]
        if GLU:
            if EVEN_K:
                w2 = tl.load(w2_ptr + row_offsets * stride_w2 + cols[None, :], mask=row_ok[:, None], other=0.0)
            else:
                w2 = tl.load(w2_ptr + row_offsets * stride_w2 + cols[None, :],
                             mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc2 += w2.to(acc_dtype) * x[None, :]
        if NORM:
            squares += x * x
    out = tl.sum(acc, axis=1)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        out = out * rstd
    # Each product is rounded to the output dtype where the model's Linear would round it.
    y = out.to(y_ptr.dtype.element_ty)
    if GLU:
        out2 = tl.sum(acc2, axis=1)
        if NORM:
            out2 = out2 * rstd
        y = (y.to(acc_dtype) * out2.to(y_ptr.dtype.element_ty).to(acc_dtype)).to(y_ptr.dtype.element_ty)
    if RESIDUAL:
        residual = tl.load(residual_ptr + rows, mask=row_ok, other=0.0)
        y = (residual.to(acc_dtype) + y.to(acc_dtype)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows, y, mask=row_ok)
