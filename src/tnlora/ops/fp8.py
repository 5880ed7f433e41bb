"""The frozen base weights' GEMMs of LoRA training in fp8 (e4m3, one scale a row): ``fp8: true``.

In a LoRA step the frozen weights' two GEMMs (the forward x Wᵀ and the input gradient dy W) are 65–80 % of the
device time, and on an H200 they already run at the bf16 rate the card sustains under load (~660–690 TFLOP/s,
benchmarks/RESULTS.md). Hopper's fp8 tensor cores run twice bf16's rate, so the one way to make those GEMMs
cheaper is to feed them fp8 operands. The adapters, their gradients and everything else stay in the compute dtype:
only the base model's contribution is rounded, as QLoRA rounds it (more coarsely) to 4 bits.

Every operand is quantized with one fp32 scale per row of the GEMM's operand as stored (row-wise scaling): the
weight W [out, in] once at the start of training (one scale per output feature), x [T, in] and dy [T, out] per
token as they arrive. The scales sit outside the fp8 products, so the GEMM ``torch._scaled_mm`` computes is
exactly Σ (qₓ sₓ)(q_w s_w): the products of the dequantized operands, accumulated in fp32. For the input gradient
dx = dy W the contraction runs over W's rows, where the weight's scales are; they are folded into dy before it is
quantized (dy ⊙ s_w is quantized per token) so the one fp8 copy of W serves both GEMMs: its transpose (the layout
the fp8 tensor cores read, K-major) is made for the backward's GEMM and dropped after it, a read and a write of one
byte a weight instead of a second resident copy.

``torch._scaled_mm`` needs a CUDA GPU of compute capability ≥ 8.9 (Ada, Hopper) with widths that are multiples of 16
and a bf16 result; PyTorch's CPU build runs it too (any widths, fp32 or bf16 results), which the tests use. On CUDA
the quantization runs as one kernel (in eager code a Triton kernel of our own, in compiled code PyTorch's ops below,
fused by Inductor with what produced the operand); elsewhere as those ops.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# A row of zeros gets this scale (its values quantize to zeros) instead of dividing by zero.
_SCALE_FLOOR = 1e-12 / FP8_MAX
# A row's scale is its largest magnitude times 1/448 rounded to fp32, not divided by 448: PyTorch's CUDA division by
# a Python number multiplies by the number's reciprocal (its CPU division divides), so the product is the one form
# that the CPU, CUDA and the Triton kernel round alike (one fp32 ulp apart otherwise, which tips exact ties).
_INV_FP8_MAX = 1.0 / FP8_MAX
# Hopper's fp8 GEMMs read both operands K-major in 16-byte pieces: widths that are multiples of 16.
CUDA_WIDTH_MULTIPLE = 16
# The first CUDA compute capability with fp8 tensor cores (Ada; Hopper is 9.0).
CUDA_MIN_CAPABILITY = (8, 9)


def quantize_rows_reference(t: Tensor, col_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """t [M, K] (times ``col_scale`` [1, K] first, in fp32) → (q [M, K] e4m3, scale [M, 1] fp32) with each row
    ≈ q · scale, its largest magnitude mapped to 448 (e4m3's largest finite value)."""
    t32 = t.float()
    if col_scale is not None:
        t32 = t32 * col_scale
    scale = (t32.abs().amax(dim=-1, keepdim=True) * _INV_FP8_MAX).clamp_min(_SCALE_FLOOR)
    # e4m3fn has no infinity: a value rounding past 448 would become NaN, so the (at most one-ulp) excess is clipped
    # (row-major whatever t's layout: the fp8 GEMM reads its first operand K-major)
    q = (t32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous()
    return q, scale


@functools.cache
def _compiled_quantize():
    return torch.compile(quantize_rows_reference, dynamic=True, fullgraph=True)


# The widest row the Triton kernel holds in registers (one program a row; 7B's widest operand, qkvu's dy, is 16,384).
TRITON_MAX_WIDTH = 16_384


def quantize_rows_triton(t: Tensor, col_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`quantize_rows_reference` for t [M, K] (K ≤ ``TRITON_MAX_WIDTH``; CUDA, or the CPU under Triton's
    interpreter) as one Triton launch (:mod:`tnlora.ops.fp8_triton`): each row read once, its e4m3 copy and scale
    written; equal to the reference bit for bit."""
    import triton

    from tnlora.ops.fp8_triton import quantize_rows_kernel

    rows, width = t.shape
    if width > TRITON_MAX_WIDTH:
        raise ValueError(f"quantize_rows_triton: rows of at most {TRITON_MAX_WIDTH} values, got {width}")
    if t.stride(-1) != 1:
        t = t.contiguous()
    q = torch.empty((rows, width), device=t.device, dtype=FP8)
    scale = torch.empty((rows, 1), device=t.device, dtype=torch.float32)
    if rows == 0:
        return q, scale
    col = col_scale.reshape(-1).float().contiguous() if col_scale is not None else scale
    block = triton.next_power_of_2(width)
    quantize_rows_kernel[(rows,)](
        t, col, q.view(torch.uint8), scale, t.stride(0), q.stride(0), width, FP8_MAX, _INV_FP8_MAX, _SCALE_FLOOR,
        HAS_COL=col_scale is not None, BLOCK=block, num_warps=min(16, max(4, block // 512)),
    )  # fmt: skip
    return q, scale


def quantize_rows(t: Tensor, col_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`quantize_rows_reference`; on CUDA one launch instead of the several passes and fp32 temporaries of
    the eager ops: the Triton kernel (:func:`quantize_rows_triton`) for rows of up to ``TRITON_MAX_WIDTH`` values
    where triton is installed (the reference's bits), else the ops compiled by Inductor."""
    if not t.is_cuda:
        return quantize_rows_reference(t, col_scale)
    from tnlora.ops.select import triton_available

    if t.shape[-1] <= TRITON_MAX_WIDTH and triton_available():
        return quantize_rows_triton(t, col_scale)
    return _compiled_quantize()(t, col_scale)


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A frozen weight [out, in] as (q [out, in] e4m3, scale [1, out] fp32): the forward GEMM's second operand and
    its column scales (``torch._scaled_mm``'s ``scale_b``)."""
    q, scale = quantize_rows_reference(weight.detach())
    return q, scale.reshape(1, -1).contiguous()


@functools.cache
def cpu_row_scaled_mm() -> bool:
    """Whether this PyTorch's CPU build runs ``torch._scaled_mm`` with row-wise scales (tried once, on 16 × 16)."""
    a = torch.zeros(16, 16).to(FP8)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def fp8_supported(weight: Tensor) -> bool:
    """Whether a frozen weight [out, in] can take the fp8 GEMMs where it is: on CUDA a card of compute capability
    ≥ 8.9 and both widths multiples of 16; on the CPU any, where PyTorch's CPU build has the row-scaled GEMM."""
    if weight.device.type == "cpu":
        return cpu_row_scaled_mm()
    if not weight.is_cuda or torch.cuda.get_device_capability(weight.device) < CUDA_MIN_CAPABILITY:
        return False
    return all(width % CUDA_WIDTH_MULTIPLE == 0 for width in weight.shape)


def fp8_linear(
    x: Tensor,
    weight_q: Tensor,
    weight_scale: Tensor,
    out_dtype: torch.dtype,
    x_fp8: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """x [T, in] → x Wᵀ [T, out] in ``out_dtype``, W given as :func:`quantize_weight` returns it; x is quantized per
    token here unless ``x_fp8`` brings it so (compiled code quantizes it where Inductor fuses that with x's
    producer)."""
    xq, x_scale = x_fp8 if x_fp8 is not None else quantize_rows(x)
    return torch._scaled_mm(xq, weight_q.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=out_dtype)


def fp8_input_grad_operands(
    dy: Tensor, weight_q: Tensor, weight_scale: Tensor, quantize=None
) -> tuple[Tensor, Tensor, Tensor]:
    """(q, scale) of dy ⊙ s_w per token, and q_wᵀ stored [in, out]: the operands of :func:`fp8_linear_input_grad`
    (the fp8 GEMM reads its second operand K-major; the transpose is made for this product alone). ``quantize``:
    :func:`quantize_rows` unless given (compiled code passes the reference ops, for Inductor to fuse)."""
    dyq, dy_scale = (quantize or quantize_rows)(dy, weight_scale)
    return dyq, dy_scale, weight_q.t().contiguous()


def fp8_linear_input_grad(
    dy: Tensor,
    weight_q: Tensor,
    weight_scale: Tensor,
    out_dtype: torch.dtype,
    operands: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """dy [T, out] → dy W [T, in] in ``out_dtype``: W = diag(s_w) q_w, so dy W = (dy ⊙ s_w) q_w, with dy ⊙ s_w
    quantized per token (:func:`fp8_input_grad_operands`, or ``operands`` as it returns them)."""
    dyq, dy_scale, weight_t = operands if operands is not None else fp8_input_grad_operands(dy, weight_q, weight_scale)
    ones = torch.ones((1, weight_q.shape[1]), device=dy.device, dtype=torch.float32)
    return torch._scaled_mm(dyq, weight_t.t(), scale_a=dy_scale, scale_b=ones, out_dtype=out_dtype)


def dequantized(q: Tensor, scale: Tensor) -> Tensor:
    """q · scale in fp32 (scale [M, 1] for rows, or [1, M] as :func:`quantize_weight` keeps a weight's)."""
    return q.float() * (scale.reshape(-1, 1))


__all__ = [
    "CUDA_MIN_CAPABILITY",
    "FP8",
    "cpu_row_scaled_mm",
    "dequantized",
    "fp8_input_grad_operands",
    "fp8_linear",
    "fp8_linear_input_grad",
    "fp8_supported",
    "quantize_rows",
    "quantize_rows_reference",
    "quantize_rows_triton",
    "quantize_weight",
]
