"""The fused norm kernels (``tnlora.ops.norm``) against ``SimpleRMSNorm`` and the PyTorch ops.

Needs triton and a CUDA device, or Triton's CPU interpreter (see tests/ops/test_recurrent.py):

    TRITON_INTERPRET=1 PYTHONPATH=<dir holding triton> pytest -q tests/ops/test_norm.py
"""

from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE, INTERPRET, needs_kernel

from tnlora.model.modeling import SimpleRMSNorm
from tnlora.ops.norm import add_rms_norm, gated_rms_norm, rms_norm

pytestmark = needs_kernel
# fp32 / fp64: only the order of the sum over D differs; bf16: the rounding of h and of the output.
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-14, torch.bfloat16: 2**-6}


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
    assert err <= TOLERANCE[want.dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("width", [96, 256])  # not a power of two / one
def test_add_rms_norm_equals_add_then_norm(dtype: torch.dtype, width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    x = (3 * torch.randn(4, 1, width, generator=gen)).to(dtype).to(DEVICE)
    delta = torch.randn(4, 1, width, generator=gen).to(dtype).to(DEVICE)
    norm = SimpleRMSNorm()
    h, y = add_rms_norm(x, delta, norm.eps)
    if dtype == torch.bfloat16 and INTERPRET:
        _close(h, x + delta)  # the interpreter truncates fp32 -> bf16; compiled Triton rounds to nearest even
    else:
        assert torch.equal(h, x + delta)  # the residual add rounds exactly as PyTorch's
    _close(y, norm(x + delta))
    same, y0 = add_rms_norm(x, None, norm.eps)
    assert same is x
    _close(y0, norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm_reads_a_strided_gate(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    width = 128
    o = torch.randn(3, 1, width, generator=gen).to(dtype).to(DEVICE)
    # The gate is the last quarter of the fused q/k/v/u projection's output: row stride 4 × width.
    fused = torch.randn(3, 1, 4 * width, generator=gen).to(dtype).to(DEVICE)
    u = fused.chunk(4, dim=-1)[3]
    got = gated_rms_norm(o, u, 1e-6)
    _close(got, u * SimpleRMSNorm()(o))


def test_bad_arguments_are_refused() -> None:
    x = torch.randn(2, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="delta must match"):
        add_rms_norm(x, torch.randn(2, 1, 4, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="contiguous last dim"):
        gated_rms_norm(x, torch.randn(2, 1, 16, device=DEVICE)[..., ::2], 1e-6)


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_no_grad_cuda_forward_uses_the_kernel_and_matches_pytorch_norms(monkeypatch) -> None:
    # The prefill's norms (norm_kernel auto → triton on CUDA) against the PyTorch form (norm_kernel torch).
    from tnl_helpers import build_model, random_ids
    from tnlora.ops import norm as norm_ops

    launches = []
    monkeypatch.setattr(norm_ops, "_launch", lambda *a, _f=norm_ops._launch, **k: launches.append(1) or _f(*a, **k))
    model = build_model(torch.float32).to(device="cuda", dtype=torch.bfloat16)
    model.config.lightning_impl = "chunked"
    ids = random_ids(2, 9).cuda()
    with torch.no_grad():
        fused = model(ids).logits
        layers = len(model.model.layers)
        assert len(launches) == 3 * layers + 1  # token, output-gate and channel norm of each layer; final norm
        model.config.norm_kernel = "torch"
        model.select_kernels()
        plain = model(ids).logits
        assert len(launches) == 3 * layers + 1
    assert model.model.final_norm.kernel == "torch"
    model.config.norm_kernel = "auto"
    model.select_kernels()
    assert model.model.final_norm.kernel == "triton"  # chosen for the device, not per call
    err = ((fused.double() - plain.double()).abs().max() / plain.double().abs().max()).item()
    assert err <= 2e-2, err  # at most bf16 rounding of the norms


# The differentiable form (training, ``norm_kernel``): forward and both gradients against autograd through the
# PyTorch form. fp64: only the order of the sums differs; bf16: the kernel keeps fp32 where PyTorch rounds.
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2**-6}


def _pytorch_norm(x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return SimpleRMSNorm(kernel="torch")(x, gate=gate)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
def test_rms_norm_forward_and_gradients_match_autograd(dtype: torch.dtype, gated: bool) -> None:
    gen = torch.Generator().manual_seed(7 + gated)
    width = 96  # not a power of two
    x = (2 * torch.randn(2, 5, width, generator=gen)).to(dtype).to(DEVICE)
    # A gate as the token mixer gets it: the last quarter of the fused projection (rows of stride 4 × width).
    fused = torch.randn(2, 5, 4 * width, generator=gen).to(dtype).to(DEVICE)
    dout = torch.randn(2, 5, width, generator=gen).to(dtype).to(DEVICE)
    results = []
    for fn in (rms_norm, None):
        xs = x.clone().requires_grad_(True)
        fs = fused.clone().requires_grad_(True)
        gate = fs.chunk(4, dim=-1)[3] if gated else None
        y = fn(xs, gate, 1e-6) if fn is not None else _pytorch_norm(xs, gate)
        y.backward(dout)
        results.append((y.detach(), xs.grad, fs.grad if gated else None))
    (y, dx, dfused), (want_y, want_dx, want_dfused) = results
    _close(y, want_y)
    bound = GRAD_TOLERANCE[dtype]
    for got, want in ((dx, want_dx), (dfused, want_dfused)):
        if want is None:
            continue
        assert got.dtype == want.dtype and got.shape == want.shape
        err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
        assert err <= bound, err
    if gated:
        assert torch.equal(dfused[..., : 3 * width], torch.zeros_like(dfused[..., : 3 * width]))


def test_rms_norm_passes_gradcheck_in_float64() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 16, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    gate = torch.randn(3, 2, 16, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, gate))
    assert torch.autograd.gradcheck(lambda a: rms_norm(a, None, 1e-6), (x,))


def test_rms_norm_takes_a_non_contiguous_incoming_gradient() -> None:
    x = torch.randn(4, 32, dtype=torch.float64, device=DEVICE, requires_grad=True)
    (rms_norm(x, None, 1e-6) * torch.tensor(3.0, dtype=torch.float64, device=DEVICE)).sum().backward()
    want = x.detach().clone().requires_grad_(True)
    (_pytorch_norm(want, None) * 3).sum().backward()  # an expanded (stride-0) gradient reaches the norm
    assert torch.allclose(x.grad, want.grad, rtol=0, atol=1e-12)


def test_rms_norm_refuses_a_mismatched_gate() -> None:
    x = torch.randn(2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="gate must match"):
        rms_norm(x, torch.randn(2, 3, 8, device=DEVICE, dtype=torch.float64), 1e-6)
