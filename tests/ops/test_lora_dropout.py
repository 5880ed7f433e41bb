"""LoRA's dropout with the mask drawn inside the kernels (``tnlora.ops.lora_dropout``): the mask against its NumPy
definition (Philox4x32-10 against the published known answer), each kernel against the composition with that mask,
and the fused LoRA layer with ``dropout_kernel="triton"`` against peft's composition on the same mask, forward and
gradients, eager and as the compiled custom operators.

The kernel tests need triton and a CUDA device, or Triton's CPU interpreter (see tests/ops/kernel_device.py):

    TRITON_INTERPRET=1 PYTHONPATH=<dir holding triton> pytest -q tests/ops/test_lora_dropout.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_device import DEVICE, INTERPRET, needs_kernel

from tnlora.ops import lora_dropout
from tnlora.ops.lora import lora_linear, seeds_dropout
from tnlora.ops.lora_dropout import (
    Launch,
    draw_seed,
    dropout_down,
    dropout_grad_a,
    dropout_up,
    keep_mask,
    keep_mask_reference,
    keep_threshold,
    unpack_keep,
)

# fp64: the same products summed in another order; fp32 likewise (no TF32); bf16: one rounding of fp32 sums against
# the float64 composition of the same (rounded) operands.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-7}
# Triton 3.6's interpreter computes bf16 dots wrongly (tests/ops/test_gemv.py): bf16 on CUDA only.
DTYPES = [torch.float64, torch.float32] + ([] if INTERPRET else [torch.bfloat16])


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == want.shape
    err = ((got.double().cpu() - want.double().cpu()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()
    assert err <= TOLERANCE[dtype], err


def _seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def test_philox_matches_the_published_known_answer() -> None:
    # Random123's known-answer vector for Philox4x32-10, counter 0 and key 0
    words = lora_dropout._philox4x32(np.zeros(1, dtype=np.uint64), 0)
    assert [int(w[0]) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_the_mask_drops_at_the_rate_asked_and_each_seed_draws_its_own() -> None:
    assert keep_threshold(0.0) == 0 and keep_threshold(0.1) == 6554 and keep_threshold(0.5) == 32768
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\), got 1.0"):
        keep_threshold(1.0)
    for p in (0.1, 0.5):
        kept = keep_mask_reference(12345, 400, 1000, p)
        # 400,000 draws: the dropped share within 5 standard deviations of p
        assert abs((1 - kept.double().mean().item()) - p) < 5 * (p * (1 - p) / kept.numel()) ** 0.5
        # no column of a group of 8, nor any row, is special
        by_column = 1 - kept.double().reshape(400, 125, 8).mean((0, 1))
        assert (by_column - p).abs().max() < 0.02
    assert keep_mask_reference(0, 5, 24, 0.0).all()
    a, b = keep_mask_reference(1, 64, 64, 0.5), keep_mask_reference(2, 64, 64, 0.5)
    assert 0.4 < (a != b).double().mean().item() < 0.6
    # a row's columns past a multiple of 8 are the start of the wider row's (the counter is per group of 8)
    assert torch.equal(keep_mask_reference(7, 3, 20, 0.3), keep_mask_reference(7, 3, 24, 0.3)[:, :20])


def test_the_dropout_kernel_is_chosen_on_cuda_where_triton_imports() -> None:
    from tnlora.ops.select import triton_available

    assert seeds_dropout("auto", cuda=True) == triton_available()
    assert not seeds_dropout("auto", cuda=False) and not seeds_dropout("torch", cuda=True)
    assert seeds_dropout("triton", cuda=False)
    with pytest.raises(ValueError, match="dropout_kernel must be"):
        seeds_dropout("cudnn", cuda=True)


@needs_kernel
@pytest.mark.parametrize(("rows", "cols"), [(5, 24), (70, 300), (129, 136)])
def test_the_kernels_draw_the_reference_mask(rows: int, cols: int) -> None:
    seed = _seed(987654321987)
    want = keep_mask_reference(seed.cpu(), rows, cols, 0.3)
    # whatever tile the kernel walks with: the groups of 8 columns stay whole
    for launch in (Launch(), Launch(block_t=32, block_k=64), Launch(block_t=16, block_k=256)):
        assert torch.equal(keep_mask(seed, rows, cols, 0.3, launch).cpu(), want)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols", "rank"), [(70, 300, 8), (129, 136, 5)])
def test_each_kernel_equals_the_composition_on_the_same_mask(dtype: torch.dtype, rows: int, cols: int, rank: int) -> None:
    # rows and columns ending mid-tile; rank 5 padded to the least dot width; several splits of x's columns
    gen = torch.Generator().manual_seed(rank)
    x, a, g = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
               for shape in ((rows, cols), (rank, cols), (rows, rank)))  # fmt: skip
    p, seed = 0.25, _seed(42 + rank)
    want_kept = keep_mask_reference(seed.cpu(), rows, cols, p)
    kept = want_kept.double()
    xd = x.double() * kept
    dev = [t.to(DEVICE) for t in (x, a, g)]
    # another tile and split of the columns: the same mask and bits
    for launch in (Launch(), Launch(block_t=32, block_k=64)):
        h, bits = dropout_down(dev[0], dev[1], seed, p, launch)
        assert bits.dtype == torch.uint8 and bits.shape == (rows, -(-cols // 8))
        assert torch.equal(unpack_keep(bits, cols).cpu(), want_kept)
        _close(h, (xd @ a.double().t()).to(dtype), dtype)
    _close(dropout_grad_a(dev[2], dev[0], bits, 1.5), (1.5 * g.double().t() @ xd).to(dtype), dtype)
    up = (g.double() @ a.double()) * kept
    _close(dropout_up(dev[2], dev[1], bits), up.to(dtype), dtype)
    base = torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype)
    out = base.to(DEVICE, copy=True)
    assert dropout_up(dev[2], dev[1], bits, out=out) is out  # added in place
    _close(out, (base.double() + up).to(dtype), dtype)


@needs_kernel
def test_the_kernels_refuse_mismatched_shapes() -> None:
    x, a = torch.zeros(4, 16, device=DEVICE), torch.zeros(2, 15, device=DEVICE)
    bits = torch.zeros(4, 2, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match=r"lora_a must be 2-D with 16 columns, got \(2, 15\)"):
        dropout_down(x, a, _seed(1), 0.1)
    with pytest.raises(ValueError, match=r"g and x must have the same rows, got \(3, 2\) and \(4, 16\)"):
        dropout_grad_a(torch.zeros(3, 2, device=DEVICE), x, bits, 1.0)
    with pytest.raises(ValueError, match=r"bits must be contiguous uint8 \[4, 2\], got torch.uint8 \(4, 1\)"):
        dropout_grad_a(torch.zeros(4, 2, device=DEVICE), x, bits[:, :1], 1.0)
    with pytest.raises(ValueError, match=r"out must be \[4, 15\]"):
        dropout_up(torch.zeros(4, 2, device=DEVICE), a, bits, out=x)


def _layer_inputs(dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 50, 40, generator=gen, dtype=torch.float64)
    weight = torch.randn(48, 40, generator=gen, dtype=torch.float64)
    bias = torch.randn(48, generator=gen, dtype=torch.float64)
    lora_a = torch.randn(8, 40, generator=gen, dtype=torch.float64)
    lora_b = torch.randn(48, 8, generator=gen, dtype=torch.float64)
    dy = torch.randn(3, 50, 48, generator=gen, dtype=torch.float64)
    return [t.to(dtype).to(DEVICE) for t in (x, weight, bias, lora_a, lora_b, dy)]


def _composition(x, weight, bias, lora_a, lora_b, scaling, p, kept):
    xd = x * kept.reshape(x.shape).to(x) / (1.0 - p)
    return x @ weight.t() + bias + (xd @ lora_a.t()) @ lora_b.t() * scaling


@needs_kernel
@pytest.mark.parametrize("compiled", [False, True])
def test_the_layer_with_the_kernels_equals_the_composition_on_their_mask(compiled: bool) -> None:
    """The fused layer (eager autograd function, or the custom operators under torch.compile) draws its seed from
    PyTorch's generator; peft's composition on that seed's mask gives the same output and gradients (fp64)."""
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
    seed = draw_seed(DEVICE)  # the draw the layer made
    kept = keep_mask_reference(seed.cpu(), 150, 40, p).to(DEVICE)
    ref_leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
    want_y = _composition(ref_leaves[0], weight, bias, ref_leaves[1], ref_leaves[2], scaling, p, kept)
    want = torch.autograd.grad(want_y, ref_leaves, dy)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    for g, w, name in zip(got, want, ("x", "lora_a", "lora_b"), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)
    # a different generator state draws another mask: the comparison above could fail
    torch.manual_seed(12)
    assert (fused(x, weight, bias, lora_a, lora_b) - want_y).abs().max() > 1e-3


@needs_kernel
def test_the_operators_with_the_seed_pass_torch_library_checks() -> None:
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
    bits = torch.randint(0, 256, (150, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).to(DEVICE)
    for needs_x in (True, False):
        torch.library.opcheck(
            torch.ops.tnlora.lora_linear_backward.default,
            (dy, weight, lora_a, lora_b, x, x @ lora_a.t(), bits, 2.0, 0.3, needs_x, False, *[None] * 5, True),
        )
