"""The Triton kernel of :func:`tnlora.ops.fp8.quantize_rows_triton`: the per-token quantization
(:func:`tnlora.ops.fp8.quantize_rows_reference` says what it computes) as one launch.

One program a row: the row is read once into registers (times the column scales, in fp32), its largest magnitude
taken, and the e4m3 copy and the row's scale written, so a row moves its bytes once in and once out. The
divisions are IEEE round-to-nearest (``div_rn``, as PyTorch's ``/``) and the e4m3 conversion rounds to nearest
even after the clamp, so the result is the reference's bit for bit.

This module imports triton at import; ``tnlora.ops.fp8`` imports it on first use only.
"""

import triton
import triton.language as tl


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
    amax = tl.max(tl.abs(v), axis=0)
    scale = tl.maximum(tl.math.div_rn(amax, fp8_max), scale_floor)
    q = tl.clamp(tl.math.div_rn(v, scale), -fp8_max, fp8_max)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(scale_ptr + row, scale)
