"""A LoRA-adapted linear layer as one operation: y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ.

peft's LoRA layer computes the base output, then the adapter's output as a tensor of the base output's size,
then scales it and adds it: three passes over a [tokens, out_features] tensor (one written by the B matmul,
read and written again by the scale and the add) on top of the base matmul's own write, and the same again in
the backward for the input's gradient. At TNL's widths (qkvu_proj writes 4 × hidden) and packed micro-batches
of 32k tokens those passes are memory-bound work comparable to a GEMM. Here the adapter's B matmul accumulates
into the output of the base GEMM (the adapter's output is written first, and the base GEMM adds x Wᵀ to it in its
epilogue, β = 1), and in the backward the base's input gradient accumulates onto the adapter's the same way; the
rank-r products (x Aᵀ, the gradient through B) are the only extra tensors.

Numerically it is the same function as peft's layer: the sums are the same, grouped in one GEMM's fp32
accumulation instead of rounded to the compute dtype between matmul, scale and add.
``lora_linear_reference`` is the plain composition (peft's order) that the tests check it against.

In compiled code the fused form runs as two custom operators (``tnlora::lora_linear`` and its backward,
``torch.library``) that the compiler calls as they are: left to itself, Inductor lowers an in-place β = 1 GEMM
as a copy of the output followed by the GEMM (163 device-to-device copies, 17 ms a 1B step). With the operators
the compiled 1B step gains 2.4 % over peft's composition, which Inductor fuses itself (``compiled_op=False``;
benchmarks/RESULTS.md).

The compute dtype is the autocast dtype where autocast is on (as ``F.linear`` under autocast would compute),
else the input's; the adapter's gradients come back in its weights' dtype (fp32 adapters under bf16 autocast).

With ``output_needed=False`` the operation saves what it always saves but leaves its output's values
uncomputed: the recompute of a checkpointed layer regenerates only the tensors its backward reads, and the
layer's last projection (TNL's GLU output ``l3``) feeds nothing the backward reads, only the residual add. Its
frozen GEMM is a fifth of the recomputed layer's GEMM work (7B: 45.1 M of 219 M frozen weights; 1B: 11.5 of
55.6 M), and the backward needs none of it (its own input gradient is dy W, from the frozen weight alone).

With ``dropout_kernel="triton"`` (opt-in) the dropout mask is one byte an element, applied inside Triton kernels
where x is read (:mod:`tnlora.ops.lora_dropout`): the dropped input is neither written nor kept for the backward,
which reads x itself.

:func:`lora_linear_pair` is two such layers that read one input (TNL's GLU: ``l1`` and ``l2`` of the channel
norm's output) as one operation: both adapters' A products read x once ([T, r₁ + r₂] at once), and in the
backward both dA from one more read of x, and one input gradient (the adapters' part written once, both frozen
GEMMs adding to it) where two would each be written and then summed.

With ``weight_fp8`` (``fp8: true``) the two frozen GEMMs run on fp8 operands (:mod:`tnlora.ops.fp8`).
``torch._scaled_mm`` takes no output to accumulate into, so the adapter's part is added to its result afterwards:
the pass over the output that the β = 1 epilogue hides in the bf16 form comes back (one read and write of y).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tnlora.choices import KERNEL_CHOICES
from tnlora.ops.fp8 import fp8_input_grad_operands, fp8_linear, fp8_linear_input_grad, quantize_rows_reference
from tnlora.ops.lora_dropout import draw_keep, dropout_down, dropout_grad_a, dropout_up
from tnlora.ops.lora_grad import lora_dy_products, lora_dy_products_reference


def lora_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """peft's vanilla LoRA forward: base(x) + B(A(dropout(x))) · scaling."""
    return F.linear(x, weight, bias) + F.linear(F.linear(F.dropout(x, dropout, training), lora_a), lora_b) * scaling


# The size of dy (rows × the projection's output width) from which grad_kernel "auto" takes the one-read kernel.
# Alone, against cuBLAS's two GEMMs, it wins from about this size and loses below it on both cards measured: at
# 2^28 elements 1B's qkvu at 32,768 rows (H100 0.393 → 0.315 ms, H200 0.274 → 0.252), 7B's qkvu at 16,384 and
# out_proj at 65,536; below it 1B's out_proj and l3 at 65,536 rows (H200 0.156 against 0.182 ms) and 7B's qkvu at
# 8,192 (a tie) (benchmarks/RESULTS.md, "The activation kernel and the LoRA backward's products of dy, alone" and
# "Every rank-8 product alone"). A rows rule (65,536) took the one read for every projection from there.
LORA_GRAD_MIN_ELEMENTS = 1 << 28


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
    compiled_op: bool = True,
    output_needed: bool = True,
    grad_kernel: str = "auto",
    weight_fp8: tuple[Tensor, Tensor] | None = None,
    dropout_kernel: str = "auto",
) -> Tensor:
    """x [..., in] → [..., out] through the frozen ``weight`` [out, in] (and ``bias``) plus the adapter
    ``lora_a`` [r, in], ``lora_b`` [out, r] scaled by ``scaling``, with dropout ``dropout`` on the adapter's
    input in training. Gradients flow to x, lora_a and lora_b. A trainable base weight (not LoRA's case) takes
    :func:`lora_linear_reference`; compiled code calls the custom operators, or with ``compiled_op=False``
    runs the composition. ``output_needed=False`` (the fused form only): the returned tensor is allocated but
    not computed, while what the backward reads is saved as always (a checkpointed layer's recompute).
    ``grad_kernel="triton"`` (the fused form, CUDA tensors): the backward's two products of dy (g = dy B and
    dB) come from one read of dy (:mod:`tnlora.ops.lora_grad`) instead of two GEMMs; "auto" (the default): so
    where dy holds ``LORA_GRAD_MIN_ELEMENTS`` elements or more, "torch": always the two GEMMs. ``weight_fp8`` (the
    fused form): the frozen weight as :func:`tnlora.ops.fp8.quantize_weight` returns it, so the frozen GEMMs
    (x Wᵀ and dy W) run in fp8 with x and dy quantized per token; the adapter's products and gradients are
    unchanged.
    ``dropout_kernel="triton"`` (the fused form, dropout in training): a byte mask applied inside Triton kernels
    (:mod:`tnlora.ops.lora_dropout`), so the dropped input is neither written nor kept; "auto" (the default) and
    "torch": PyTorch's dropout (:func:`dropout_in_kernels`)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        if weight_fp8 is not None:
            raise ValueError("lora_linear: an fp8 copy of the base weight is for a frozen weight only")
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, dropout, training)
    p = dropout if training else 0.0
    one_read = reads_dy_once(grad_kernel, x.numel() // max(1, x.shape[-1]), weight.shape[0], x.is_cuda)
    byte_mask = p > 0.0 and dropout_in_kernels(dropout_kernel, x.is_cuda)
    weight_q, weight_scale = weight_fp8 if weight_fp8 is not None else (None, None)
    if torch.compiler.is_compiling():
        if not compiled_op and weight_fp8 is None:
            return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, dropout, training)
        return _lora_linear_op_call(
            x, weight, bias, lora_a, lora_b, scaling, p, output_needed, one_read, weight_q, weight_scale, byte_mask
        )
    return _LoraLinear.apply(
        x, weight, bias, lora_a, lora_b, scaling, p, output_needed, one_read, weight_q, weight_scale, byte_mask
    )


def reads_dy_once(grad_kernel: str, rows: int, cols: int, cuda: bool) -> bool:
    """Whether a fused LoRA layer's backward takes g and dB from one read of dy (:func:`lora_linear`'s
    ``grad_kernel`` for dy of ``rows`` rows and ``cols`` columns, on CUDA or not)."""
    if grad_kernel not in KERNEL_CHOICES:
        raise ValueError(f"grad_kernel must be 'auto', 'torch' or 'triton', got {grad_kernel!r}")
    return cuda and (grad_kernel == "triton" or (grad_kernel == "auto" and rows * cols >= LORA_GRAD_MIN_ELEMENTS))


def dropout_in_kernels(dropout_kernel: str, cuda: bool) -> bool:
    """Whether a fused LoRA layer's dropout runs in the kernels of :mod:`tnlora.ops.lora_dropout`
    (:func:`lora_linear`'s ``dropout_kernel``; "triton" on any device: CPU tensors under Triton's interpreter).
    "auto" is PyTorch's dropout: the kernels tie with it in a training step and save the dropped input's memory
    (benchmarks/RESULTS.md, "LoRA's dropout inside the kernels")."""
    if dropout_kernel not in KERNEL_CHOICES:
        raise ValueError(f"dropout_kernel must be 'auto', 'torch' or 'triton', got {dropout_kernel!r}")
    return dropout_kernel == "triton"


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _in_compute_dtype(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """x flattened to [T, in] and every operand in the compute dtype (:func:`_compute_dtype`)."""
    dtype = _compute_dtype(x)
    return (x.reshape(-1, x.shape[-1]).to(dtype), *_weights_in(dtype, weight, bias, lora_a, lora_b))


def _weights_in(
    dtype: torch.dtype, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """One projection's weight, bias, A and B in ``dtype``."""
    return weight.to(dtype), bias.to(dtype) if bias is not None else None, lora_a.to(dtype), lora_b.to(dtype)


def _forward_gemms(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float, p: float,
    output_needed: bool, weight_q: Tensor | None = None, weight_scale: Tensor | None = None,
    x_fp8: tuple[Tensor, Tensor] | None = None, byte_mask: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(y, s · h, drop(x), kept-mask or None without dropout) for x [T, in] and the weights in one compute dtype
    (``byte_mask``: x itself and a uint8 mask, :mod:`tnlora.ops.lora_dropout`):
    with h = drop(x) Aᵀ, y = s · h Bᵀ (+ b) is written first, then the frozen GEMM adds x Wᵀ to it (β = 1).
    Without ``output_needed`` y is left uncomputed (:func:`lora_linear`). With ``weight_q`` the frozen GEMM is
    the fp8 one (:func:`tnlora.ops.fp8.fp8_linear`; x quantized there, or given so in ``x_fp8``), which has no
    β = 1 form: s · h Bᵀ is added to its result."""
    if p > 0.0 and byte_mask:
        # a byte mask applied where the kernels read x: drop(x) is never written, the backward reads x again
        xd, mask = x, draw_keep(x, p)
        hs = dropout_down(x, mask, lora_a * (scaling / (1.0 - p)))
    else:
        # F.dropout's own kernel and draw (one pass; the kept-mask comes back for the backward)
        xd, mask = torch.ops.aten.native_dropout(x, p, True) if p > 0.0 else (x, None)
        hs = xd @ (lora_a.t() * scaling)  # the scale on the [in, r] factor, not on a [T, ...] tensor
    if not output_needed:
        return x.new_empty((x.shape[0], weight.shape[0])), hs, xd, mask
    if weight_q is not None:
        y = fp8_linear(x, weight_q, weight_scale, x.dtype, x_fp8)
        y.addmm_(hs, lora_b.t())
        if bias is not None:
            y.add_(bias)
        return y, hs, xd, mask
    # The adapter's output is written once and the large GEMM reads it in its epilogue, where its compute hides
    # the read. Adding it afterwards (y += hs Bᵀ, β = 1) read and wrote the whole output again: 0.6 s of an
    # 11.1 s 7B step at 131,072 tokens, 3.6 % of a 1B step.
    y = hs @ lora_b.t()
    if bias is not None:
        y.add_(bias)
    y.addmm_(x, weight.t())
    return y, hs, xd, mask


def _backward_gemms(
    dy: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, xd: Tensor, hs: Tensor, mask: Tensor | None,
    scaling: float, p: float, needs: tuple[bool, bool, bool], one_read: bool = False,
    weight_q: Tensor | None = None, weight_scale: Tensor | None = None,
    fp8_operands: tuple[Tensor, Tensor, Tensor] | None = None, byte_mask: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dA, dB) in the compute dtype, each only where ``needs`` (x, A, B) asks for it, with hs = s · h:
    g = dy B; dx = s · (g A) ⊙ mask, then dx += dy W in the large GEMM (β = 1); dA = s · gᵀ drop(x);
    dB = dyᵀ hs. With ``one_read`` g and dB come from one pass over dy (:func:`lora_dy_products`). With
    ``weight_q`` dy W is the fp8 GEMM (:func:`tnlora.ops.fp8.fp8_linear_input_grad`, its operands made there or
    given in ``fp8_operands``) and the adapter's part is added to it. ``byte_mask``: ``xd`` is x itself and ``mask``
    the uint8 mask the forward drew (:mod:`tnlora.ops.lora_dropout`)."""
    if needs[2]:
        g, grad_b = (lora_dy_products if one_read else lora_dy_products_reference)(dy, lora_b, hs)
    else:
        g, grad_b = dy @ lora_b, None  # g [T, r]: the gradient reaching h, before the scaling
    coef = scaling if mask is None else scaling / (1.0 - p)  # the kept values' scale
    if byte_mask:  # (only with dropout)
        grad_x, grad_a = _backward_byte_mask(
            dy, weight, lora_a, g, xd, mask, coef, needs, weight_q, weight_scale, fp8_operands
        )
        return grad_x, grad_a, grad_b
    grad_a = (g.t() @ xd).mul_(scaling) if needs[1] else None
    grad_x = None
    if needs[0] and weight_q is not None:
        grad_x = fp8_linear_input_grad(dy, weight_q, weight_scale, dy.dtype, fp8_operands)
        if mask is None:
            grad_x.addmm_(g, lora_a * scaling)
        else:
            grad_x.add_(torch.ops.aten.native_dropout_backward(g @ lora_a, mask, coef))
    elif needs[0]:
        if mask is None:
            grad_x = g @ (lora_a * scaling)
        else:
            grad_x = torch.ops.aten.native_dropout_backward(g @ lora_a, mask, coef)
        grad_x.addmm_(dy, weight)
    return grad_x, grad_a, grad_b


def _backward_byte_mask(
    dy: Tensor, weight: Tensor, lora_a: Tensor, g: Tensor, x: Tensor, keep: Tensor, coef: float,
    needs: tuple[bool, bool, bool], weight_q: Tensor | None, weight_scale: Tensor | None,
    fp8_operands: tuple[Tensor, Tensor, Tensor] | None,
) -> tuple[Tensor | None, Tensor | None]:
    """(dx, dA) of :func:`_backward_gemms` with the mask ``keep`` read in the kernels, ``coef`` = s / (1 − p):
    dA = coef · gᵀ (x ⊙ keep); dx = coef · (g A) ⊙ keep written first, then dy W added (β = 1), or added in place
    to the fp8 GEMM's dy W."""
    grad_a = dropout_grad_a(g, x, keep, coef) if needs[1] else None
    if not needs[0]:
        return None, grad_a
    scaled_a = lora_a * coef
    if weight_q is not None:
        grad_x = fp8_linear_input_grad(dy, weight_q, weight_scale, dy.dtype, fp8_operands)
        return dropout_up(g, scaled_a, keep, out=grad_x), grad_a
    return dropout_up(g, scaled_a, keep).addmm_(dy, weight), grad_a


class _LoraLinear(torch.autograd.Function):
    """:func:`_forward_gemms` and :func:`_backward_gemms` in eager code, with the casts to the compute dtype."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, lora_a, lora_b, scaling, p, output_needed, one_read, weight_q, weight_scale, byte_mask
    ):
        operands = _in_compute_dtype(x, weight, bias, lora_a, lora_b)
        y, hs, xd, mask = _forward_gemms(*operands, scaling, p, output_needed, weight_q, weight_scale, None, byte_mask)
        ctx.save_for_backward(weight, lora_a, lora_b, xd, hs, mask, weight_q, weight_scale)
        ctx.scaling, ctx.dtype, ctx.x_shape, ctx.x_dtype = scaling, y.dtype, x.shape, x.dtype
        ctx.p, ctx.one_read, ctx.byte_mask = p, one_read, byte_mask
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        weight, lora_a, lora_b, xd, hs, mask, weight_q, weight_scale = ctx.saved_tensors
        dtype = ctx.dtype
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        grad_x, grad_a, grad_b = _backward_gemms(
            dy.reshape(-1, dy.shape[-1]).to(dtype), weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype), xd, hs,
            mask, ctx.scaling, ctx.p, needs, ctx.one_read, weight_q, weight_scale, None, ctx.byte_mask,
        )  # fmt: skip
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        if grad_a is not None:
            grad_a = grad_a.to(lora_a.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(lora_b.dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None, None, None


# The same computation as custom operators, for compiled code: the casts to the compute dtype stay outside (where
# the compiler sees them and autograd casts the gradients back); inside, the same GEMMs as _LoraLinear's.


@torch.library.custom_op("tnlora::lora_linear", mutates_args=())
def _lora_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float, p: float,
    output_needed: bool, one_read: bool, weight_q: Tensor | None, weight_scale: Tensor | None, x_q: Tensor | None,
    x_scale: Tensor | None, byte_mask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, s · h, drop(x), kept-mask) for x [T, in] and the weights in one dtype; without dropout the last two are
    empty (an operator's outputs may not alias its inputs); ``byte_mask``: drop(x) empty (the backward reads x) and
    the mask (uint8 [T, in]). ``one_read`` is for the backward; with ``weight_q`` the frozen GEMM is fp8, x
    quantized as ``x_q``, ``x_scale`` (or here, without them)."""
    x_fp8 = (x_q, x_scale) if x_q is not None else None
    y, hs, xd, mask = _forward_gemms(
        x, weight, bias, lora_a, lora_b, scaling, p, output_needed, weight_q, weight_scale, x_fp8, byte_mask
    )
    if mask is None:
        return y, hs, x.new_empty((0, x.shape[1])), x.new_empty((0, x.shape[1]), dtype=torch.bool)
    if byte_mask:
        return y, hs, x.new_empty((0, x.shape[1])), mask
    return y, hs, xd, mask


@_lora_linear_op.register_fake
def _lora_linear_op_fake(
    x, weight, bias, lora_a, lora_b, scaling, p, output_needed, one_read, weight_q, weight_scale, x_q, x_scale,
    byte_mask,
):
    rows, width = x.shape
    kept = rows if p > 0.0 and not byte_mask else 0
    if p > 0.0 and byte_mask:
        mask = x.new_empty((rows, width), dtype=torch.uint8)
    else:
        mask = x.new_empty((kept, width), dtype=torch.bool)
    return (x.new_empty((rows, weight.shape[0])), x.new_empty((rows, lora_a.shape[0])), x.new_empty((kept, width)), mask)


@torch.library.custom_op("tnlora::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    dy: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, xd: Tensor, hs: Tensor, mask: Tensor,
    scaling: float, p: float, needs_x: bool, one_read: bool, weight_q: Tensor | None, weight_scale: Tensor | None,
    dy_q: Tensor | None, dy_scale: Tensor | None, weight_t: Tensor | None, byte_mask: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) as _LoraLinear's backward computes them; dx is empty unless ``needs_x``. With ``weight_q`` the
    input gradient's frozen GEMM is fp8, on ``dy_q``, ``dy_scale``, ``weight_t`` (or operands made here);
    ``byte_mask``: ``xd`` is x and ``mask`` the uint8 mask."""
    operands = (dy_q, dy_scale, weight_t) if dy_q is not None else None
    grad_x, grad_a, grad_b = _backward_gemms(
        dy, weight, lora_a, lora_b, xd, hs, mask if p > 0.0 else None, scaling, p, (needs_x, True, True), one_read,
        weight_q, weight_scale, operands, byte_mask,
    )
    return (grad_x if grad_x is not None else dy.new_empty((0,))), grad_a, grad_b


@_lora_linear_backward_op.register_fake
def _lora_linear_backward_op_fake(
    dy, weight, lora_a, lora_b, xd, hs, mask, scaling, p, needs_x, one_read, weight_q, weight_scale, dy_q, dy_scale,
    weight_t, byte_mask,
):
    grad_x = dy.new_empty((dy.shape[0], weight.shape[1])) if needs_x else dy.new_empty((0,))
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b)


def _lora_linear_op_setup(ctx, inputs, output) -> None:
    x, weight, _bias, lora_a, lora_b, scaling, p, _output_needed, one_read, weight_q, weight_scale, _xq, _xs, byte_mask = (
        inputs
    )
    _y, hs, xd, mask = output
    ctx.save_for_backward(weight, lora_a, lora_b, xd if p > 0.0 and not byte_mask else x, hs, mask, weight_q, weight_scale)
    ctx.scaling, ctx.p, ctx.one_read, ctx.byte_mask = scaling, p, one_read, byte_mask


def _lora_linear_op_backward(ctx, dy, _dh, _dxd, _dmask):
    weight, lora_a, lora_b, xd, hs, mask, weight_q, weight_scale = ctx.saved_tensors
    needs_x = ctx.needs_input_grad[0]
    dy = dy.to(hs.dtype)
    operands = (None, None, None)
    if weight_q is not None and needs_x:
        # traced with the backward graph: Inductor fuses dy's quantization with the kernel that produced dy
        operands = fp8_input_grad_operands(dy, weight_q, weight_scale, quantize_rows_reference)
    grad_x, grad_a, grad_b = torch.ops.tnlora.lora_linear_backward(
        dy, weight, lora_a, lora_b, xd, hs, mask, ctx.scaling, ctx.p, needs_x, ctx.one_read, weight_q, weight_scale,
        *operands, ctx.byte_mask,
    )  # fmt: skip
    return (grad_x if needs_x else None), None, None, grad_a, grad_b, *([None] * 9)


torch.library.register_autograd(
    "tnlora::lora_linear", _lora_linear_op_backward, setup_context=_lora_linear_op_setup
)


def _lora_linear_op_call(
    x, weight, bias, lora_a, lora_b, scaling, p, output_needed, one_read, weight_q=None, weight_scale=None,
    byte_mask=False,
) -> Tensor:
    """lora_linear through the custom operators: inputs cast to the compute dtype, rows flattened; with an fp8
    base, x quantized here, in the traced graph, where Inductor fuses it with x's producer (a norm)."""
    operands = _in_compute_dtype(x, weight, bias, lora_a, lora_b)
    x_fp8 = (None, None)
    if weight_q is not None and output_needed:
        x_fp8 = quantize_rows_reference(operands[0])
    y = torch.ops.tnlora.lora_linear(
        *operands, scaling, p, output_needed, one_read, weight_q, weight_scale, *x_fp8, byte_mask
    )[0]
    return y.reshape(*x.shape[:-1], y.shape[-1])


class LoraOperands(NamedTuple):
    """One adapted projection of :func:`lora_linear_pair`: the frozen ``weight`` [out, in] and ``bias``, the adapter
    ``lora_a`` [r, in] and ``lora_b`` [out, r], and its ``scaling``."""

    weight: Tensor
    bias: Tensor | None
    lora_a: Tensor
    lora_b: Tensor
    scaling: float


def lora_linear_pair(
    x: Tensor, first: LoraOperands, second: LoraOperands, compiled_op: bool = True, grad_kernel: str = "auto"
) -> tuple[Tensor, Tensor]:
    """(:func:`lora_linear` of x through ``first``, the same through ``second``) for two adapted projections of one
    input x [..., in], without dropout, as one operation: the adapters' down products of x in one GEMM, and one
    input gradient for both. Gradients flow to x and both adapters; the frozen weights must not require them.
    ``compiled_op``, ``grad_kernel``: as :func:`lora_linear` (compiled code without the operators runs each
    projection's composition)."""
    for operands in (first, second):
        if operands.weight.requires_grad or (operands.bias is not None and operands.bias.requires_grad):
            raise ValueError("lora_linear_pair: the frozen weights must not require gradients")
    rows = x.numel() // max(1, x.shape[-1])
    one_read = reads_dy_once(grad_kernel, rows, min(first.weight.shape[0], second.weight.shape[0]), x.is_cuda)
    if torch.compiler.is_compiling():
        if not compiled_op:
            return tuple(lora_linear_reference(x, *operands) for operands in (first, second))  # type: ignore[return-value]
        return _lora_pair_op_call(x, first, second, one_read)
    y1, y2 = _LoraPair.apply(x, *first[:4], *second[:4], first.scaling, second.scaling, one_read)
    return y1, y2


def _pair_in_compute_dtype(x: Tensor, first: LoraOperands, second: LoraOperands) -> tuple[Tensor, ...]:
    """x [T, in] and both projections' weights (weight, bias, A, B, weight, bias, A, B) in the compute dtype."""
    dtype = _compute_dtype(x)
    return (x.reshape(-1, x.shape[-1]).to(dtype), *_weights_in(dtype, *first[:4]), *_weights_in(dtype, *second[:4]))


def _pair_forward_gemms(
    x: Tensor, w1: Tensor, bias1: Tensor | None, a1: Tensor, b1: Tensor, w2: Tensor, bias2: Tensor | None,
    a2: Tensor, b2: Tensor, s1: float, s2: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y1, y2, hs) for x [T, in]: hs = x [s₁A₁; s₂A₂]ᵀ [T, r₁ + r₂] in one GEMM, then each y written as its
    adapter's part and its frozen GEMM added to it (β = 1), as :func:`_forward_gemms`."""
    r1 = a1.shape[0]
    hs = x @ torch.cat([a1 * s1, a2 * s2]).t()
    outputs = []
    for h, weight, bias, lora_b in ((hs[:, :r1], w1, bias1, b1), (hs[:, r1:], w2, bias2, b2)):
        y = h @ lora_b.t()
        if bias is not None:
            y.add_(bias)
        outputs.append(y.addmm_(x, weight.t()))
    return outputs[0], outputs[1], hs


def _pair_backward_gemms(
    dy1: Tensor, dy2: Tensor, x: Tensor, w1: Tensor, w2: Tensor, a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor,
    hs: Tensor, s1: float, s2: float, needs_x: bool, one_read: bool,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor]:
    """(dx or None, dA₁, dB₁, dA₂, dB₂) of :func:`_pair_forward_gemms`: each g = dy B and dB as
    :func:`_backward_gemms` computes them; [dA₁; dA₂] = [g₁ g₂]ᵀ x in one GEMM; dx = [g₁ g₂] [s₁A₁; s₂A₂] written
    once, then both frozen GEMMs added to it (β = 1)."""
    r1 = a1.shape[0]
    products = lora_dy_products if one_read else lora_dy_products_reference
    g1, grad_b1 = products(dy1, b1, hs[:, :r1])
    g2, grad_b2 = products(dy2, b2, hs[:, r1:])
    g = torch.cat([g1, g2], dim=1)
    grad_a = g.t() @ x
    grad_x = None
    if needs_x:
        grad_x = g @ torch.cat([a1 * s1, a2 * s2])
        grad_x.addmm_(dy1, w1).addmm_(dy2, w2)
    return grad_x, grad_a[:r1] * s1, grad_b1, grad_a[r1:] * s2, grad_b2


class _LoraPair(torch.autograd.Function):
    """:func:`_pair_forward_gemms` and :func:`_pair_backward_gemms` in eager code, with the casts to the compute
    dtype."""

    @staticmethod
    def forward(ctx, x, w1, bias1, a1, b1, w2, bias2, a2, b2, s1, s2, one_read):
        first, second = LoraOperands(w1, bias1, a1, b1, s1), LoraOperands(w2, bias2, a2, b2, s2)
        operands = _pair_in_compute_dtype(x, first, second)
        y1, y2, hs = _pair_forward_gemms(*operands, s1, s2)
        x2, cw1, _, ca1, cb1, cw2, _, ca2, cb2 = operands
        ctx.save_for_backward(x2, cw1, cw2, ca1, ca2, cb1, cb2, hs)
        ctx.scales, ctx.one_read, ctx.x_shape, ctx.x_dtype = (s1, s2), one_read, x.shape, x.dtype
        ctx.adapter_dtypes = (a1.dtype, b1.dtype, a2.dtype, b2.dtype)
        rows = x.shape[:-1]
        return y1.reshape(*rows, y1.shape[-1]), y2.reshape(*rows, y2.shape[-1])

    @staticmethod
    def backward(ctx, dy1, dy2):
        x2, w1, w2, a1, a2, b1, b2, hs = ctx.saved_tensors
        dy1, dy2 = (d.reshape(-1, d.shape[-1]).to(hs.dtype) for d in (dy1, dy2))
        grad_x, *adapters = _pair_backward_gemms(
            dy1, dy2, x2, w1, w2, a1, a2, b1, b2, hs, *ctx.scales, ctx.needs_input_grad[0], ctx.one_read
        )
        grad_a1, grad_b1, grad_a2, grad_b2 = (g.to(dtype) for g, dtype in zip(adapters, ctx.adapter_dtypes, strict=True))
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None, grad_a1, grad_b1, None, None, grad_a2, grad_b2, None, None, None


@torch.library.custom_op("tnlora::lora_pair", mutates_args=())
def _lora_pair_op(
    x: Tensor, w1: Tensor, bias1: Tensor | None, a1: Tensor, b1: Tensor, w2: Tensor, bias2: Tensor | None,
    a2: Tensor, b2: Tensor, s1: float, s2: float, one_read: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y1, y2, hs) of :func:`_pair_forward_gemms` for x [T, in] and the weights in one dtype (``one_read`` is
    for the backward)."""
    return _pair_forward_gemms(x, w1, bias1, a1, b1, w2, bias2, a2, b2, s1, s2)


@_lora_pair_op.register_fake
def _lora_pair_op_fake(x, w1, bias1, a1, b1, w2, bias2, a2, b2, s1, s2, one_read):
    rows = x.shape[0]
    return (
        x.new_empty((rows, w1.shape[0])),
        x.new_empty((rows, w2.shape[0])),
        x.new_empty((rows, a1.shape[0] + a2.shape[0])),
    )


@torch.library.custom_op("tnlora::lora_pair_backward", mutates_args=())
def _lora_pair_backward_op(
    dy1: Tensor, dy2: Tensor, x: Tensor, w1: Tensor, w2: Tensor, a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor,
    hs: Tensor, s1: float, s2: float, needs_x: bool, one_read: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA₁, dB₁, dA₂, dB₂) of :func:`_pair_backward_gemms`; dx is empty unless ``needs_x``."""
    grad_x, *adapters = _pair_backward_gemms(dy1, dy2, x, w1, w2, a1, a2, b1, b2, hs, s1, s2, needs_x, one_read)
    return (grad_x if grad_x is not None else dy1.new_empty((0,))), *adapters


@_lora_pair_backward_op.register_fake
def _lora_pair_backward_op_fake(dy1, dy2, x, w1, w2, a1, a2, b1, b2, hs, s1, s2, needs_x, one_read):
    grad_x = dy1.new_empty((dy1.shape[0], w1.shape[1])) if needs_x else dy1.new_empty((0,))
    return grad_x, torch.empty_like(a1), torch.empty_like(b1), torch.empty_like(a2), torch.empty_like(b2)


def _lora_pair_op_setup(ctx, inputs, output) -> None:
    x, w1, _bias1, a1, b1, w2, _bias2, a2, b2, s1, s2, one_read = inputs
    ctx.save_for_backward(x, w1, w2, a1, a2, b1, b2, output[2])
    ctx.scales, ctx.one_read = (s1, s2), one_read


def _lora_pair_op_backward(ctx, dy1, dy2, _dhs):
    x, w1, w2, a1, a2, b1, b2, hs = ctx.saved_tensors
    needs_x = ctx.needs_input_grad[0]
    grad_x, grad_a1, grad_b1, grad_a2, grad_b2 = torch.ops.tnlora.lora_pair_backward(
        dy1.to(hs.dtype), dy2.to(hs.dtype), x, w1, w2, a1, a2, b1, b2, hs, *ctx.scales, needs_x, ctx.one_read
    )
    return (grad_x if needs_x else None), None, None, grad_a1, grad_b1, None, None, grad_a2, grad_b2, None, None, None


torch.library.register_autograd("tnlora::lora_pair", _lora_pair_op_backward, setup_context=_lora_pair_op_setup)


def _lora_pair_op_call(x: Tensor, first: LoraOperands, second: LoraOperands, one_read: bool) -> tuple[Tensor, Tensor]:
    """lora_linear_pair through the custom operators: inputs cast to the compute dtype, rows flattened."""
    operands = _pair_in_compute_dtype(x, first, second)
    y1, y2, _ = torch.ops.tnlora.lora_pair(*operands, first.scaling, second.scaling, one_read)
    rows = x.shape[:-1]
    return y1.reshape(*rows, y1.shape[-1]), y2.reshape(*rows, y2.shape[-1])


__all__ = ["LoraOperands", "lora_linear", "lora_linear_pair", "lora_linear_reference"]
