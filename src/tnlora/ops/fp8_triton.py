"""The Triton kernels of ``fp8_backend: triton``: :func:`tnlora.ops.fp8.quantize_rows_triton`'s per-token
quantization (:func:`tnlora.ops.fp8.quantize_rows_reference` says what it computes) as one launch, and
:func:`tnlora.ops.fp8.scaled_mm_low_rank_triton`'s GEMM with the adapter's part in its epilogue
(:func:`scaled_mm_low_rank_kernel`).

The quantization, one program a row: the row is read once into registers (times the column scales, in fp32),
its largest magnitude taken, and the e4m3 copy and the row's scale written, so a row moves its bytes once in and
once out. The
divisions are IEEE round-to-nearest (``div_rn``, as PyTorch's ``/``). Each quotient's e4m3 bits are made here
(rounded to nearest, ties to even, as PyTorch's conversion rounds; the sign of -0.0 kept) and stored as bytes, so
no conversion of Triton's is involved: the result is the reference's bit for bit on the GPU and under Triton's CPU
interpreter alike (the interpreter's own e4m3 conversion rounds a value that carries into the next binade down
and drops the sign of -0.0).

This module imports triton at import; ``tnlora.ops.fp8`` imports it on first use only.
"""

import triton
import triton.language as tl

# e4m3fn: 3 mantissa bits, exponent bias 7, normal exponents from -6 (below 2^-6 the subnormals, spaced 2^-9).
_MANTISSA_BITS = tl.constexpr(3)
_BIAS = tl.constexpr(7)
_MIN_EXPONENT = tl.constexpr(-6)
# Adding and subtracting 1.5 · 2^23 rounds an fp32 of magnitude below 2^22 to an integer, ties to even.
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _e4m3_bits(v):
    """The e4m3fn bit pattern (int32, 0–255) of v (fp32, |v| ≤ 448) rounded to the nearest e4m3 value, ties to
    even, with v's sign (that of -0.0 too)."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, _MIN_EXPONENT)
    # v over the spacing of e4m3 values in its binade, 2^(exponent - 3) (its inverse built as an fp32's bits: a
    # power of two, so the product is exact), rounded to an integer: 8–16 in a normal binade, 0–8 below it
    inverse = ((-exponent + (127 + _MANTISSA_BITS)) << 23).to(tl.float32, bitcast=True)
    steps = ((tl.abs(v) * inverse + _ROUND_MAGIC) - _ROUND_MAGIC).to(tl.int32)
    # exponent field and mantissa in one sum, (field << 3) + steps - 8: 16 steps carry into the next exponent, and
    # the subnormals (exponent field 0) continue below the smallest normal value
    code = ((exponent + (_BIAS - 1)) << _MANTISSA_BITS) + steps
    code = tl.where(v != v, 0x7F, code)  # NaN stays NaN, as the conversion makes it
    return tl.where(bits < 0, code | 0x80, code)


@triton.jit
def _max_with_nan(a, b):
    """max, NaN if either is (as torch.amax)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def quantize_rows_kernel(
    t_ptr,
    col_ptr,
    q_ptr,
    scale_ptr,
    stride_t,
    stride_q,
    K,
    fp8_max,
    scale_floor,
    HAS_COL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < K
    v = tl.load(t_ptr + row * stride_t + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_COL:
        v = v * tl.load(col_ptr + cols, mask=ok, other=0.0)
    amax = tl.reduce(tl.abs(v), 0, _max_with_nan)
    scale = tl.maximum(tl.math.div_rn(amax, fp8_max), scale_floor, propagate_nan=tl.PropagateNan.ALL)
    q = _e4m3_bits(tl.clamp(tl.math.div_rn(v, scale), -fp8_max, fp8_max))
    tl.store(q_ptr + row * stride_q + cols, q.to(tl.uint8), mask=ok)  # q_ptr: the e4m3 tensor's bytes
    tl.store(scale_ptr + row, scale)


@triton.jit
def _low_rank(h_ptr, c_ptr, keep_ptr, safe_m, rn, N, R, stride_hm, stride_hr, stride_cn, stride_cr, stride_keep, coef,
              HAS_KEEP: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """coef · (h cᵀ ⊙ keep) on the tile's rows ``safe_m`` and columns ``rn`` (those from N on read as zeros), fp32
    (R padded to BLOCK_R)."""
    rr = tl.arange(0, BLOCK_R)
    h = tl.load(h_ptr + safe_m[:, None] * stride_hm + rr[None, :] * stride_hr, mask=rr[None, :] < R, other=0.0)
    c = tl.load(c_ptr + rn[None, :] * stride_cn + rr[:, None] * stride_cr, mask=(rr[:, None] < R) & (rn[None, :] < N),
                other=0.0)  # fmt: skip
    if UPCAST:
        h = h.to(tl.float32)
        c = c.to(tl.float32)
    low = tl.dot(h, c)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + safe_m[:, None] * stride_keep + rn[None, :], mask=rn[None, :] < N, other=0)
        low = tl.where(keep != 0, low, 0.0)
    return low * coef


@triton.jit
def scaled_mm_low_rank_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    a_scale_ptr,
    b_scale_ptr,
    h_ptr,
    c_ptr,
    keep_ptr,
    bias_ptr,
    M,
    N,
    R,
    stride_am,
    stride_bn,
    stride_om,
    stride_hm,
    stride_hr,
    stride_cn,
    stride_cr,
    stride_keep,
    coef,
    K: tl.constexpr,
    HAS_A_SCALE: tl.constexpr,
    HAS_B_SCALE: tl.constexpr,
    HAS_LOW_RANK: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    FAST_ACCUM: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA: tl.constexpr,
    B_KN: tl.constexpr,
    LOW_RANK_FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out [M, N] = (a bᵀ) ⊙ a_scale ⊙ b_scale + coef · (h cᵀ ⊙ keep) + bias: a [M, K] and b [N, K] e4m3 (K
    contiguous; or bf16 without scales), their row scales (fp32), the low-rank term's factors h [M, R] and c [N, R],
    the keep mask [M, N] (bytes), bias [N]; one output tile a program, accumulated in fp32 and rounded once. K is a compile-time
    constant (a model has a few widths; the loop's trip count is then fixed). With TMA, ``a_ptr`` and ``b_ptr``
    are tensor descriptors of a and b (blocks [BLOCK_M, BLOCK_K] and [BLOCK_N, BLOCK_K]): Hopper's tensor memory
    accelerator loads the tiles, zero-filling past the edges, instead of the threads' own loads. With B_KN, b is
    given as [K, N] (N contiguous, ``stride_bn`` the stride of its rows): a frozen weight W [out, in] is the input
    gradient's b as it is, without a transposed copy. With LOW_RANK_FIRST the low-rank term (divided by the scales)
    is the accumulator's starting value instead of being added after the loop: the epilogue then holds no second
    [BLOCK_M, BLOCK_N] tile in registers (the keep-mask's forms spill without it)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row tiles walk the column tiles together, so the b tiles they share stay in L2
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows past the edge read row 0 (their results are not stored); int64 offsets: 131,072 × 16,384 > 2^31. What
    # runs along N (b's rows when given [K, N], the scales, bias, c, keep, the output) is indexed by rn itself with
    # masks: its contiguity, which a tl.where would hide from the compiler, makes those loads and the store vectors.
    safe_m = tl.where(rm < M, rm, 0).to(tl.int64)
    if not TMA:
        a_ptrs = a_ptr + safe_m[:, None] * stride_am + rk[None, :]
        if B_KN:
            b_ptrs = b_ptr + rk[:, None].to(tl.int64) * stride_bn + rn[None, :]  # [BLOCK_K, BLOCK_N], N-major
        else:
            # bᵀ's tile [BLOCK_K, BLOCK_N], K-major: contiguous along K, so b's rows past the edge may read row 0
            safe_n = tl.where(rn < N, rn, 0).to(tl.int64)
            b_ptrs = b_ptr + safe_n[None, :] * stride_bn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LOW_RANK and LOW_RANK_FIRST:
        # s_a s_b (Σ q_a q_b + L / (s_a s_b)) = s_a s_b Σ q_a q_b + L to fp32 rounding; the scales are at least
        # 1e-12 / 448 each (quantize_rows_reference), so their product stays a normal fp32
        low = _low_rank(h_ptr, c_ptr, keep_ptr, safe_m, rn, N, R, stride_hm, stride_hr, stride_cn, stride_cr,
                        stride_keep, coef, HAS_KEEP, UPCAST, BLOCK_R)  # fmt: skip
        if HAS_A_SCALE:
            low = low / tl.load(a_scale_ptr + safe_m)[:, None]
        if HAS_B_SCALE:
            low = low / tl.load(b_scale_ptr + rn, mask=rn < N, other=1.0)[None, :]
        acc += low
    for start in range(0, K, BLOCK_K):
        if TMA:
            a = a_ptr.load([pid_m * BLOCK_M, start])
            if B_KN:  # noqa: SIM108 (a constant branch: only the taken side is compiled)
                b = b_ptr.load([start, pid_n * BLOCK_N])
            else:
                b = b_ptr.load([pid_n * BLOCK_N, start]).T
        else:
            if EVEN_K:  # noqa: SIM108 (a constant branch: only the taken side is compiled)
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=rk[None, :] < K - start, other=0.0)
            if B_KN:
                b = tl.load(b_ptrs, mask=(rk[:, None] < K - start) & (rn[None, :] < N), other=0.0)
            elif EVEN_K:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=rk[:, None] < K - start, other=0.0)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_bn if B_KN else BLOCK_K
        if UPCAST:  # Triton's CPU interpreter multiplies fp8 (and bf16) tiles wrongly: fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        # Hopper's fp8 MMA accumulates with fewer bits than fp32: unless FAST_ACCUM its partial sum is added to the
        # fp32 accumulator after each K block (as PyTorch's scaled GEMM without fast accumulation promotes its own)
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=None if FAST_ACCUM else BLOCK_K)
    if HAS_A_SCALE:
        acc = acc * tl.load(a_scale_ptr + safe_m)[:, None]
    if HAS_B_SCALE:
        acc = acc * tl.load(b_scale_ptr + rn, mask=rn < N, other=1.0)[None, :]
    if HAS_LOW_RANK and not LOW_RANK_FIRST:
        acc += _low_rank(h_ptr, c_ptr, keep_ptr, safe_m, rn, N, R, stride_hm, stride_hr, stride_cn, stride_cr,
                         stride_keep, coef, HAS_KEEP, UPCAST, BLOCK_R)  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + safe_m[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))
