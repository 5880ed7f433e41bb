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
the quantization runs as one compiled kernel (PyTorch's ops below, fused by Inductor); elsewhere as those ops.

``fp8_backend: triton`` replaces both with Triton kernels (:mod:`tnlora.ops.fp8_triton`): the quantization as one
launch (:func:`quantize_rows_triton`) and the GEMM with the fused LoRA layer's adapter part added in its epilogue
(:func:`scaled_mm_low_rank_triton`, which also takes bf16 operands without scales: the bf16 layer's GEMMs with
that epilogue, ``tnlora bench train --lora_gemm_kernel triton``).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# A row of zeros gets this scale (its values quantize to zeros) instead of dividing by zero.
_SCALE_FLOOR = 1e-12 / FP8_MAX
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
    scale = (t32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(_SCALE_FLOOR)
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
        t, col, q.view(torch.uint8), scale, t.stride(0), q.stride(0), width, FP8_MAX, _SCALE_FLOOR,
        HAS_COL=col_scale is not None, BLOCK=block, num_warps=min(16, max(4, block // 512)),
    )  # fmt: skip
    return q, scale


@dataclasses.dataclass(frozen=True)
class GemmTiles:
    """The tiles of :func:`scaled_mm_low_rank_triton`: one program an output tile of ``block_m`` × ``block_n``,
    ``block_k`` of the contraction a step, ``group_m`` row tiles walking the column tiles together (L2 reuse);
    ``tma``: the a and b tiles loaded by Hopper's tensor memory accelerator (tensor descriptors) instead of the
    threads' loads; ``low_rank_first``: the low-rank term the accumulator's starting value (divided by the
    scales) rather than added after the loop."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4
    tma: bool = False
    low_rank_first: bool = False


def default_tiles(fp8: bool) -> GemmTiles:
    """:func:`scaled_mm_low_rank_triton`'s tiles when none are given: 128 × 128 output tiles on 8 warps, 4 stages,
    a K step of 128 fp8 or 64 bf16 values (the same bytes). Chosen by what compiling for sm_90 shows (every form
    within a block's shared memory and without register spills), not yet by timing (``benchmarks/gemm.py
    --tiles``)."""
    return GemmTiles() if fp8 else GemmTiles(block_k=64)


def scaled_mm_low_rank_triton(
    a_q: Tensor,
    a_scale: Tensor | None,
    b_q: Tensor,
    b_scale: Tensor | None,
    out_dtype: torch.dtype,
    low_rank: tuple[Tensor, Tensor] | None = None,
    coef: float = 1.0,
    keep: Tensor | None = None,
    bias: Tensor | None = None,
    fast_accum: bool = False,
    tiles: GemmTiles | None = None,
    b_kn: bool = False,
) -> Tensor:
    """a_q [M, K], b_q [N, K] (e4m3, K contiguous), a_scale [M, 1], b_scale [1, N] or None → out [M, N] =
    (a_q b_qᵀ) ⊙ a_scale ⊙ b_scale + coef · (h cᵀ ⊙ keep) + bias in ``out_dtype``, as one Triton GEMM
    (:mod:`tnlora.ops.fp8_triton`; CUDA, or the CPU under Triton's interpreter): the fp8 products accumulated
    in fp32 (each block of ``tiles.block_k`` summed apart, then added, unless ``fast_accum``), then in the same
    fp32 registers the scales, the low-rank term ``low_rank`` = (h [M, R], c [N, R]) with its ``keep`` mask
    [M, N] (bool) and the ``bias`` [N], rounded once. It is ``torch._scaled_mm`` with the fused LoRA layer's
    adapter part added in its epilogue, which ``torch._scaled_mm`` has no operand for: the forward's s · h Bᵀ,
    the input gradient's dropout-masked s · g A. With bf16 operands and no scales (``a_scale`` None) it is the
    bf16 GEMM with that epilogue (``benchmarks/gemm.py`` times it against cuBLAS's β = 1 form). ``b_kn``: b_q
    given as [K, N] (N contiguous), e.g. a weight [out, in] as the input gradient's b without its transpose
    (Hopper's fp8 MMA reads b K-major: for fp8 the compiler then transposes tiles on the way)."""
    import triton

    from tnlora.ops.fp8_triton import scaled_mm_low_rank_kernel

    tiles = tiles or default_tiles(a_q.dtype == FP8)
    (m, k), n = a_q.shape, b_q.shape[1 if b_kn else 0]
    if b_q.shape[0 if b_kn else 1] != k or a_q.stride(-1) != 1 or b_q.stride(-1) != 1:
        want = "b [K, N] with N" if b_kn else "b [N, K] with K"
        raise ValueError(f"scaled_mm_low_rank_triton: a [M, K] with K contiguous and {want} contiguous, got "
                         f"{tuple(a_q.shape)}, {tuple(b_q.shape)}")  # fmt: skip
    out = torch.empty((m, n), device=a_q.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    upcast = not a_q.is_cuda  # the interpreter (see the kernel)
    h, c = low_rank if low_rank is not None else (out, out)  # (an absent operand's pointer: any tensor's)
    if low_rank is not None and not upcast:
        h, c = h.to(out_dtype), c.to(out_dtype)  # the tensor cores' bf16 product, accumulated in fp32
    rank = h.shape[1] if low_rank is not None else 1
    keep_bytes = out
    if keep is not None:
        keep_bytes = (keep if keep.stride(-1) == 1 else keep.contiguous()).view(torch.uint8)
    grid = (triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n),)
    a_arg, b_arg = a_q, b_q
    if tiles.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        b_block = [tiles.block_k, tiles.block_n] if b_kn else [tiles.block_n, tiles.block_k]
        a_arg = TensorDescriptor.from_tensor(a_q, [tiles.block_m, tiles.block_k])
        b_arg = TensorDescriptor.from_tensor(b_q, b_block)
    scaled_mm_low_rank_kernel[grid](
        a_arg, b_arg, out, a_scale.reshape(-1).contiguous() if a_scale is not None else out,
        b_scale.reshape(-1).contiguous() if b_scale is not None else out, h, c, keep_bytes,
        bias if bias is not None else out, m, n, rank, a_q.stride(0), b_q.stride(0), out.stride(0),
        h.stride(0), h.stride(1), c.stride(0), c.stride(1), keep_bytes.stride(0), float(coef), K=k,
        HAS_A_SCALE=a_scale is not None, HAS_B_SCALE=b_scale is not None, HAS_LOW_RANK=low_rank is not None,
        HAS_KEEP=keep is not None, HAS_BIAS=bias is not None, EVEN_K=k % tiles.block_k == 0,
        # the promotion is for fp8's MMA; bf16's accumulates in fp32 as it goes
        FAST_ACCUM=fast_accum or a_q.dtype != FP8, UPCAST=upcast, TMA=tiles.tma, B_KN=b_kn,
        LOW_RANK_FIRST=tiles.low_rank_first,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), GROUP_M=tiles.group_m, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )  # fmt: skip
    return out


def quantize_rows(t: Tensor, col_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`quantize_rows_reference`; on CUDA compiled by Inductor into one kernel instead of the several passes
    and fp32 temporaries of the eager ops. (:func:`quantize_rows_triton` is the candidate to replace it: bit for bit
    the reference under Triton's CPU interpreter, ``benchmarks/gemm.py --quantize`` to time it, not yet run on a
    GPU.)"""
    if not t.is_cuda:
        return quantize_rows_reference(t, col_scale)
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
    "GemmTiles",
    "cpu_row_scaled_mm",
    "default_tiles",
    "dequantized",
    "fp8_input_grad_operands",
    "fp8_linear",
    "fp8_linear_input_grad",
    "fp8_supported",
    "quantize_rows",
    "quantize_rows_reference",
    "quantize_rows_triton",
    "quantize_weight",
    "scaled_mm_low_rank_triton",
]
