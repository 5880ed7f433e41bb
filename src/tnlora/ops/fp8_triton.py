"""The Triton kernel of :func:`tnlora.ops.fp8.quantize_rows_triton`: the per-token quantization
(:func:`tnlora.ops.fp8.quantize_rows_reference` says what it computes) as one launch.

One program a row: the row is read once into registers (times the column scales, in fp32), its largest magnitude
taken, and the e4m3 copy and the row's scale written, so a row moves its bytes once in and once out. The scale is
that magnitude times 1/448 (an fp32 product, as the reference's); the quotients are IEEE round-to-nearest
(``div_rn``, as PyTorch's division of two tensors). Each quotient's e4m3 bits are made here
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
    inv_fp8_max,
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
    scale = tl.maximum(amax * inv_fp8_max, scale_floor, propagate_nan=tl.PropagateNan.ALL)
    # NaN propagates through the clip, as torch.clamp's does (compiled for a GPU, a clamp that ignores NaN returns
    # the bound: a NaN row became -448)
    q = _e4m3_bits(tl.clamp(tl.math.div_rn(v, scale), -fp8_max, fp8_max, propagate_nan=tl.PropagateNan.ALL))
    tl.store(q_ptr + row * stride_q + cols, q.to(tl.uint8), mask=ok)  # q_ptr: the e4m3 tensor's bytes
    tl.store(scale_ptr + row, scale)
