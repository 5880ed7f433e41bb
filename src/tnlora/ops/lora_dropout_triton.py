"""The Triton kernels of :mod:`tnlora.ops.lora_dropout` (see there for the mask and what each computes).

This module imports triton at import; ``tnlora.ops.lora_dropout`` imports it on first use only.
"""

import triton
import triton.language as tl


@triton.jit
def keep_tile(seed, rows, col0, groups_per_row, threshold, BLOCK_K: tl.constexpr):
    """(keep, bits) of the [len(rows), BLOCK_K] tile at column ``col0`` (a multiple of 8): whether each element
    is kept, and the same as one byte a group of 8 columns (bit s: column 8j + s), [len(rows), BLOCK_K // 8].

    One Philox4x32-10 call per row and group of 8 columns (counter row · groups_per_row + column // 8) gives four
    32-bit words, eight 16-bit halves: column 8j + s takes word s // 2, its low half for even s, and is kept
    where that half is ≥ ``threshold``. Three interleaves put each group's eight halves side by side, so the tile
    is the same whatever BLOCK_K (a multiple of 8) a kernel walks with."""
    groups = col0 // 8 + tl.arange(0, BLOCK_K // 8)
    counter = rows[:, None].to(tl.int64) * groups_per_row + groups[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    h0, h1, h2, h3 = w0 & 0xFFFF, w0 >> 16, w1 & 0xFFFF, w1 >> 16
    h4, h5, h6, h7 = w2 & 0xFFFF, w2 >> 16, w3 & 0xFFFF, w3 >> 16
    bits = (
        (h0 >= threshold).to(tl.int32)
        | ((h1 >= threshold).to(tl.int32) << 1)
        | ((h2 >= threshold).to(tl.int32) << 2)
        | ((h3 >= threshold).to(tl.int32) << 3)
        | ((h4 >= threshold).to(tl.int32) << 4)
        | ((h5 >= threshold).to(tl.int32) << 5)
        | ((h6 >= threshold).to(tl.int32) << 6)
        | ((h7 >= threshold).to(tl.int32) << 7)
    )
    # h_s and h_{s+4} interleaved first, so that the last interleave yields column order s = 0 … 7
    halves = tl.interleave(
        tl.interleave(tl.interleave(h0, h4), tl.interleave(h2, h6)),
        tl.interleave(tl.interleave(h1, h5), tl.interleave(h3, h7)),
    )
    return halves >= threshold, bits.to(tl.uint8)


@triton.jit
def load_keep(bits_ptr, rows, cols, groups_per_row, ok):
    """The kept-mask of the [len(rows), len(cols)] tile from the bytes :func:`keep_tile` made (False where not
    ``ok``): each column reads its group's byte and its bit."""
    byte = tl.load(bits_ptr + rows[:, None].to(tl.int64) * groups_per_row + (cols // 8)[None, :], mask=ok, other=0)
    return ((byte.to(tl.int32) >> (cols % 8)[None, :]) & 1) != 0


@triton.jit
def keep_bits_kernel(
    seed_ptr, bits_ptr, T, groups_per_row, threshold, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr
):  # fmt: skip
    """The mask's bytes alone ([T, ⌈K/8⌉] uint8): for tests and the reference composition."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    groups = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    _, bits = keep_tile(tl.load(seed_ptr), rows, tl.program_id(1) * BLOCK_K, groups_per_row, threshold, BLOCK_K)
    ok = (rows < T)[:, None] & (groups < groups_per_row)[None, :]
    tl.store(bits_ptr + rows[:, None].to(tl.int64) * groups_per_row + groups[None, :], bits, mask=ok)


@triton.jit
def dropout_down_kernel(
    x_ptr, a_ptr, part_ptr, bits_ptr, seed_ptr, T, K, R, stride_x, stride_a, groups_per_row, threshold,
    COLS_PER_PROGRAM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    FP64: tl.constexpr,
):  # fmt: skip
    """Program (p, s): rows [p·BLOCK_T, (p+1)·BLOCK_T) of (x ⊙ keep) Aᵀ over the columns of split s, into this
    split's fp32 partial (part[s], [T, R]); the caller sums the splits. A [R, K] arrives already scaled. The mask
    is drawn here, once, and stored as bits ([T, ⌈K/8⌉] uint8) for the backward's kernels."""
    acc_type = tl.float64 if FP64 else tl.float32
    pid_t, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = rows < T
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    seed = tl.load(seed_ptr)
    col0 = pid_k * COLS_PER_PROGRAM
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=acc_type)
    for k in range(0, COLS_PER_PROGRAM, BLOCK_K):
        cols = col0 + k + tl.arange(0, BLOCK_K)
        c_ok = cols < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=t_ok[:, None] & c_ok[None, :],
                    other=0.0)  # fmt: skip
        keep, bits = keep_tile(seed, rows, col0 + k, groups_per_row, threshold, BLOCK_K)
        groups = (col0 + k) // 8 + tl.arange(0, BLOCK_K // 8)
        tl.store(bits_ptr + rows[:, None].to(tl.int64) * groups_per_row + groups[None, :], bits,
                 mask=t_ok[:, None] & (groups < groups_per_row)[None, :])  # fmt: skip
        x = tl.where(keep, x, 0.0)
        a = tl.load(a_ptr + r[None, :] * stride_a + cols[:, None], mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        acc += tl.dot(x, a, out_dtype=acc_type, input_precision="ieee")
    part = part_ptr + pid_k.to(tl.int64) * T * R
    tl.store(part + rows[:, None] * R + r[None, :], acc, mask=t_ok[:, None] & r_ok[None, :])


@triton.jit
def dropout_grad_a_kernel(
    g_ptr, x_ptr, part_ptr, bits_ptr, T, K, R, stride_g, stride_x, groups_per_row,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    FP64: tl.constexpr,
):  # fmt: skip
    """Program (c, p): gᵀ (x ⊙ keep) over columns [c·BLOCK_K, (c+1)·BLOCK_K) and the rows of block p, into this
    row block's fp32 partial (part[p], [R, K]); the caller sums the blocks and scales. The mask: the forward's
    bits."""
    acc_type = tl.float64 if FP64 else tl.float32
    pid_k, pid_t = tl.program_id(0), tl.program_id(1)
    col0 = pid_k * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    c_ok = cols < K
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    row0 = pid_t * ROWS_PER_PROGRAM
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=acc_type)
    for t in range(0, ROWS_PER_PROGRAM, BLOCK_T):
        rows = row0 + t + tl.arange(0, BLOCK_T)
        t_ok = rows < T
        ok = t_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=ok, other=0.0)
        x = tl.where(load_keep(bits_ptr, rows, cols, groups_per_row, ok), x, 0.0)
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * stride_g + r[None, :], mask=t_ok[:, None] & r_ok[None, :],
                    other=0.0)  # fmt: skip
        acc += tl.dot(tl.trans(g), x, out_dtype=acc_type, input_precision="ieee")
    part = part_ptr + pid_t.to(tl.int64) * R * K
    tl.store(part + r[:, None] * K + cols[None, :], acc, mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def dropout_up_kernel(
    g_ptr, a_ptr, out_ptr, bits_ptr, T, K, R, stride_g, stride_a, stride_out, groups_per_row,
    ACCUMULATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    FP64: tl.constexpr,
):  # fmt: skip
    """Program (p, c): the [BLOCK_T, BLOCK_K] tile of (g A) ⊙ keep (A [R, K] already scaled), stored in out's
    dtype, or with ACCUMULATE added to what out holds (one rounding of the sum). The mask: the forward's bits."""
    acc_type = tl.float64 if FP64 else tl.float32
    pid_t, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    col0 = pid_k * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    t_ok, c_ok = rows < T, cols < K
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    g = tl.load(g_ptr + rows[:, None].to(tl.int64) * stride_g + r[None, :], mask=t_ok[:, None] & r_ok[None, :],
                other=0.0)  # fmt: skip
    a = tl.load(a_ptr + r[:, None] * stride_a + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    v = tl.dot(g, a, out_dtype=acc_type, input_precision="ieee")
    ok = t_ok[:, None] & c_ok[None, :]
    v = tl.where(load_keep(bits_ptr, rows, cols, groups_per_row, ok), v, 0.0)
    ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :]
    if ACCUMULATE:
        v += tl.load(ptrs, mask=ok, other=0.0).to(acc_type)
    tl.store(ptrs, v.to(out_ptr.dtype.element_ty), mask=ok)
