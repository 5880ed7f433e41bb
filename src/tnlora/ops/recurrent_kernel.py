"""The Triton kernel of :func:`tnlora.ops.recurrent_triton.triton_step` (see there for what it computes).

This module imports triton at import; ``tnlora.ops.recurrent_triton`` imports it on first use only.
"""

import triton
import triton.language as tl

from tnlora.ops.gemv_triton import gdc_launch_dependents, gdc_wait


@triton.jit
def _features(base, rows, row_ok, theta_ptr, i_h, position, compute: tl.constexpr, SILU: tl.constexpr,
              LRPE: tl.constexpr, ANGLE_MODEL: tl.constexpr, HD: tl.constexpr):
    """The state rows ``rows`` of one head's q (or k), in the compute dtype, from the projection's raw slice
    at ``base``: F.silu where SILU (fp32 math for half types, rounded to the slice's dtype, as PyTorch's op
    returns it), then with LRPE the layer's [x·cos θ·p, x·sin θ·p] (row r of the state reads x[r mod HD])
    rounded where ``Lrpe.forward`` rounds: with ANGLE_MODEL the position, the angle, cos / sin and the
    product each to the slice's dtype (its "model" angles), else the angle in the compute dtype and only
    the product rounded ("float32")."""
    if LRPE:  # noqa: SIM108 (a constant branch: one side compiled)
        src = rows % HD
    else:
        src = rows
    x = tl.load(base + src, mask=row_ok, other=0.0)
    if SILU:
        xf = x.to(compute)
        x = (xf / (1.0 + tl.exp(-xf))).to(x.dtype)
    if LRPE:
        theta = tl.load(theta_ptr + i_h * HD + src, mask=row_ok, other=0.0)
        if ANGLE_MODEL:
            at = position.to(compute).to(x.dtype).to(compute)
            angle = (theta.to(x.dtype).to(compute) * at).to(x.dtype).to(compute)
            trig = tl.where(rows < HD, tl.cos(angle), tl.sin(angle)).to(x.dtype).to(compute)
        else:
            angle = theta.to(compute) * position.to(compute)
            trig = tl.where(rows < HD, tl.cos(angle), tl.sin(angle))
        x = (x.to(compute) * trig).to(x.dtype)
    return x.to(compute)


@triton.jit
def _program_start(state_ptr, decay_ptr, heads, K: tl.constexpr, V: tl.constexpr, PDL: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    """This program's place and first reads, for both step kernels: (row, row as int64, head, its V columns and
    their mask, its state block, the state's first [BK, BV] tile, λ). Axis 0 is (row, head) (up to 2³¹
    programs; axis 1 is capped at 65,535), axis 1 the V block. As a programmatic dependent launch (PDL) the next
    kernel may start launching, and the first state tile and λ are read before the wait: only the step kernels
    write the state, in an earlier step, and a step begins with a kernel that is not a dependent launch (the
    embedding), which waits for all before it. Every read of q, k, v and every write comes after the wait."""
    i_bh = tl.program_id(0)
    i_b = i_bh // heads
    i_h = i_bh % heads
    # int64 offsets: B·H·K·V passes 2³¹ from batch ~1,000 in LRPE layers.
    i_b64 = i_b.to(tl.int64)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    col_ok = cols < V
    state_base = state_ptr + i_bh.to(tl.int64) * (K * V)
    first_rows = tl.arange(0, BK)
    first_ok = (first_rows < K)[:, None] & col_ok[None, :]
    if PDL:
        gdc_launch_dependents()
    s_first = tl.load(state_base + first_rows[:, None] * V + cols[None, :], mask=first_ok, other=0.0)
    decay = tl.load(decay_ptr + i_h)
    if PDL:
        gdc_wait()
    return i_b, i_b64, i_h, cols, col_ok, state_base, s_first, decay


@triton.jit
def _value(v_ptr, pad_ptr, i_b, i_b64, i_h, stride_vb, stride_vh, cols, col_ok, compute: tl.constexpr,
           HAS_PAD: tl.constexpr):  # fmt: skip
    """This program's columns of v in the compute dtype, zero in a padded row (where, not a product: a padded v
    of inf/nan must still count as zero, as masked_fill)."""
    v = tl.load(v_ptr + i_b64 * stride_vb + i_h * stride_vh + cols, mask=col_ok, other=0.0).to(compute)
    if HAS_PAD:
        keep = tl.load(pad_ptr + i_b).to(tl.int32) == 0
        v = tl.where(keep, v, tl.zeros_like(v))
    return v


@triton.jit
def _block(q_base, k_base, state_base, s_first, cols, col_ok, theta_ptr, i_h, position, k0: tl.constexpr,
           compute: tl.constexpr, SILU: tl.constexpr, LRPE: tl.constexpr, ANGLE_MODEL: tl.constexpr,
           HD: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """State rows k0 … k0 + BK of this program, for both step kernels: (the rows and their mask, q's and k's
    features there, the state tile's pointers and mask, the tile as read: the first one from ``s_first``, read
    before a dependent launch's wait)."""
    rows = k0 + tl.arange(0, BK)
    row_ok = rows < K
    q = _features(q_base, rows, row_ok, theta_ptr, i_h, position, compute, SILU, LRPE, ANGLE_MODEL, HD)
    k = _features(k_base, rows, row_ok, theta_ptr, i_h, position, compute, SILU, LRPE, ANGLE_MODEL, HD)
    ptrs = state_base + rows[:, None] * V + cols[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if k0 == 0:  # noqa: SIM108 (a constant: one side compiled)
        s = s_first
    else:
        s = tl.load(ptrs, mask=tile_ok, other=0.0)
    return rows, row_ok, q, k, ptrs, tile_ok, s


@triton.jit
def _store_o(o, o_ptr, i_b, i_b64, i_h, heads, stride_ob, stride_oh, cols, col_ok, squares_ptr, compute: tl.constexpr,
             SQUARES: tl.constexpr):  # fmt: skip
    """Both step kernels' output: this program's o values, and with SQUARES the sum of their squares as stored
    (rounded to o's dtype) at row (head × V blocks + V block) of [H · V blocks, B] at ``squares_ptr``: the
    partial sums the out_proj's norm of o reads instead of summing o² itself."""
    y = o.to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + i_b64 * stride_ob + i_h * stride_oh + cols, y, mask=col_ok)
    if SQUARES:
        rounded = tl.where(col_ok, y.to(compute), 0.0)
        part = i_h * tl.num_programs(1) + tl.program_id(1)
        tl.store(squares_ptr + part * (tl.num_programs(0) // heads) + i_b, tl.sum(rounded * rounded, axis=0))


@triton.jit
def recurrent_step_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    state_ptr,
    decay_ptr,
    pad_ptr,
    o_ptr,
    heads,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_ob,
    stride_oh,
    theta_ptr,
    position_ptr,
    stride_position,
    squares_ptr,
    K: tl.constexpr,
    V: tl.constexpr,
    HAS_PAD: tl.constexpr,
    SILU: tl.constexpr,
    LRPE: tl.constexpr,
    ANGLE_MODEL: tl.constexpr,
    HD: tl.constexpr,
    PDL: tl.constexpr,
    SQUARES: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    compute = state_ptr.dtype.element_ty
    i_b, i_b64, i_h, cols, col_ok, state_base, s_first, decay = _program_start(
        state_ptr, decay_ptr, heads, K, V, PDL, BK, BV
    )
    v = _value(v_ptr, pad_ptr, i_b, i_b64, i_h, stride_vb, stride_vh, cols, col_ok, compute, HAS_PAD)

    q_base = q_ptr + i_b64 * stride_qb + i_h * stride_qh
    k_base = k_ptr + i_b64 * stride_kb + i_h * stride_kh
    position = 0
    if LRPE:
        position = tl.load(position_ptr + i_b64 * stride_position)
    o = tl.zeros([BV], dtype=compute)
    for k0 in tl.static_range(0, K, BK):
        _, _, q, k, ptrs, tile_ok, s = _block(
            q_base, k_base, state_base, s_first, cols, col_ok, theta_ptr, i_h, position, k0, compute, SILU, LRPE,
            ANGLE_MODEL, HD, K, V, BK,
        )  # fmt: skip
        s = decay * s + k[:, None] * v[None, :]
        tl.store(ptrs, s, mask=tile_ok)
        # o after the update (recurrent_attention's order), reduced from the registers just stored.
        o += tl.sum(q[:, None] * s, axis=0)
    _store_o(o, o_ptr, i_b, i_b64, i_h, heads, stride_ob, stride_oh, cols, col_ok, squares_ptr, compute, SQUARES)


@triton.jit
def _power(lam, e, M: tl.constexpr):
    """λ^e for a run-time 0 ≤ e ≤ M, by repeated products (e need not be a compile-time constant)."""
    r = lam * 0.0 + 1.0
    for n in tl.static_range(M):
        r = tl.where(n < e, r * lam, r)
    return r


@triton.jit
def recurrent_deferred_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    state_ptr,
    decay_ptr,
    pad_ptr,
    o_ptr,
    hk_ptr,
    hv_ptr,
    base_ptr,
    heads,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_ob,
    stride_oh,
    theta_ptr,
    position_ptr,
    stride_position,
    slot_k,
    slot_v,
    squares_ptr,
    K: tl.constexpr,
    V: tl.constexpr,
    M: tl.constexpr,
    HAS_PAD: tl.constexpr,
    SILU: tl.constexpr,
    LRPE: tl.constexpr,
    ANGLE_MODEL: tl.constexpr,
    HD: tl.constexpr,
    PDL: tl.constexpr,
    SQUARES: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """The step of ``recurrent_step_kernel`` with the state written back every M steps only (see
    ``tnlora.ops.recurrent_triton.triton_step``'s ``deferred``): S holds the state of p = (position − base) mod M steps
    ago, slots 0..p−1 of hk / hv [M−1, B, H, K or V] the k and (pad-masked) v of those steps. The state of this
    step, S_t = λ^{p+1} S + Σ_{j<p} λ^{p−j} k_j v_jᵀ + k v, is built tile by tile in registers, o = q S_t; it is
    stored only at p = M − 1 (a masked store, no traffic otherwise), else k and v go to slot p."""
    compute = state_ptr.dtype.element_ty
    # S and λ are read before a dependent launch's wait (_program_start): this kernel alone writes S, in an
    # earlier step; hk and hv are read after it.
    i_b, i_b64, i_h, cols, col_ok, state_base, s_first, decay = _program_start(
        state_ptr, decay_ptr, heads, K, V, PDL, BK, BV
    )
    position = tl.load(position_ptr + i_b64 * stride_position)
    phase = (position - tl.load(base_ptr + i_b64 * stride_position)) % M
    flush = phase == M - 1
    v = _value(v_ptr, pad_ptr, i_b, i_b64, i_h, stride_vb, stride_vh, cols, col_ok, compute, HAS_PAD)
    # Slot j of hk / hv for this row and head: slots are [B, H, ·] blocks of slot_k / slot_v values.
    i_bh = tl.program_id(0).to(tl.int64)
    hk_base = hk_ptr + i_bh * K
    hv_base = hv_ptr + i_bh * V + cols
    s_scale = _power(decay, phase + 1, M)

    q_base = q_ptr + i_b64 * stride_qb + i_h * stride_qh
    k_base = k_ptr + i_b64 * stride_kb + i_h * stride_kh
    o = tl.zeros([BV], dtype=compute)
    for k0 in tl.static_range(0, K, BK):
        rows, row_ok, q, k, ptrs, tile_ok, s = _block(
            q_base, k_base, state_base, s_first, cols, col_ok, theta_ptr, i_h, position, k0, compute, SILU, LRPE,
            ANGLE_MODEL, HD, K, V, BK,
        )  # fmt: skip
        s = s_scale * s + k[:, None] * v[None, :]
        for j in tl.static_range(M - 1):
            held = j < phase  # slot j holds a step not yet in S (masked loads read nothing otherwise)
            kj = tl.load(hk_base + j * slot_k + rows, mask=row_ok & held, other=0.0)
            vj = tl.load(hv_base + j * slot_v, mask=col_ok & held, other=0.0)
            s += _power(decay, phase - j, M) * kj[:, None] * vj[None, :]
        tl.store(ptrs, s, mask=tile_ok & flush)
        o += tl.sum(q[:, None] * s, axis=0)
        # One program a row and head keeps k (every V block computes the same).
        tl.store(hk_base + phase * slot_k + rows, k, mask=row_ok & (phase < M - 1) & (tl.program_id(1) == 0))
    tl.store(hv_base + phase * slot_v, v, mask=col_ok & (phase < M - 1))
    _store_o(o, o_ptr, i_b, i_b64, i_h, heads, stride_ob, stride_oh, cols, col_ok, squares_ptr, compute, SQUARES)
