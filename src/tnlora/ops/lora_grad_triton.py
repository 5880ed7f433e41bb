"""The Triton kernel of :mod:`tnlora.ops.lora_grad` (see there for what it computes).

This module imports triton at import; ``tnlora.ops.lora_grad`` imports it on first use only.
"""

import triton
import triton.language as tl


@triton.jit
def lora_dy_products_kernel(
    dy_ptr, b_ptr, hs_ptr, g_part_ptr, db_part_ptr,
    stride_dy, stride_b, stride_hs, T, N, R,
    ROWS_PER_PROGRAM: tl.constexpr, COLS_PER_PROGRAM: tl.constexpr,
    FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Program (p, s) reads dy over its rows [p·ROWS, (p+1)·ROWS) and columns [s·COLS, (s+1)·COLS) once, in
    [BLOCK_T, BLOCK_N] tiles, column chunk by column chunk: each tile adds its share of g = dy B to this column
    split's partial g (g_part[s], fp32, read and written back: only this program touches those rows of it) and
    its share of dB = dyᵀ hs to a [BLOCK_N, R] sum kept in registers over the program's rows, written to this
    row split's partial dB (db_part[p]) once the chunk is done. The caller sums the partials."""
    acc_type = tl.float64 if FP64 else tl.float32
    pid_t, pid_n = tl.program_id(0), tl.program_id(1)
    row0 = pid_t.to(tl.int64) * ROWS_PER_PROGRAM
    row_end = tl.minimum(row0 + ROWS_PER_PROGRAM, T)
    col0 = pid_n * COLS_PER_PROGRAM
    col_end = tl.minimum(col0 + COLS_PER_PROGRAM, N)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    g_part = g_part_ptr + pid_n.to(tl.int64) * T * R
    db_part = db_part_ptr + pid_t.to(tl.int64) * N * R
    # Loops of a fixed count with masks past the ends (the last programs' blocks are partly or wholly masked); the
    # counts are compile-time constants, which Triton's CPU interpreter also takes as range() bounds.
    for c in range(0, COLS_PER_PROGRAM, BLOCK_N):
        cols = col0 + c + tl.arange(0, BLOCK_N)
        c_ok = cols < col_end
        b = tl.load(b_ptr + cols[:, None] * stride_b + r[None, :], mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        db = tl.zeros((BLOCK_N, BLOCK_R), dtype=acc_type)
        # The partial g rows this loop reads were written by the previous chunk's loop, by other threads.
        tl.debug_barrier()
        for t in range(0, ROWS_PER_PROGRAM, BLOCK_T):
            rows = row0 + t + tl.arange(0, BLOCK_T)
            t_ok = rows < row_end
            d = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=t_ok[:, None] & c_ok[None, :],
                        other=0.0)  # fmt: skip
            hs = tl.load(hs_ptr + rows[:, None] * stride_hs + r[None, :], mask=t_ok[:, None] & r_ok[None, :],
                         other=0.0)  # fmt: skip
            db += tl.dot(tl.trans(d), hs, out_dtype=acc_type, input_precision="ieee")
            g_at = g_part + rows[:, None] * R + r[None, :]
            g_ok = t_ok[:, None] & r_ok[None, :]
            g = tl.load(g_at, mask=g_ok, other=0.0) + tl.dot(d, b, out_dtype=acc_type, input_precision="ieee")
            tl.store(g_at, g, mask=g_ok)
        tl.store(db_part + cols[:, None] * R + r[None, :], db, mask=c_ok[:, None] & r_ok[None, :])
