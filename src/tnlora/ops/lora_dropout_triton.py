"""The Triton kernels of :mod:`tnlora.ops.lora_dropout` (see there for what each computes).

This module imports triton at import; ``tnlora.ops.lora_dropout`` imports it on first use only.
"""

import triton
import triton.language as tl


@triton.jit
def kept_x(x_ptr, keep_ptr, rows, cols, stride_x, stride_keep, ok, HAS_KEEP: tl.constexpr):
    """The [len(rows), len(cols)] tile of x ⊙ keep, or of x itself without HAS_KEEP (zero where not ``ok``)."""
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=ok, other=0.0)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + rows[:, None].to(tl.int64) * stride_keep + cols[None, :], mask=ok, other=0)
        x = tl.where(keep != 0, x, 0.0)
    return x


@triton.jit
def dropout_down_kernel(
    x_ptr, keep_ptr, a_ptr, part_ptr, T, K, R, stride_x, stride_keep, stride_a,
    COLS_PER_PROGRAM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    FP64: tl.constexpr, HAS_KEEP: tl.constexpr,
):  # fmt: skip
    """Program (p, s): rows [p·BLOCK_T, (p+1)·BLOCK_T) of (x ⊙ keep) Aᵀ over the columns of split s, into this
    split's partial (part[s], [T, R], fp32 or fp64); the caller sums the splits. A [R, K] arrives scaled. Without
    HAS_KEEP, x Aᵀ (keep_ptr unread)."""
    acc_type = tl.float64 if FP64 else tl.float32
    pid_t, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = rows < T
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    col0 = pid_k * COLS_PER_PROGRAM
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=acc_type)
    for k in range(0, COLS_PER_PROGRAM, BLOCK_K):
        cols = col0 + k + tl.arange(0, BLOCK_K)
        x = kept_x(x_ptr, keep_ptr, rows, cols, stride_x, stride_keep, t_ok[:, None] & (cols < K)[None, :],
                   HAS_KEEP)
        a = tl.load(a_ptr + r[None, :] * stride_a + cols[:, None], mask=(cols < K)[:, None] & r_ok[None, :],
                    other=0.0)  # fmt: skip
        if FP64:  # no fp64 tensor-core product for every shape: the sum of the broadcast products
            acc += tl.sum(x[:, :, None] * a[None, :, :], axis=1)
        else:
            acc += tl.dot(x, a, out_dtype=acc_type, input_precision="ieee")
    part = part_ptr + pid_k.to(tl.int64) * T * R
    tl.store(part + rows[:, None] * R + r[None, :], acc, mask=t_ok[:, None] & r_ok[None, :])


@triton.jit
def dropout_grad_a_kernel(
    g_ptr, x_ptr, keep_ptr, part_ptr, T, K, R, stride_g, stride_x, stride_keep,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    FP64: tl.constexpr, HAS_KEEP: tl.constexpr,
):  # fmt: skip
    """Program (c, p): gᵀ (x ⊙ keep) over columns [c·BLOCK_K, (c+1)·BLOCK_K) and the rows of block p, into this
    row block's partial (part[p], [R, K]); the caller sums the blocks and scales. Without HAS_KEEP, gᵀ x."""
    acc_type = tl.float64 if FP64 else tl.float32
    pid_k, pid_t = tl.program_id(0), tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    c_ok = cols < K
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    row0 = pid_t * ROWS_PER_PROGRAM
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=acc_type)
    for t in range(0, ROWS_PER_PROGRAM, BLOCK_T):
        rows = row0 + t + tl.arange(0, BLOCK_T)
        t_ok = rows < T
        x = kept_x(x_ptr, keep_ptr, rows, cols, stride_x, stride_keep, t_ok[:, None] & c_ok[None, :], HAS_KEEP)
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * stride_g + r[None, :], mask=t_ok[:, None] & r_ok[None, :],
                    other=0.0)  # fmt: skip
        if FP64:
            acc += tl.sum(g[:, :, None] * x[:, None, :], axis=0)
        else:
            acc += tl.dot(tl.trans(g), x, out_dtype=acc_type, input_precision="ieee")
    part = part_ptr + pid_t.to(tl.int64) * R * K
    tl.store(part + r[:, None] * K + cols[None, :], acc, mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def dropout_up_kernel(
    g_ptr, a_ptr, keep_ptr, out_ptr, T, K, R, stride_g, stride_a, stride_keep, stride_out,
    ACCUMULATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    FP64: tl.constexpr, HAS_KEEP: tl.constexpr,
):  # fmt: skip
    """Program (p, c): the [BLOCK_T, BLOCK_K] tile of (g A) ⊙ keep (A [R, K] arrives scaled), stored in out's
    dtype, or with ACCUMULATE added to what out holds (one rounding of the sum). Without HAS_KEEP, g A."""
    acc_type = tl.float64 if FP64 else tl.float32
    pid_t, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    t_ok, c_ok = rows < T, cols < K
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    g = tl.load(g_ptr + rows[:, None].to(tl.int64) * stride_g + r[None, :], mask=t_ok[:, None] & r_ok[None, :],
                other=0.0)  # fmt: skip
    a = tl.load(a_ptr + r[:, None] * stride_a + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    if FP64:
        v = tl.sum(g[:, :, None] * a[None, :, :], axis=1)
    else:
        v = tl.dot(g, a, out_dtype=acc_type, input_precision="ieee")
    ok = t_ok[:, None] & c_ok[None, :]
    if HAS_KEEP:
        keep = tl.load(keep_ptr + rows[:, None].to(tl.int64) * stride_keep + cols[None, :], mask=ok, other=0)
        v = tl.where(keep != 0, v, 0.0)
    ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :]
    if ACCUMULATE:
        v += tl.load(ptrs, mask=ok, other=0.0).to(acc_type)
    tl.store(ptrs, v.to(out_ptr.dtype.element_ty), mask=ok)
