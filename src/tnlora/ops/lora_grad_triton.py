"""The Triton kernel of :mod:`tnlora.ops.lora_grad` (see there for what it computes).

This module imports triton at import; ``tnlora.ops.lora_grad`` imports it on first use only.
"""

import triton
import triton.language as tl


@triton.jit
def lora_dy_products_kernel(
    dy_ptr, b_ptr, hs_ptr, g_part_ptr, db_part_ptr,
    stride_dy, stride_b, stride_hs, T, N, R,
    ROWS_PER_PROGRAM: tl.constexpr, FP64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Program (p, s) reads dy over its rows [p·ROWS, (p+1)·ROWS) and the BLOCK_N columns of split s once, in
    [BLOCK_T, BLOCK_N] tiles walking down the rows: each tile's g = dy B over these columns is complete for its
    rows and stored to this split's partial g (g_part[s], fp32) once, and its share of dB = dyᵀ hs is added to a
    [BLOCK_N, R] sum in registers, stored to this row block's partial dB (db_part[p]) at the end. Nothing is
    read back inside the loop, so the compiler can fetch the next tiles while one is multiplied. The caller
    sums the partials."""
    acc_type = tl.float64 if FP64 else tl.float32
    pid_t, pid_n = tl.program_id(0), tl.program_id(1)
    row0 = pid_t.to(tl.int64) * ROWS_PER_PROGRAM
    row_end = tl.minimum(row0 + ROWS_PER_PROGRAM, T)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < N
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    b = tl.load(b_ptr + cols[:, None] * stride_b + r[None, :], mask=c_ok[:, None] & r_ok[None, :], other=0.0)
    g_part = g_part_ptr + pid_n.to(tl.int64) * T * R
    db = tl.zeros((BLOCK_N, BLOCK_R), dtype=acc_type)
    # A loop of a fixed count with masks past the end (the last program's tiles are partly or wholly masked):
    # the count is a compile-time constant, which Triton's CPU interpreter also takes as a range() bound.
    for t in range(0, ROWS_PER_PROGRAM, BLOCK_T):
        rows = row0 + t + tl.arange(0, BLOCK_T)
        t_ok = rows < row_end
        d = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=t_ok[:, None] & c_ok[None, :],
                    other=0.0)  # fmt: skip
        hs = tl.load(hs_ptr + rows[:, None] * stride_hs + r[None, :], mask=t_ok[:, None] & r_ok[None, :],
                     other=0.0)  # fmt: skip
        db += tl.dot(tl.trans(d), hs, out_dtype=acc_type, input_precision="ieee")
        g = tl.dot(d, b, out_dtype=acc_type, input_precision="ieee")
        tl.store(g_part + rows[:, None] * R + r[None, :], g, mask=t_ok[:, None] & r_ok[None, :])
    db_part = db_part_ptr + pid_t.to(tl.int64) * N * R
    tl.store(db_part + cols[:, None] * R + r[None, :], db, mask=c_ok[:, None] & r_ok[None, :])
