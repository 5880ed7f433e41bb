"""The Triton kernel of :mod:`tnlora.ops.glu_grad` (see there for what it computes).

This module imports triton at import; ``tnlora.ops.glu_grad`` imports it on first use only.
"""

import triton
import triton.language as tl


@triton.jit
def _rank_products(d, b, h, db, g_part, rows, r, t_ok, r_ok, R_OFFSET, R_ALL,
                   FP64: tl.constexpr):  # fmt: skip
    """One projection's share of a tile: its g over these columns (d B) stored to this split's partial at
    columns [R_OFFSET, R_OFFSET + r), and d ᵀ h added to the running dB."""
    acc_type = tl.float64 if FP64 else tl.float32
    db += tl.dot(tl.trans(d), h, out_dtype=acc_type, input_precision="ieee")
    g = tl.dot(d, b, out_dtype=acc_type, input_precision="ieee")
    tl.store(g_part + rows[:, None] * R_ALL + R_OFFSET + r[None, :], g, mask=t_ok[:, None] & r_ok[None, :])
    return db


@triton.jit
def glu_backward_kernel(
    dm_ptr, y1_ptr, y2_ptr, b1_ptr, b2_ptr, hs_ptr, dy1_ptr, dy2_ptr, g_part_ptr, db_part_ptr,
    stride_dm, stride_y1, stride_y2, stride_b1, stride_b2, stride_hs, T, N, R1, R2,
    ROWS_PER_PROGRAM: tl.constexpr, FP64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Program (p, s) walks rows [p·ROWS, (p+1)·ROWS) of the BLOCK_N columns of split s in [BLOCK_T, BLOCK_N]
    tiles: dy1 = dm ⊙ y2 and dy2 = dm ⊙ y1 (in fp32, stored in dy's dtype), then from those stored values each
    projection's g = dy B over these columns, stored to this split's partial g (g_part[s], fp32, [T, R1 + R2]:
    g1's columns first), and its dB = dyᵀ hs added to sums in registers, stored to this row block's partial dB
    (db_part[p], [N, R1 + R2]) at the end. The caller sums the partials."""
    acc_type = tl.float64 if FP64 else tl.float32
    pid_t, pid_n = tl.program_id(0), tl.program_id(1)
    row0 = pid_t.to(tl.int64) * ROWS_PER_PROGRAM
    row_end = tl.minimum(row0 + ROWS_PER_PROGRAM, T)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < N
    r = tl.arange(0, BLOCK_R)
    r1_ok = r < R1
    r2_ok = r < R2
    b1 = tl.load(b1_ptr + cols[:, None] * stride_b1 + r[None, :], mask=c_ok[:, None] & r1_ok[None, :], other=0.0)
    b2 = tl.load(b2_ptr + cols[:, None] * stride_b2 + r[None, :], mask=c_ok[:, None] & r2_ok[None, :], other=0.0)
    r_all = R1 + R2
    g_part = g_part_ptr + pid_n.to(tl.int64) * T * r_all
    db1 = tl.zeros((BLOCK_N, BLOCK_R), dtype=acc_type)
    db2 = tl.zeros((BLOCK_N, BLOCK_R), dtype=acc_type)
    # A fixed count with masks past the end: a compile-time bound, which Triton's CPU interpreter also takes.
    for t in range(0, ROWS_PER_PROGRAM, BLOCK_T):
        rows = row0 + t + tl.arange(0, BLOCK_T)
        t_ok = rows < row_end
        ok = t_ok[:, None] & c_ok[None, :]
        dm = tl.load(dm_ptr + rows[:, None] * stride_dm + cols[None, :], mask=ok, other=0.0).to(acc_type)
        y1 = tl.load(y1_ptr + rows[:, None] * stride_y1 + cols[None, :], mask=ok, other=0.0).to(acc_type)
        y2 = tl.load(y2_ptr + rows[:, None] * stride_y2 + cols[None, :], mask=ok, other=0.0).to(acc_type)
        # The stored (rounded) values feed the products, as the GEMMs they replace read them.
        d1 = (dm * y2).to(dy1_ptr.dtype.element_ty)
        d2 = (dm * y1).to(dy2_ptr.dtype.element_ty)
        tl.store(dy1_ptr + rows[:, None] * N + cols[None, :], d1, mask=ok)
        tl.store(dy2_ptr + rows[:, None] * N + cols[None, :], d2, mask=ok)
        h1 = tl.load(hs_ptr + rows[:, None] * stride_hs + r[None, :], mask=t_ok[:, None] & r1_ok[None, :], other=0.0)
        h2 = tl.load(hs_ptr + rows[:, None] * stride_hs + R1 + r[None, :], mask=t_ok[:, None] & r2_ok[None, :],
                     other=0.0)  # fmt: skip
        db1 = _rank_products(d1, b1, h1, db1, g_part, rows, r, t_ok, r1_ok, 0, r_all, FP64)
        db2 = _rank_products(d2, b2, h2, db2, g_part, rows, r, t_ok, r2_ok, R1, r_all, FP64)
    db_part = db_part_ptr + pid_t.to(tl.int64) * N * r_all
    tl.store(db_part + cols[:, None] * r_all + r[None, :], db1, mask=c_ok[:, None] & r1_ok[None, :])
    tl.store(db_part + cols[:, None] * r_all + R1 + r[None, :], db2, mask=c_ok[:, None] & r2_ok[None, :])
