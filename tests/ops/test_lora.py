"""``tnlora.ops.lora.lora_linear`` against the plain composition peft computes (``lora_linear_reference``):
outputs and every gradient, in float64, with dropout (the same draw), under bf16 autocast and compiled."""

from __future__ import annotations

import pytest
import torch

from tnlora.ops.lora import (
    LORA_GRAD_MIN_ELEMENTS,
    LoraOperands,
    lora_linear,
    lora_linear_pair,
    lora_linear_reference,
    reads_dy_once,
)

IN, OUT, RANK = 24, 40, 4


def _inputs(dtype: torch.dtype = torch.float64, bias: bool = False, adapter_dtype: torch.dtype | None = None):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, IN, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(OUT, IN, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(OUT, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    a_dtype = adapter_dtype or dtype
    lora_a = torch.randn(RANK, IN, generator=gen, dtype=torch.float64).to(a_dtype).requires_grad_()
    lora_b = torch.randn(OUT, RANK, generator=gen, dtype=torch.float64).to(a_dtype).requires_grad_()
    return x, weight, b, lora_a, lora_b


def _run(fn, inputs, scaling=2.0, dropout=0.0, training=False, seed=1):
    x, weight, b, lora_a, lora_b = inputs
    torch.manual_seed(seed)
    y = fn(x, weight, b, lora_a, lora_b, scaling, dropout, training)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, (x, lora_a, lora_b), gy)
    return y, grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_equals_composition_in_float64(bias: bool, dropout: float) -> None:
    inputs = _inputs(bias=bias)
    want_y, want_grads = _run(lora_linear_reference, inputs, dropout=dropout, training=True)
    got_y, got_grads = _run(lora_linear, inputs, dropout=dropout, training=True)
    torch.testing.assert_close(got_y, want_y, rtol=1e-12, atol=1e-12)
    for got, want, name in zip(got_grads, want_grads, ("x", "lora_a", "lora_b"), strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    if dropout:  # the draw is F.dropout's: a different seed gives another mask, and the comparison would fail
        other_y, _ = _run(lora_linear, inputs, dropout=dropout, training=True, seed=3)
        assert (other_y - want_y).abs().max() > 1e-3


def test_dropout_is_off_outside_training() -> None:
    inputs = _inputs()
    want_y, want_grads = _run(lora_linear_reference, inputs, dropout=0.5, training=False)
    got_y, got_grads = _run(lora_linear, inputs, dropout=0.5, training=False)
    torch.testing.assert_close(got_y, want_y, rtol=1e-12, atol=1e-12)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bf16_autocast_with_fp32_adapters() -> None:
    """tnlora train's case: bf16 base, fp32 adapter weights, bf16 autocast. The output is bf16, the adapter's
    gradients come back fp32, and all are within bf16 rounding of the float64 composition."""
    inputs = _inputs(torch.bfloat16, adapter_dtype=torch.float32)
    exact = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    want_y, want_grads = _run(lora_linear_reference, exact)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_y, got_grads = _run(lora_linear, inputs)
    assert got_y.dtype == torch.bfloat16
    assert [g.dtype for g in got_grads] == [torch.bfloat16, torch.float32, torch.float32]
    for got, want in zip((got_y, *got_grads), (want_y, *want_grads), strict=True):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 2e-2, err


def test_a_trainable_base_weight_gets_its_gradient() -> None:
    x, weight, b, lora_a, lora_b = _inputs()
    weight.requires_grad_()
    y = lora_linear(x, weight, b, lora_a, lora_b, 2.0)
    (grad,) = torch.autograd.grad(y.sum(), weight)
    torch.testing.assert_close(grad, torch.ones(15, OUT, dtype=torch.float64).t() @ x.detach().reshape(15, IN))


@pytest.mark.parametrize("compiled_op", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_equals_eager(compiled_op: bool, bias: bool, dropout: float) -> None:
    """Compiled code runs the composition (Inductor fuses it itself), or with ``compiled_op=True`` the custom
    operators: either way the same numbers, dropout draw and gradients as the eager operation (float64)."""
    inputs = _inputs(bias=bias)

    def fused(*args):
        return lora_linear(*args, compiled_op=compiled_op)

    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    want_y, want_grads = _run(lora_linear, inputs, dropout=dropout, training=True)
    with torch.profiler.profile() as prof:
        got_y, got_grads = _run(compiled, inputs, dropout=dropout, training=True)
    names = {event.name for event in prof.events()}
    if compiled_op:
        assert {"tnlora::lora_linear", "tnlora::lora_linear_backward"} <= names
    else:
        assert not any(name.startswith("tnlora::") for name in names)
    torch.testing.assert_close(got_y, want_y, rtol=1e-12, atol=1e-12)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_custom_operators_pass_torch_library_checks() -> None:
    """torch.library.opcheck: schemas, fake (meta) shapes, autograd registration, compiled dispatch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, IN, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    lora_a = torch.randn(RANK, IN, generator=gen, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(OUT, RANK, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(
        torch.ops.tnlora.lora_linear.default, (x, weight, None, lora_a, lora_b, 2.0, 0.0, True, False, None, None, None, None, False)
    )
    dy = torch.randn(6, OUT, generator=gen, dtype=torch.float64)
    h = x.detach() @ lora_a.detach().t()
    empty = torch.empty(0, IN, dtype=torch.bool)
    for needs_x in (True, False):
        torch.library.opcheck(
            torch.ops.tnlora.lora_linear_backward.default,
            (dy, weight, lora_a.detach(), lora_b.detach(), x.detach(), h, empty, 2.0, 0.0, needs_x, False, *[None] * 5,
             False),
        )


def test_auto_grad_kernel_reads_dy_once_only_on_cuda_from_the_measured_size() -> None:
    # by dy's elements: 1B's qkvu at 32,768 rows (8,192 wide) reads once, its out_proj (2,048) at 65,536 does not
    assert LORA_GRAD_MIN_ELEMENTS == 32_768 * 8_192
    assert reads_dy_once("auto", 32_768, 8_192, cuda=True)
    assert not reads_dy_once("auto", 65_536, 2_048, cuda=True) and not reads_dy_once("auto", 32_768, 5_632, cuda=True)
    assert reads_dy_once("auto", 131_072, 2_048, cuda=True)
    assert not reads_dy_once("auto", 131_072, 16_384, cuda=False)
    assert reads_dy_once("triton", 1, 1, cuda=True) and not reads_dy_once("triton", 1, 1, cuda=False)
    assert not reads_dy_once("torch", 131_072, 16_384, cuda=True)
    with pytest.raises(ValueError, match="grad_kernel must be"):
        reads_dy_once("cublas", 1, 1, cuda=True)


def _pair_inputs(dtype: torch.dtype = torch.float64, adapter_dtype: torch.dtype | None = None, bias: bool = False):
    """x and two projections of it (widths 40 and 32, ranks 4 and 2) as LoraOperands, scalings 2 and 0.5."""
    gen = torch.Generator().manual_seed(3)

    def rand(*shape, to=dtype, grad=False):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(to).requires_grad_(grad)

    x = rand(3, 5, IN, grad=True)
    a_dtype = adapter_dtype or dtype
    first = LoraOperands(rand(OUT, IN), rand(OUT) if bias else None, rand(RANK, IN, to=a_dtype, grad=True),
                         rand(OUT, RANK, to=a_dtype, grad=True), 2.0)  # fmt: skip
    second = LoraOperands(rand(32, IN), None, rand(2, IN, to=a_dtype, grad=True), rand(32, 2, to=a_dtype, grad=True), 0.5)
    return x, first, second


def _pair_run(fn, x, first, second):
    y1, y2 = fn(x, first, second)
    gen = torch.Generator().manual_seed(4)
    gy1, gy2 = (torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype) for y in (y1, y2))
    params = (x, first.lora_a, first.lora_b, second.lora_a, second.lora_b)
    return (y1, y2), torch.autograd.grad((y1, y2), params, (gy1, gy2))


def _pair_reference(x, first, second):
    return lora_linear_reference(x, *first), lora_linear_reference(x, *second)


@pytest.mark.parametrize("bias", [False, True])
def test_pair_equals_two_compositions_in_float64(bias: bool) -> None:
    """Two projections of one input as one operation: each output and every gradient (x's the sum of both
    paths) as peft's composition computes them."""
    x, first, second = _pair_inputs(bias=bias)
    want, want_grads = _pair_run(_pair_reference, x, first, second)
    got, got_grads = _pair_run(lora_linear_pair, x, first, second)
    for g, w in zip((*got, *got_grads), (*want, *want_grads), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_pair_under_bf16_autocast_with_fp32_adapters() -> None:
    x, first, second = _pair_inputs(torch.bfloat16, adapter_dtype=torch.float32)

    def exact(t):
        return t.detach().double().requires_grad_(t.requires_grad) if t is not None else None

    def exact_ops(ops):
        return LoraOperands(*(exact(t) for t in ops[:4]), ops.scaling)

    want, want_grads = _pair_run(_pair_reference, exact(x), exact_ops(first), exact_ops(second))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = _pair_run(lora_linear_pair, x, first, second)
    assert [t.dtype for t in got] == [torch.bfloat16] * 2
    assert [t.dtype for t in got_grads] == [torch.bfloat16] + [torch.float32] * 4
    for g, w in zip((*got, *got_grads), (*want, *want_grads), strict=True):
        err = (g.double() - w).abs().max() / w.abs().max()
        assert err < 2e-2, err


@pytest.mark.parametrize("compiled_op", [False, True])
def test_compiled_pair_equals_eager(compiled_op: bool) -> None:
    x, first, second = _pair_inputs()

    def pair(x, first, second):
        return lora_linear_pair(x, first, second, compiled_op=compiled_op)

    compiled = torch.compile(pair, backend="aot_eager", fullgraph=True)
    want, want_grads = _pair_run(lora_linear_pair, x, first, second)
    with torch.profiler.profile() as prof:
        got, got_grads = _pair_run(compiled, x, first, second)
    names = {event.name for event in prof.events()}
    if compiled_op:
        assert {"tnlora::lora_pair", "tnlora::lora_pair_backward"} <= names
    else:
        assert not any(name.startswith("tnlora::") for name in names)
    for g, w in zip((*got, *got_grads), (*want, *want_grads), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_pair_operators_pass_torch_library_checks() -> None:
    x, first, second = _pair_inputs()
    x = x.detach().reshape(-1, IN).requires_grad_()
    torch.library.opcheck(torch.ops.tnlora.lora_pair.default, (x, *first[:4], *second[:4], 2.0, 0.5, False))
    gen = torch.Generator().manual_seed(5)
    dy1, dy2 = torch.randn(15, OUT, generator=gen, dtype=torch.float64), torch.randn(15, 32, generator=gen, dtype=torch.float64)
    hs = torch.randn(15, RANK + 2, generator=gen, dtype=torch.float64)
    adapters = [t.detach() for t in (first.lora_a, second.lora_a, first.lora_b, second.lora_b)]
    for needs_x in (True, False):
        torch.library.opcheck(
            torch.ops.tnlora.lora_pair_backward.default,
            (dy1, dy2, x.detach(), first.weight, second.weight, *adapters, hs, 2.0, 0.5, needs_x, False),
        )


def test_pair_refuses_a_trainable_base_weight() -> None:
    x, first, second = _pair_inputs()
    first.weight.requires_grad_()
    with pytest.raises(ValueError, match="frozen weights"):
        lora_linear_pair(x, first, second)
