"""``tnlora.ops.fp8``: the row-wise e4m3 quantization, the two fp8 GEMMs of a frozen weight against the fp32 products
of their dequantized operands, and the fused LoRA layer with an fp8 base: its output and input gradient are the
dequantized products plus the adapter's (computed as without fp8), and the adapter's gradients are exactly the
ones without fp8. On the CPU (PyTorch's CPU ``_scaled_mm``), in float32."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_device import DEVICE, INTERPRET, needs_kernel

from tnlora.ops.fp8 import (
    CUDA_MIN_CAPABILITY,
    FP8,
    FP8_MAX,
    cpu_row_scaled_mm,
    dequantized,
    fp8_input_grad_operands,
    fp8_linear,
    fp8_linear_input_grad,
    fp8_supported,
    quantize_rows,
    quantize_rows_reference,
    quantize_weight,
)
from tnlora.ops.lora import lora_linear

IN, OUT, RANK, ROWS = 48, 80, 4, 21
# The tests that multiply run PyTorch's CPU fp8 GEMM (torch 2.13's CPU build has it with row-wise scales).
needs_cpu_fp8_mm = pytest.mark.skipif(
    not cpu_row_scaled_mm(), reason="this PyTorch's CPU build has no row-scaled torch._scaled_mm"
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_rows_quantize_to_their_largest_magnitude_within_e4m3_rounding() -> None:
    t = torch.randn(7, 64, generator=_gen()) * torch.logspace(-3, 3, 7).unsqueeze(1)
    t[3] = 0.0
    q, scale = quantize_rows_reference(t)
    assert q.dtype == FP8 and scale.shape == (7, 1) and scale.dtype == torch.float32
    back = dequantized(q, scale)
    assert torch.isfinite(back).all() and (back[3] == 0).all()
    rows = [r for r in range(7) if r != 3]
    # each row's largest magnitude lands on ±448 exactly, and every value within half an e4m3 step of itself:
    # 3 mantissa bits (2⁻⁴ relative) for normal values, 2⁻¹⁰ · scale below the normal range
    assert torch.equal(q[rows].float().abs().amax(dim=1), torch.full((6,), FP8_MAX))
    bound = t.abs() * 2.0**-4 + scale * 2.0**-10
    assert ((back - t).abs() <= bound * (1 + 1e-6)).all()
    # and not looser than that: a coarser format (or no rounding at all) would fail one of these
    assert (back - t).abs().max() > 0


def test_column_scales_are_applied_before_the_rows_are_quantized() -> None:
    t = torch.randn(5, 32, generator=_gen(1))
    col = torch.rand(1, 32, generator=_gen(2)) + 0.5
    q, scale = quantize_rows_reference(t, col)
    want_q, want_scale = quantize_rows_reference(t * col)
    assert torch.equal(q.float(), want_q.float()) and torch.equal(scale, want_scale)
    q_plain, _ = quantize_rows(t, col)  # the CPU path is the reference itself
    assert torch.equal(q_plain.float(), q.float())


def test_the_weight_keeps_one_scale_per_output_feature() -> None:
    weight = torch.randn(OUT, IN, generator=_gen(3))
    q, scale = quantize_weight(weight)
    assert q.shape == (OUT, IN) and scale.shape == (1, OUT)
    rel = (dequantized(q, scale) - weight).abs().max() / weight.abs().max()
    assert 0 < rel < 2.0**-4


def _operands():
    x = torch.randn(ROWS, IN, generator=_gen(4))
    weight = torch.randn(OUT, IN, generator=_gen(5)) / IN**0.5
    dy = torch.randn(ROWS, OUT, generator=_gen(6))
    return x, weight, dy


@needs_cpu_fp8_mm
def test_forward_gemm_is_the_product_of_the_dequantized_operands() -> None:
    x, weight, _ = _operands()
    wq, ws = quantize_weight(weight)
    xq, xs = quantize_rows_reference(x)
    got = fp8_linear(x, wq, ws, torch.float32)
    want = dequantized(xq, xs) @ dequantized(wq, ws).t()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and it is x Wᵀ to within e4m3's rounding of both operands
    exact = x @ weight.t()
    assert (got - exact).abs().max() / exact.abs().max() < 0.05


@needs_cpu_fp8_mm
def test_input_gradient_gemm_folds_the_weight_scales_into_dy() -> None:
    _, weight, dy = _operands()
    wq, ws = quantize_weight(weight)
    got = fp8_linear_input_grad(dy, wq, ws, torch.float32)
    dyq, dys = quantize_rows_reference(dy, ws)
    want = dequantized(dyq, dys) @ wq.float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    exact = dy @ weight
    assert (got - exact).abs().max() / exact.abs().max() < 0.05


@needs_cpu_fp8_mm
def test_bf16_results() -> None:
    x, weight, _ = _operands()
    wq, ws = quantize_weight(weight)
    y = fp8_linear(x.bfloat16(), wq, ws, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), fp8_linear(x.bfloat16(), wq, ws, torch.float32), rtol=1e-2, atol=1e-2)


def _lora_inputs(bias: bool):
    gen = _gen(7)
    x = torch.randn(3, 7, IN, generator=gen).requires_grad_()
    weight = torch.randn(OUT, IN, generator=gen) / IN**0.5
    b = torch.randn(OUT, generator=gen) if bias else None
    lora_a = (torch.randn(RANK, IN, generator=gen) / IN**0.5).requires_grad_()
    lora_b = torch.randn(OUT, RANK, generator=gen).requires_grad_()
    return x, weight, b, lora_a, lora_b


def _grads(fn, inputs, dropout: float, seed: int = 1):
    x, weight, b, lora_a, lora_b = inputs
    torch.manual_seed(seed)
    y = fn(x, weight, b, lora_a, lora_b, 2.0, dropout, True)
    dy = torch.randn(y.shape, generator=_gen(8))
    return y, torch.autograd.grad(y, (x, lora_a, lora_b), dy), dy


@needs_cpu_fp8_mm
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_lora_layer_with_an_fp8_base(bias: bool, dropout: float) -> None:
    inputs = _lora_inputs(bias)
    x, weight = inputs[:2]
    wq, ws = quantize_weight(weight)

    def fp8(*args):
        return lora_linear(*args, weight_fp8=(wq, ws))

    y, (dx, da, db), dy = _grads(fp8, inputs, dropout)
    plain_y, (plain_dx, plain_da, plain_db), _ = _grads(lora_linear, inputs, dropout)
    # the adapter's gradients do not involve the frozen GEMMs: exactly the ones without fp8
    assert torch.equal(da, plain_da) and torch.equal(db, plain_db)
    # output and input gradient: the dequantized products plus the rest (bias, adapter) as the plain layer has it
    flat_x, flat_dy = x.detach().reshape(-1, IN), dy.reshape(-1, OUT)
    base = dequantized(*quantize_rows_reference(flat_x)) @ dequantized(wq, ws).t()
    want_y = base + (plain_y.detach().reshape(-1, OUT) - flat_x @ weight.t())
    torch.testing.assert_close(y.detach().reshape(-1, OUT), want_y, rtol=1e-5, atol=1e-5)
    base_dx = dequantized(*quantize_rows_reference(flat_dy, ws)) @ wq.float()
    want_dx = base_dx + (plain_dx.reshape(-1, IN) - flat_dy @ weight)
    torch.testing.assert_close(dx.reshape(-1, IN), want_dx, rtol=1e-5, atol=1e-5)
    if dropout:  # the adapter saw the dropped input: a different draw changes the output
        other_y, _, _ = _grads(fp8, inputs, dropout, seed=3)
        assert (other_y - y).abs().max() > 1e-3


@needs_cpu_fp8_mm
@pytest.mark.parametrize("compiled_op", [False, True])
def test_compiled_fp8_layer_equals_eager(monkeypatch, compiled_op: bool) -> None:
    """Compiled code calls the custom operators with the fp8 base whatever ``compiled_op`` says (Inductor has no
    composition of its own for it), x and dy quantized in the traced graph (where Inductor fuses that with their
    producers) and handed to the operators: the same numbers as the eager operation, which quantizes inside."""
    from tnlora.ops import lora as lora_ops

    inputs = _lora_inputs(bias=False)
    wq, ws = quantize_weight(inputs[1])
    handed: list[tuple[str, bool]] = []
    forward_gemms, backward_gemms = lora_ops._forward_gemms, lora_ops._backward_gemms

    def forward(*args):
        handed.append(("x", inspect.signature(forward_gemms).bind(*args).arguments.get("x_fp8") is not None))
        return forward_gemms(*args)

    def backward(*args):
        given = inspect.signature(backward_gemms).bind(*args).arguments.get("fp8_operands")
        handed.append(("dy", given is not None))
        return backward_gemms(*args)

    monkeypatch.setattr(lora_ops, "_forward_gemms", forward)
    monkeypatch.setattr(lora_ops, "_backward_gemms", backward)

    def fp8(*args):
        return lora_linear(*args, compiled_op=compiled_op, weight_fp8=(wq, ws))

    compiled = torch.compile(fp8, backend="aot_eager", fullgraph=True)
    want_y, want_grads, _ = _grads(fp8, inputs, 0.25)
    assert handed == [("x", False), ("dy", False)]
    handed.clear()
    with torch.profiler.profile() as prof:
        got_y, got_grads, _ = _grads(compiled, inputs, 0.25)
    assert handed == [("x", True), ("dy", True)]
    assert {"tnlora::lora_linear", "tnlora::lora_linear_backward"} <= {event.name for event in prof.events()}
    torch.testing.assert_close(got_y, want_y, rtol=0, atol=0)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_cpu_fp8_mm
def test_custom_operators_pass_torch_library_checks_with_an_fp8_base() -> None:
    """opcheck with the fp8 base, the operators quantizing x / dy themselves (eager) and given them (compiled)."""
    x, weight, _b, lora_a, lora_b = (t.detach() if t is not None else None for t in _lora_inputs(bias=False))
    x = x.reshape(-1, IN).requires_grad_()
    lora_a.requires_grad_()
    lora_b.requires_grad_()
    wq, ws = quantize_weight(weight)
    dy = torch.randn(x.shape[0], OUT, generator=_gen(9))
    h = x.detach() @ lora_a.detach().t()
    empty = torch.empty(0, IN, dtype=torch.bool)
    # (opcheck's schema check compares inputs before and after with arithmetic fp8 tensors do not have on the CPU)
    checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    given = (quantize_rows_reference(x.detach()), fp8_input_grad_operands(dy, wq, ws))
    # the Triton GEMM (triton_gemm) too where it runs on these CPU tensors: under Triton's interpreter
    for (x_fp8, dy_fp8), triton_gemm in itertools.product((((None, None), (None, None, None)), given),
                                                          (False, True) if INTERPRET else (False,)):  # fmt: skip
        torch.library.opcheck(
            torch.ops.tnlora.lora_linear.default,
            (x, weight, None, lora_a, lora_b, 2.0, 0.0, True, False, wq, ws, *x_fp8, triton_gemm),
            test_utils=checks,
        )
        torch.library.opcheck(
            torch.ops.tnlora.lora_linear_backward.default,
            (dy, weight, lora_a.detach(), lora_b.detach(), x.detach(), h, empty, 2.0, 0.0, True, False, wq, ws,
             *dy_fp8, triton_gemm),
            test_utils=checks,
        )  # fmt: skip
    if INTERPRET:  # the Triton GEMM on the plain (unquantized) base
        torch.library.opcheck(torch.ops.tnlora.lora_linear.default,
                              (x, weight, None, lora_a, lora_b, 2.0, 0.0, True, False, *[None] * 4, True))
        torch.library.opcheck(torch.ops.tnlora.lora_linear_backward.default,
                              (dy, weight, lora_a.detach(), lora_b.detach(), x.detach(), h, empty, 2.0, 0.0, True,
                               False, *[None] * 5, True))  # fmt: skip


def test_a_trainable_base_refuses_an_fp8_copy() -> None:
    x, weight, b, lora_a, lora_b = _lora_inputs(bias=False)
    weight.requires_grad_()
    with pytest.raises(ValueError, match="frozen weight only"):
        lora_linear(x, weight, b, lora_a, lora_b, 2.0, weight_fp8=quantize_weight(weight))


def test_fp8_support_by_device_and_width() -> None:
    assert fp8_supported(torch.empty(OUT, IN + 1)) == cpu_row_scaled_mm()  # the CPU takes any width
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the CUDA rules (capability ≥ 8.9, widths of 16) are checked on a GPU")
    cuda = torch.empty(OUT, IN, device="cuda")
    capable = torch.cuda.get_device_capability() >= CUDA_MIN_CAPABILITY
    assert fp8_supported(cuda) == capable
    assert not fp8_supported(torch.empty(OUT, IN + 1, device="cuda"))


@needs_kernel
@pytest.mark.parametrize("width", [48, 2048, 4096, 11008, 16384])
def test_triton_quantization_is_the_reference_bit_for_bit(width: int) -> None:
    """The Triton kernel (the candidate for quantize_rows' CUDA path, up to 16,384 values a row) against the eager
    ops, bit for bit: rows of zeros, -0.0, NaN and inf, of tiny and of huge magnitudes, every e4m3 value and every
    midpoint between two (ties, to even), with and without column scales, bf16 and fp32 rows, a row stride wider
    than the row. On CUDA, or on the CPU under Triton's interpreter (fewer rows)."""
    from tnlora.ops.fp8 import quantize_rows_triton

    rows = 24 if INTERPRET else 300
    gen = torch.Generator().manual_seed(width)
    wide = torch.randn(rows, width + 16, generator=gen) * torch.logspace(-8, 8, rows)[:, None]
    wide[3] = 0.0
    wide[4, :5] = -0.0
    wide[5, 1], wide[5, 2], wide[6, 0] = float("nan"), float("inf"), -float("inf")
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[torch.isfinite(grid)].sort().values
    ties = torch.cat([grid, (grid[1:] + grid[:-1]) / 2])  # the largest magnitude 448: the scale is 1
    wide[7, : min(width, ties.numel())] = ties[:width]
    wide = wide.to(DEVICE)
    col = (torch.rand(1, width, generator=gen) + 0.5).to(DEVICE)
    for t in (wide[:, :width], wide[:, :width].to(torch.bfloat16), wide[:, :width].contiguous()):
        for col_scale in (None, col):
            q, scale = quantize_rows_triton(t, col_scale)
            want_q, want_scale = quantize_rows_reference(t, col_scale)
            assert q.dtype == FP8 and q.is_contiguous() and scale.shape == (rows, 1) and scale.dtype == torch.float32
            assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
            torch.testing.assert_close(scale, want_scale, rtol=0, atol=0, equal_nan=True)
    assert quantize_rows_triton(wide[:0, :width])[0].shape == (0, width)
    with pytest.raises(ValueError, match="at most 16384"):
        quantize_rows_triton(torch.zeros(2, 16384 + 16, device=DEVICE))


def test_quantization_and_gemms_on_cuda() -> None:
    """On CUDA: the compiled quantization kernel against the eager ops, and the fp8 GEMMs against the fp32 products
    of the operands they were given (bf16 results). Inductor's division need not round as the eager one does, so a
    value on an e4m3 rounding boundary may land on the other side: the scales agree to 1 ulp, the values everywhere
    within e4m3's rounding of the input, and all but a few in 10⁴ equal to the eager ones."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < CUDA_MIN_CAPABILITY:
        pytest.skip("needs a CUDA GPU of compute capability ≥ 8.9 (fp8 tensor cores)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randn(1000, 4096, device="cuda", generator=gen, dtype=torch.bfloat16)
    col = torch.rand(1, 4096, device="cuda", generator=gen) + 0.5
    for args in ((t,), (t, col)):
        q, scale = quantize_rows(*args)
        want_q, want_scale = quantize_rows_reference(*args)
        assert q.dtype == FP8 and q.is_contiguous() and scale.shape == (1000, 1)
        torch.testing.assert_close(scale, want_scale, rtol=2.5e-7, atol=0)
        exact = t.float() * (col if len(args) == 2 else 1)
        bound = exact.abs() * 2.0**-4 + scale * 2.0**-10
        assert ((dequantized(q, scale) - exact).abs() <= bound * (1 + 1e-5)).all()
        differ = (q.view(torch.uint8) != want_q.view(torch.uint8)).float().mean().item()
        print(f"quantize_rows on CUDA: {differ:.2e} of the values differ from the eager ops'")
        assert differ < 1e-4
    weight = torch.randn(2048, 4096, device="cuda", generator=gen, dtype=torch.bfloat16) / 64
    wq, ws = quantize_weight(weight)
    xq = quantize_rows(t)
    y = fp8_linear(t, wq, ws, torch.bfloat16, xq)
    want = dequantized(*xq) @ dequantized(wq, ws).t()
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)
    dy = torch.randn(1000, 2048, device="cuda", generator=gen, dtype=torch.bfloat16)
    operands = fp8_input_grad_operands(dy, wq, ws)
    dx = fp8_linear_input_grad(dy, wq, ws, torch.bfloat16, operands)
    want_dx = dequantized(operands[0], operands[1]) @ wq.float()
    torch.testing.assert_close(dx.float(), want_dx, rtol=1e-2, atol=1e-2)
    # and without the operands handed in: the same quantization made inside
    torch.testing.assert_close(fp8_linear(t, wq, ws, torch.bfloat16), y, rtol=0, atol=0)
    torch.testing.assert_close(fp8_linear_input_grad(dy, wq, ws, torch.bfloat16), dx, rtol=0, atol=0)


def test_dropout_reference_draw_matches() -> None:
    """The reference above reads the adapter's part from the plain fused layer; that layer draws dropout as
    F.dropout does (so the fp8 and plain runs of one seed see one mask)."""
    torch.manual_seed(1)
    a = F.dropout(torch.ones(4, 8), 0.5, True)
    torch.manual_seed(1)
    b, _ = torch.ops.aten.native_dropout(torch.ones(4, 8), 0.5, True)
    assert torch.equal(a, b)


def _fp8_gemm_reference(a_q, a_scale, b_q, b_scale, low_rank=None, coef=1.0, keep=None, bias=None):
    """What :func:`scaled_mm_low_rank_triton` computes, in float64."""
    out = (a_q.double() @ b_q.double().t()) * a_scale.double()
    if b_scale is not None:
        out = out * b_scale.double().reshape(1, -1)
    if low_rank is not None:
        low = low_rank[0].double() @ low_rank[1].double().t()
        out = out + coef * (low * keep if keep is not None else low)
    return out + bias.double() if bias is not None else out


@needs_kernel
@pytest.mark.parametrize(("rows", "width_out", "width_in"), [(70, 48, 80), (64, 96, 128), (33, 16, 256)])
def test_triton_fp8_gemm_adds_the_low_rank_term_in_its_epilogue(rows: int, width_out: int, width_in: int) -> None:
    """The Triton fp8 GEMM (``gemm_kernel="triton"``) against the float64 product of its operands: the scaled fp8
    product, with and without the weight's scales (the forward / the input gradient), plus the rank-r term with
    its coefficient, keep-mask and the bias; tiles that do not divide the shapes (edge rows, columns and a partial
    K block) and ones that do. fp32 results within fp32 accumulation; bf16 ones within one bf16 step (Triton's
    interpreter truncates to bf16, the GPU rounds)."""
    from tnlora.ops.fp8 import GemmTiles, scaled_mm_low_rank_triton

    gen = torch.Generator().manual_seed(rows)
    a = torch.randn(rows, width_in, generator=gen)
    b = torch.randn(width_out, width_in, generator=gen) / width_in**0.5
    a_q, a_scale = (t.to(DEVICE) for t in quantize_rows_reference(a))
    b_q, b_scale = (t.to(DEVICE) for t in quantize_weight(b))
    h = torch.randn(rows, RANK, generator=gen).to(DEVICE)
    c = torch.randn(RANK, width_out, generator=gen).to(DEVICE).t()  # a strided [N, R] view, as lora_a.t() is
    keep = (torch.rand(rows, width_out, generator=gen) > 0.25).to(DEVICE)
    bias = torch.randn(width_out, generator=gen).to(DEVICE)
    tiles = GemmTiles(32, 16, 32, group_m=2) if INTERPRET else GemmTiles(64, 64, 64)
    cases = [
        dict(b_scale=b_scale),
        dict(b_scale=None, low_rank=(h, c), coef=2.5, keep=keep),
        dict(b_scale=b_scale, low_rank=(h, c), coef=0.5, bias=bias),
        dict(b_scale=b_scale, low_rank=(h, c), bias=bias, fast_accum=True),
    ]
    for case in cases:
        fast = case.pop("fast_accum", False)
        want = _fp8_gemm_reference(a_q, a_scale, b_q, **case)
        got = scaled_mm_low_rank_triton(a_q, a_scale, b_q, out_dtype=torch.float32, tiles=tiles, fast_accum=fast,
                                        **case)  # fmt: skip
        assert got.shape == (rows, width_out) and got.dtype == torch.float32
        # fp32 sums of fp8 products (fast accumulation on Hopper keeps fewer bits: looser there)
        tol = 1e-2 if fast and not INTERPRET else 1e-5
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
        half = scaled_mm_low_rank_triton(a_q, a_scale, b_q, out_dtype=torch.bfloat16, tiles=tiles, **case)
        assert half.dtype == torch.bfloat16
        assert ((half.double() - want).abs() <= want.abs() * 2.0**-7 + 1e-30 + 1e-5 * want.abs().max()).all()
    # b given as [K, N] (a weight read as the input gradient's operand without its transpose)
    got = scaled_mm_low_rank_triton(a_q, a_scale, b_q.t().contiguous(), None, torch.float32, (h, c), 2.5, keep,
                                    tiles=tiles, b_kn=True)  # fmt: skip
    want = _fp8_gemm_reference(a_q, a_scale, b_q, None, (h, c), 2.5, keep)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # the default tiles (the GPU's), the tiles loaded through tensor descriptors (TMA), and the empty case
    for shape in (None, dataclasses.replace(tiles, tma=True)):
        torch.testing.assert_close(
            scaled_mm_low_rank_triton(a_q, a_scale, b_q, b_scale, torch.float32, (h, c), 2.0, keep, tiles=shape).double(),
            _fp8_gemm_reference(a_q, a_scale, b_q, b_scale, (h, c), 2.0, keep), rtol=1e-5, atol=1e-5 * width_in,
        )  # fmt: skip
    assert scaled_mm_low_rank_triton(a_q[:0], a_scale[:0], b_q, b_scale, torch.float32).shape == (0, width_out)
    with pytest.raises(ValueError, match="K contiguous"):
        scaled_mm_low_rank_triton(a_q, a_scale, b_q.t().contiguous().t(), b_scale, torch.float32)


@needs_kernel
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fp8", [True, False])
def test_fused_lora_layer_with_the_triton_gemm(fp8: bool, bias: bool, dropout: float) -> None:
    """The fused LoRA layer with ``gemm_kernel="triton"`` against ``"torch"`` (fp8: ``torch._scaled_mm``, the
    adapter's part added after it; bf16: cuBLAS, the adapter's part written first): the same operands and adapter,
    so output and gradients agree to the compute dtype's rounding (fp32 on the CPU under the interpreter, bf16 on
    CUDA); a wrong mask, scale or coefficient in the epilogue would be off by the adapter's whole part."""
    if fp8 and INTERPRET and not cpu_row_scaled_mm():
        pytest.skip("the reference side needs PyTorch's CPU row-scaled torch._scaled_mm")
    x, weight, b, lora_a, lora_b = (t.to(DEVICE) if t is not None else None for t in _lora_inputs(bias))
    x = torch.randn(4, 8, IN, generator=_gen(9)).to(DEVICE)  # 32 rows: whole fp8 tiles for cuBLAS on CUDA
    x, lora_a, lora_b = (t.detach().requires_grad_() for t in (x, lora_a, lora_b))
    weight_fp8 = quantize_weight(weight) if fp8 else None
    dtype = torch.float32 if INTERPRET else torch.bfloat16
    results = []
    for kernel in ("triton", "torch"):
        torch.manual_seed(1)
        with torch.autocast(DEVICE, dtype=dtype, enabled=not INTERPRET):
            y = lora_linear(x, weight, b, lora_a, lora_b, 2.0, dropout, True, weight_fp8=weight_fp8, gemm_kernel=kernel)
        dy = torch.randn(y.shape, generator=_gen(8)).to(DEVICE)
        results.append((y.float(), *(g.float() for g in torch.autograd.grad(y, (x, lora_a, lora_b), dy))))
    tol = 1e-5 if INTERPRET else 2e-2
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    with pytest.raises(ValueError, match="gemm_kernel must be 'torch' or 'triton'"):
        lora_linear(x, weight, b, lora_a, lora_b, 2.0, weight_fp8=weight_fp8, gemm_kernel="cublas")


@pytest.mark.parametrize(("fp8", "backward", "tma"),
                         [(True, False, False), (True, True, False), (True, False, True), (False, False, False),
                          (False, True, False)])  # fmt: skip
def test_the_triton_gemm_compiles_for_hopper_without_register_spills(fp8: bool, backward: bool, tma: bool) -> None:
    """The Triton GEMM compiled ahead of time for sm_90 (no GPU needed: Triton's compiler and the ptxas it ships):
    its main loop multiplies on the tensor cores (wgmma; e4m3 operands for fp8) and, with the default tiles
    (:func:`default_tiles`), the epilogue's low-rank product and keep-mask fit the registers (no spills) in the
    forward and input-gradient forms (bf16's reading the weight as [K, N]) and the shared memory of a block; with
    ``tma`` the tiles come through tensor descriptors (``cp.async.bulk.tensor``); the output is stored in 16-byte
    vectors."""
    if INTERPRET:
        pytest.skip("compiles the kernel; under TRITON_INTERPRET=1 Triton interprets it instead")
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tnlora.ops.fp8 import default_tiles
    from tnlora.ops.fp8_triton import scaled_mm_low_rank_kernel as kernel

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file():
        pytest.skip("this triton has no ptxas of its own")
    tiles = default_tiles(fp8)
    kind = "fp8e4nv" if fp8 else "bf16"
    b_kn = backward and not fp8  # the bf16 input gradient reads W [out, in] as it is
    constants = {
        "K": 4096, "HAS_A_SCALE": fp8, "HAS_B_SCALE": fp8 and not backward, "HAS_LOW_RANK": True,
        "HAS_KEEP": backward, "HAS_BIAS": False, "EVEN_K": True, "FAST_ACCUM": not fp8, "UPCAST": False, "TMA": tma,
        "B_KN": b_kn, "LOW_RANK_FIRST": tiles.low_rank_first, "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n,
        "BLOCK_K": tiles.block_k, "BLOCK_R": 16, "GROUP_M": tiles.group_m,
    }  # fmt: skip
    b_block = [tiles.block_k, tiles.block_n] if b_kn else [tiles.block_n, tiles.block_k]
    operands = ({"a_ptr": f"tensordesc<{kind}[{tiles.block_m}, {tiles.block_k}]>",
                 "b_ptr": f"tensordesc<{kind}[{b_block[0]}, {b_block[1]}]>"} if tma else
                {"a_ptr": f"*{kind}", "b_ptr": f"*{kind}"})  # fmt: skip
    pointers = {**operands, "out_ptr": "*bf16", "h_ptr": "*bf16", "c_ptr": "*bf16", "keep_ptr": "*u8"}
    assert set(constants) <= set(kernel.arg_names)
    signature = {
        name: "constexpr" if name in constants else pointers.get(
            name, "*fp32" if name.endswith("_ptr") else "fp32" if name == "coef" else "i32")
        for name in kernel.arg_names
    }  # fmt: skip
    # what a launch at TNL's shapes specializes: pointers, row counts, widths and row strides divisible by 16
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if (name.endswith("_ptr") and not (tma and name in operands))
               or name in ("M", "N", "stride_am", "stride_bn", "stride_om", "stride_keep")}  # fmt: skip
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages},
    )
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx and ("e4m3" in ptx) == fp8
    assert ("cp.async.bulk.tensor" in ptx) == tma
    # the output leaves in 16-byte vectors along its rows, not element by element (a tl.where on the column
    # indices once hid their contiguity: 64 two-byte stores a thread)
    assert "st.global.v4.b32" in ptx and "st.global.b16" not in ptx
    assert compiled.metadata.shared <= 227 * 1024  # an H100's / H200's shared memory per block
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        info = subprocess.run(
            [str(ptxas), "-v", "--gpu-name", "sm_90a", str(Path(tmp) / "k.ptx"), "-o", str(Path(tmp) / "k.o")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    print(" ".join(line.strip() for line in info.splitlines() if "registers" in line))
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", info), info
