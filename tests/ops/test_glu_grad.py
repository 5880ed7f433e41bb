"""The GLU product's backward with both adapters' products of dy in one kernel (``tnlora.ops.glu_grad``) against
PyTorch's ops, and ``tnlora.ops.lora.lora_glu`` (the GLU's adapted l1 and l2 and their product as one operation)
against the compositions, forward and gradients.

The kernel tests need triton and a CUDA device, or Triton's CPU interpreter (see tests/ops/test_recurrent.py):

    TRITON_INTERPRET=1 PYTHONPATH=<dir holding triton> pytest -q tests/ops/test_glu_grad.py
"""

from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE, INTERPRET, needs_kernel

from tnlora.ops.glu_grad import glu_backward, glu_backward_reference
from tnlora.ops.lora import LoraOperands, glu_in_kernel, lora_glu, lora_linear_reference
from tnlora.ops.lora_grad import Launch

# fp64: the same sums grouped differently; fp32 likewise (no TF32); bf16: each rounds one fp32 sum.
TOLERANCE = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 2**-7}
# Triton 3.6's interpreter computes a bf16 dot wrongly (tests/ops/test_lora_grad.py): bf16 on CUDA only.
DTYPES = [torch.float64, torch.float32] + ([] if INTERPRET else [torch.bfloat16])


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()
    assert err <= TOLERANCE[dtype], err


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("ranks", "per_processor"), [((8, 8), 4), ((4, 6), 4), ((8, 8), 0)])
def test_one_kernel_gives_both_gradients_and_both_adapters_products(dtype, ranks, per_processor) -> None:
    # three column splits of 64, the last ending mid-block; several row programs (the last short) or one program
    # walking every row and then tiles past the end: every mask is exercised
    r1, r2 = ranks
    rows, cols = 3 * 32 + 7, 2 * 64 + 45
    gen = torch.Generator().manual_seed(r1 + r2)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)

    dm, y1, y2, b1, b2, hs = rand(rows, cols), rand(rows, cols), rand(rows, cols), rand(cols, r1), rand(cols, r2), rand(rows, r1 + r2)
    got = glu_backward(dm, y1, y2, b1, b2, hs, Launch(block_t=32, block_n=64, programs_per_sm=per_processor))
    want = glu_backward_reference(dm, y1, y2, b1, b2, hs)  # its products read the rounded dy, as the kernel's
    for g, w in zip(got, want, strict=True):
        _close(g, w, dtype)


def test_shapes_are_checked() -> None:
    t = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="shapes do not match"):
        glu_backward(t, t, t, torch.zeros(6, 2), torch.zeros(5, 2), torch.zeros(4, 4))


def test_glu_kernel_choice() -> None:
    assert glu_in_kernel("auto", cuda=True) and not glu_in_kernel("auto", cuda=False)
    assert glu_in_kernel("triton", cuda=False) and not glu_in_kernel("torch", cuda=True)
    with pytest.raises(ValueError, match="glu_kernel must be"):
        glu_in_kernel("cublas", cuda=True)


def _glu_inputs(device: str = DEVICE, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(7)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(grad)

    x = rand(2, 37, 24, grad=True)
    first = LoraOperands(rand(40, 24), None, rand(4, 24, grad=True), rand(40, 4, grad=True), 2.0)
    second = LoraOperands(rand(40, 24), rand(40), rand(8, 24, grad=True), rand(40, 8, grad=True), 0.5)
    return x, first, second


def _glu_run(fn, x, first, second):
    m = fn(x, first, second)
    dm = torch.randn(m.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(m)
    params = (x, first.lora_a, first.lora_b, second.lora_a, second.lora_b)
    return m, torch.autograd.grad(m, params, dm)


def _glu_reference(x, first, second):
    return lora_linear_reference(x, *first) * lora_linear_reference(x, *second)


@needs_kernel
@pytest.mark.parametrize("compiled", [False, True])
def test_lora_glu_equals_the_compositions_in_float64(compiled: bool) -> None:
    """The product and every gradient (x's through both projections) as peft's compositions and the product
    compute them; compiled, through the custom operators."""
    x, first, second = _glu_inputs()
    fn = torch.compile(lora_glu, backend="aot_eager", fullgraph=True) if compiled else lora_glu
    want, want_grads = _glu_run(_glu_reference, x, first, second)
    with torch.profiler.profile() as prof:
        got, got_grads = _glu_run(fn, x, first, second)
    if compiled:
        assert {"tnlora::lora_glu", "tnlora::lora_glu_backward"} <= {event.name for event in prof.events()}
    for g, w in zip((got, *got_grads), (want, *want_grads), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11)


def test_lora_glu_operators_pass_torch_library_checks() -> None:
    """Schemas, fake shapes and autograd registration (``opcheck``; the backward's kernel runs only where the
    kernels can, so its operator is checked on the fake and schema tests)."""
    x, first, second = _glu_inputs("cpu")
    x = x.detach().reshape(-1, 24).requires_grad_()
    torch.library.opcheck(
        torch.ops.tnlora.lora_glu.default, (x, *first[:4], *second[:4], 2.0, 0.5),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_lora_glu_refuses_a_trainable_base_weight() -> None:
    x, first, second = _glu_inputs("cpu")
    second.weight.requires_grad_()
    with pytest.raises(ValueError, match="frozen weights"):
        lora_glu(x, first, second)
