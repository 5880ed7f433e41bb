"""``tnlora.ops.fp8``: the row-wise e4m3 quantization, the two fp8 GEMMs of a frozen weight against the fp32 products
of their dequantized operands, and the fused LoRA layer with an fp8 base: its output and input gradient are the
dequantized products plus the adapter's (computed as without fp8), and the adapter's gradients are exactly the
ones without fp8. On the CPU (PyTorch's CPU ``_scaled_mm``), in float32."""

from __future__ import annotations

import inspect
import itertools

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
    for x_fp8, dy_fp8 in (((None, None), (None, None, None)),
                          (quantize_rows_reference(x.detach()), fp8_input_grad_operands(dy, wq, ws))):  # fmt: skip
        torch.library.opcheck(
            torch.ops.tnlora.lora_linear.default,
            (x, weight, None, lora_a, lora_b, 2.0, 0.0, True, False, wq, ws, *x_fp8, False),
            test_utils=checks,
        )
        torch.library.opcheck(
            torch.ops.tnlora.lora_linear_backward.default,
            (dy, weight, lora_a.detach(), lora_b.detach(), x.detach(), h, empty, 2.0, 0.0, True, False, wq, ws,
             *dy_fp8, False),
            test_utils=checks,
        )  # fmt: skip


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
    """The Triton kernel (quantize_rows' CUDA path where triton is installed, up to 16,384 values a row) against the eager
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
            differ = (q.view(torch.uint8) != want_q.view(torch.uint8)).nonzero().tolist()
            assert not differ, [
                (i, j, t[i, j].item(), q.view(torch.uint8)[i, j].item(), want_q.view(torch.uint8)[i, j].item())
                for i, j in differ[:6]
            ]  # fmt: skip
            torch.testing.assert_close(scale, want_scale, rtol=0, atol=0, equal_nan=True)
    assert quantize_rows_triton(wide[:0, :width])[0].shape == (0, width)
    with pytest.raises(ValueError, match="at most 16384"):
        quantize_rows_triton(torch.zeros(2, 16384 + 16, device=DEVICE))


def test_quantization_and_gemms_on_cuda() -> None:
    """On CUDA: quantize_rows (the Triton kernel where triton is installed) and the quantization compiled by
    Inductor (its path without triton's kernel, and for wider rows) against the eager ops, and the fp8 GEMMs against
    the fp32 products of the operands they were given (bf16 results). Inductor's division need not round as the
    eager one does, so a value on an e4m3 rounding boundary may land on the other side: the scales agree to 1 ulp,
    the values everywhere within e4m3's rounding of the input, and all but a few in 10⁴ equal to the eager ones."""
    from tnlora.ops.fp8 import _compiled_quantize

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < CUDA_MIN_CAPABILITY:
        pytest.skip("needs a CUDA GPU of compute capability ≥ 8.9 (fp8 tensor cores)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randn(1000, 4096, device="cuda", generator=gen, dtype=torch.bfloat16)
    col = torch.rand(1, 4096, device="cuda", generator=gen) + 0.5
    for args, quantize in itertools.product(((t,), (t, col)), (quantize_rows, _compiled_quantize())):
        q, scale = quantize(*args)
        want_q, want_scale = quantize_rows_reference(*args)
        assert q.dtype == FP8 and q.is_contiguous() and scale.shape == (1000, 1)
        torch.testing.assert_close(scale, want_scale, rtol=2.5e-7, atol=0)
        exact = t.float() * (col if len(args) == 2 else 1)
        bound = exact.abs() * 2.0**-4 + scale * 2.0**-10
        assert ((dequantized(q, scale) - exact).abs() <= bound * (1 + 1e-5)).all()
        differ = (q.view(torch.uint8) != want_q.view(torch.uint8)).float().mean().item()
        print(f"{getattr(quantize, '__name__', 'compiled')} on CUDA: {differ:.2e} of the values differ from the eager ops'")
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
