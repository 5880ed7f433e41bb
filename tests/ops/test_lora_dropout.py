"""LoRA's dropout applied inside the kernels (``tnlora.ops.lora_dropout``): each kernel against the composition on
the same mask, and the fused LoRA layer with ``dropout_kernel="triton"`` against peft's composition on the mask it
drew, forward and gradients, eager and as the compiled custom operators.

The kernel tests need triton and a CUDA device, or Triton's CPU interpreter (see tests/ops/kernel_device.py):

    TRITON_INTERPRET=1 PYTHONPATH=<dir holding triton> pytest -q tests/ops/test_lora_dropout.py
"""

from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE, INTERPRET, needs_kernel

from tnlora.ops.lora import dropout_in_kernels, lora_linear
from tnlora.ops.lora_dropout import Launch, draw_keep, dropout_down, dropout_grad_a, dropout_up

# fp64: the same products summed in another order; fp32 likewise (no TF32); bf16: one rounding of fp32 sums against
# the float64 composition of the same (rounded) operands.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-7}
# Triton 3.6's interpreter computes bf16 dots wrongly (tests/ops/test_gemv.py): bf16 on CUDA only.
DTYPES = [torch.float64, torch.float32] + ([] if INTERPRET else [torch.bfloat16])


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == want.shape
    err = ((got.double().cpu() - want.double().cpu()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()
    assert err <= TOLERANCE[dtype], err


def test_the_mask_is_a_byte_an_element_at_the_rate_asked() -> None:
    torch.manual_seed(0)
    keep = draw_keep(torch.empty(400, 1000), 0.1)
    assert keep.dtype == torch.uint8 and keep.shape == (400, 1000) and set(keep.unique().tolist()) == {0, 1}
    # 400,000 draws: the dropped share within 5 standard deviations of p
    assert abs((1 - keep.double().mean().item()) - 0.1) < 5 * (0.1 * 0.9 / keep.numel()) ** 0.5
    assert draw_keep(torch.empty(3, 5), 0.0).all()
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\), got 1.0"):
        draw_keep(torch.empty(3, 5), 1.0)


def test_the_dropout_kernels_run_only_when_asked_for() -> None:
    # opt-in: they tie with PyTorch's dropout on a GPU (benchmarks/RESULTS.md), so "auto" is PyTorch's dropout
    assert not dropout_in_kernels("auto", cuda=True) and not dropout_in_kernels("torch", cuda=True)
    assert dropout_in_kernels("triton", cuda=False) and dropout_in_kernels("triton", cuda=True)
    with pytest.raises(ValueError, match="dropout_kernel must be"):
        dropout_in_kernels("cudnn", cuda=True)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols", "rank"), [(70, 300, 8), (129, 136, 5)])
def test_each_kernel_equals_the_composition_on_the_same_mask(dtype: torch.dtype, rows: int, cols: int, rank: int) -> None:
    # rows and columns ending mid-tile; rank 5 padded to the least dot width; several splits of x's columns
    gen = torch.Generator().manual_seed(rank)
    x, a, g = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
               for shape in ((rows, cols), (rank, cols), (rows, rank)))  # fmt: skip
    keep = (torch.rand(rows, cols, generator=gen) > 0.25).to(torch.uint8)
    xd = x.double() * keep
    dev = [t.to(DEVICE) for t in (x, a, g, keep)]
    launches = [None, Launch(block_t=32, block_k=64)] if dtype != torch.float64 else [None, Launch(8, 16, 4, 1)]
    for launch in launches:  # the default tiles and others: several splits of the columns and rows
        _close(dropout_down(dev[0], dev[3], dev[1], launch), (xd @ a.double().t()).to(dtype), dtype)
        _close(dropout_grad_a(dev[2], dev[0], dev[3], 1.5, launch), (1.5 * g.double().t() @ xd).to(dtype), dtype)
    up = (g.double() @ a.double()) * keep
    _close(dropout_up(dev[2], dev[1], dev[3]), up.to(dtype), dtype)
    base = torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype)
    out = base.to(DEVICE, copy=True)
    assert dropout_up(dev[2], dev[1], dev[3], out=out) is out  # added in place
    _close(out, (base.double() + up).to(dtype), dtype)
    # without a mask: the plain rank-r products (x Aᵀ, gᵀ x, g A)
    _close(dropout_down(dev[0], None, dev[1]), (x.double() @ a.double().t()).to(dtype), dtype)
    _close(dropout_grad_a(dev[2], dev[0], None, 1.5), (1.5 * g.double().t() @ x.double()).to(dtype), dtype)
    _close(dropout_up(dev[2], dev[1], None), (g.double() @ a.double()).to(dtype), dtype)


@needs_kernel
def test_the_kernels_refuse_mismatched_shapes() -> None:
    x, a = torch.zeros(4, 16, device=DEVICE), torch.zeros(2, 15, device=DEVICE)
    keep = torch.ones(4, 16, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match=r"lora_a must be 2-D with 16 columns, got \(2, 15\)"):
        dropout_down(x, keep, a)
    with pytest.raises(ValueError, match=r"g and x must have the same rows, got \(3, 2\) and \(4, 16\)"):
        dropout_grad_a(torch.zeros(3, 2, device=DEVICE), x, keep, 1.0)
    with pytest.raises(ValueError, match=r"keep must be uint8 \[4, 16\], got torch.bool \(4, 16\)"):
        dropout_grad_a(torch.zeros(4, 2, device=DEVICE), x, keep.bool(), 1.0)
    with pytest.raises(ValueError, match=r"out must be \[4, 15\]"):
        dropout_up(torch.zeros(4, 2, device=DEVICE), a, keep[:, :15], out=x)


def _layer_inputs(dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 50, 40, generator=gen, dtype=torch.float64)
    weight = torch.randn(48, 40, generator=gen, dtype=torch.float64)
    bias = torch.randn(48, generator=gen, dtype=torch.float64)
    lora_a = torch.randn(8, 40, generator=gen, dtype=torch.float64)
    lora_b = torch.randn(48, 8, generator=gen, dtype=torch.float64)
    dy = torch.randn(3, 50, 48, generator=gen, dtype=torch.float64)
    return [t.to(dtype).to(DEVICE) for t in (x, weight, bias, lora_a, lora_b, dy)]


@needs_kernel
@pytest.mark.parametrize("compiled", [False, True])
def test_the_layer_with_the_kernels_equals_the_composition_on_its_mask(compiled: bool) -> None:
    """The fused layer (eager autograd function, or the custom operators under torch.compile) draws its mask from
    PyTorch's generator; peft's composition on that mask gives the same output and gradients (fp64)."""
    x, weight, bias, lora_a, lora_b, dy = _layer_inputs()
    p, scaling = 0.3, 2.0

    def fused(*args):
        return lora_linear(*args, scaling, p, True, dropout_kernel="triton")

    run = torch.compile(fused, backend="aot_eager", fullgraph=True) if compiled else fused
    leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
    torch.manual_seed(11)
    y = run(leaves[0], weight, bias, leaves[1], leaves[2])
    got = torch.autograd.grad(y, leaves, dy)
    torch.manual_seed(11)
    keep = draw_keep(x.reshape(-1, 40), p).reshape(x.shape)  # the draw the layer made
    ref = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
    want_y = ref[0] @ weight.t() + bias + ((ref[0] * keep / (1 - p)) @ ref[1].t()) @ ref[2].t() * scaling
    want = torch.autograd.grad(want_y, ref, dy)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    for g, w, name in zip(got, want, ("x", "lora_a", "lora_b"), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)
    # a different generator state draws another mask: the comparison above could fail
    torch.manual_seed(12)
    assert (fused(x, weight, bias, lora_a, lora_b) - want_y).abs().max() > 1e-3


@needs_kernel
def test_the_operators_with_the_byte_mask_pass_torch_library_checks() -> None:
    x, weight, _bias, lora_a, lora_b, dy = _layer_inputs()
    x, dy = x.reshape(-1, 40), dy.reshape(-1, 48)
    leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
    # the forward draws from the generator, so only the checks that run it once each
    checks = ("test_autograd_registration", "test_faketensor")
    torch.library.opcheck(
        torch.ops.tnlora.lora_linear.default,
        (leaves[0], weight, None, leaves[1], leaves[2], 2.0, 0.3, True, False, None, None, None, None, True),
        test_utils=checks,
    )
    keep = (torch.rand(150, 40, generator=torch.Generator().manual_seed(0)) > 0.3).to(torch.uint8).to(DEVICE)
    for needs_x in (True, False):
        torch.library.opcheck(
            torch.ops.tnlora.lora_linear_backward.default,
            (dy, weight, lora_a, lora_b, x, x @ lora_a.t(), keep, 2.0, 0.3, needs_x, False, *[None] * 5, True),
        )
