"""The fused one-row projections (``tnlora.ops.gemv``) against the model's composition of PyTorch ops
(``gemv_reference``): plain, RMS-normed input, GLU, residual add; fp64 / fp32 / bf16; uneven widths.

Needs triton and a CUDA device, or Triton's CPU interpreter:

    TRITON_INTERPRET=1 PYTHONPATH=<dir holding triton> pytest -q tests/ops/test_gemv.py
"""

from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE, INTERPRET, needs_kernel

from tnlora.ops.gemv import gemv, gemv_reference

pytestmark = needs_kernel
# fp64 / fp32: the order of the sums (and the normed x kept exact instead of rounded: exact in fp64 up to
# rounding, too); bf16: the output's rounding, and the normed x's.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-6}
CASES = {
    "plain": {},
    "norm": {"norm_eps": 1e-6},
    "glu": {"norm_eps": 1e-6, "weight2": True},
    "residual": {"residual": True},
}


def _inputs(n: int, k: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(k, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=gen, dtype=torch.float64) / k**0.5).to(dtype).to(DEVICE)
    w2 = (torch.randn(n, k, generator=gen, dtype=torch.float64) / k**0.5).to(dtype).to(DEVICE)
    residual = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    return x, w, w2, residual


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("n", "k"), [(24, 64), (37, 200)])  # even and uneven widths (masked rows, columns)
def test_gemv_equals_the_model_ops(dtype: torch.dtype, case: str, n: int, k: int) -> None:
    x, w, w2, residual = _inputs(n, k, dtype)
    options = dict(CASES[case])
    if options.pop("weight2", False):
        options["weight2"] = w2
    if options.pop("residual", False):
        options["residual"] = residual
    got = gemv(x, w, **options)
    want = gemv_reference(x, w, **options)
    assert got.dtype == want.dtype == dtype and got.shape == (n,)
    exact = gemv_reference(*(t.double() if t.dtype != torch.float64 else t for t in (x, w)), **{
        key: (value.double() if isinstance(value, torch.Tensor) else value) for key, value in options.items()
    })
    err = ((got.double() - want.double()).abs().max() / exact.abs().max()).item()
    assert err <= TOLERANCE[dtype], err


def test_a_strided_weight_view_is_read_in_place() -> None:
    """A weight whose rows are a slice of wider rows (stride(0) > K) is read without a copy."""
    x, w, _, _ = _inputs(16, 128, torch.float32)
    wide = torch.zeros(16, 160, device=DEVICE)
    wide[:, 16:144] = w
    torch.testing.assert_close(gemv(x, wide[:, 16:144]), gemv_reference(x, w), rtol=1e-5, atol=1e-5)


def test_arguments_are_checked() -> None:
    x, w, w2, residual = _inputs(8, 32, torch.float32)
    with pytest.raises(ValueError, match="one contiguous vector"):
        gemv(x[None], w)
    with pytest.raises(ValueError, match="x has 31 values"):
        gemv(x[:31], w)
    with pytest.raises(ValueError, match="weight2 must be"):
        gemv(x, w, weight2=w2[:4])
    with pytest.raises(ValueError, match="residual must be"):
        gemv(x, w, residual=residual.double())


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device (model-sized shapes)")
@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k"), [(16384, 4096), (4096, 11008), (11008, 4096), (64000, 2048)])
def test_cuda_gemv_at_model_shapes(n: int, k: int) -> None:
    """bf16 at the 7B / 1B projection shapes (masked and unmasked row blocks), each fused form."""
    x, w, w2, residual = _inputs(n, k, torch.bfloat16, seed=n)
    for options in ({}, {"norm_eps": 1e-6}, {"norm_eps": 1e-6, "weight2": w2}, {"residual": residual}):
        got = gemv(x, w, **options)
        want = gemv_reference(x, w, **options)
        err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
        assert err <= TOLERANCE[torch.bfloat16], (options.keys(), err)
