"""The token mixer's activation as one forward and one backward kernel (``tnlora.ops.qkvu_act``) against
PyTorch's form, and its selection (``act_kernel``).

The kernel tests need triton and a CUDA device, or Triton's CPU interpreter (see tests/ops/test_recurrent.py):

    TRITON_INTERPRET=1 PYTHONPATH=<dir holding triton> pytest -q tests/ops/test_qkvu_act.py
"""

from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE, needs_kernel

from tnlora.errors import ConfigError
from tnlora.model import TransnormerConfig
from tnlora.ops.qkvu_act import qkvu_act, qkvu_act_reference
from tnlora.ops.select import kernels_for

# fp64: the same formulas in the same precision; fp32: exp and the quotient rounded in another order;
# bf16: one rounding of the result (the interpreter truncates where compiled Triton rounds to nearest).
TOLERANCE = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 2**-6}


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()
    assert err <= TOLERANCE[dtype], err


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("forward", ["torch", "kernel"])
def test_kernels_equal_the_pytorch_form_forward_and_backward(dtype: torch.dtype, masked: bool, forward: str) -> None:
    # 37 tokens and H = 160: neither a multiple of the kernels' blocks
    gen = torch.Generator().manual_seed(int(masked))
    x = (3 * torch.randn(2, 37, 4 * 160, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)
    keep = (torch.rand(2, 37, generator=gen) > 0.3).to(DEVICE) if masked else None
    grads = [torch.randn(2, 37, 160, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) for _ in range(4)]
    x.requires_grad_(True)
    got = qkvu_act(x, keep, forward=forward)
    want = qkvu_act_reference(x, keep)
    for g, w in zip(got, want, strict=True):
        assert g.is_contiguous() or forward == "torch"  # PyTorch's forward: u (and unmasked v) views of x
        _close(g, w, dtype)
    if forward == "torch":
        assert got[3].data_ptr() == x.data_ptr() + 3 * 160 * x.element_size()  # u not copied
    if masked:
        assert not got[2][~keep].any()  # padded tokens' v is zero
    (dx_got,) = torch.autograd.grad(got, x, grads)
    (dx_want,) = torch.autograd.grad(want, x, grads)
    _close(dx_got, dx_want, dtype)
    if masked:
        assert not dx_got[..., 320:480][~keep].any()  # nothing flows back through a padded token's v


@needs_kernel
@pytest.mark.parametrize("forward", ["torch", "kernel"])
def test_backward_reads_strided_and_missing_gradients(forward: str) -> None:
    """A gradient that is a strided view is read as it is; an output that gets no gradient counts as zeros."""
    x = torch.randn(5, 4 * 64, dtype=torch.float64, device=DEVICE, requires_grad=True)
    q, k, _, _ = qkvu_act(x, forward=forward)
    dq = torch.randn(64, 5, dtype=torch.float64, device=DEVICE).t()  # not contiguous
    (dx,) = torch.autograd.grad((q * dq).sum() + k.sum(), x)
    rq, rk, _, _ = qkvu_act_reference(x)
    (want,) = torch.autograd.grad((rq * dq).sum() + rk.sum(), x)
    _close(dx, want, torch.float64)
    assert not dx[:, 128:].any()  # v and u unused: zero gradient


@needs_kernel
def test_the_operators_pass_opcheck() -> None:
    from tnlora.ops.qkvu_act import _qkvu_act_op

    x = torch.randn(9, 4 * 32, device=DEVICE, requires_grad=True)
    keep = (torch.rand(9, device=DEVICE) > 0.5).to(torch.uint8)
    torch.library.opcheck(_qkvu_act_op, (x, keep))
    torch.library.opcheck(_qkvu_act_op, (x, None))


@needs_kernel
@pytest.mark.parametrize("forward", ["torch", "kernel"])
def test_compiled_code_calls_the_operators_as_they_are(forward: str) -> None:
    """Under torch.compile the operators stay opaque calls (the compiled code names them; PyTorch's forward is
    compiled with the rest) and the compiled function gives the eager loss and gradient (fp32; Inductor sums
    the loss in another order)."""
    from torch._inductor.utils import run_and_get_code

    def f(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q, k, v, u = qkvu_act(x, keep, forward=forward)
        return (q * k + v * u).sum()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 4 * 32, generator=gen).to(DEVICE).requires_grad_(True)
    keep = (torch.rand(2, 7, generator=gen) > 0.2).to(DEVICE)
    want = f(x, keep)
    (dwant,) = torch.autograd.grad(want, x)
    compiled = torch.compile(f, fullgraph=True)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        loss = compiled(x, keep)
        return loss, torch.autograd.grad(loss, x)[0]  # the backward graph compiles on its first use

    with torch._inductor.config.patch(force_disable_caches=True):  # a cached graph would bring no code
        (got, dgot), code = run_and_get_code(step)
    # the loss: a sum of 448 fp32 products in Inductor's order; the gradient: the same kernels' outputs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dgot, dwant, rtol=1e-6, atol=1e-6)
    assert any("tnlora.qkvu_act.default" in c for c in code) == (forward == "kernel")
    assert any("tnlora.qkvu_act_backward.default" in c for c in code)


@needs_kernel
@pytest.mark.parametrize("compiled", [False, True])
def test_a_checkpointed_recompute_gives_the_same_gradient(compiled: bool) -> None:
    """Under non-reentrant activation checkpointing (a compiled function inside the checkpoint, as a compiled
    decoder layer is), the recomputed forward feeds the backward operator the same tensors: the gradient equals
    the un-checkpointed one bit for bit (fp64)."""
    from torch.utils.checkpoint import checkpoint

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 4 * 32, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    keep = (torch.rand(2, 9, generator=gen) > 0.3).to(DEVICE)

    def f(x: torch.Tensor) -> torch.Tensor:
        q, k, v, u = qkvu_act(x, keep)
        return (q * k + v * u).sum(-1)

    step = torch.compile(f, fullgraph=True) if compiled else f
    (want,) = torch.autograd.grad(step(x).sum(), x)
    (got,) = torch.autograd.grad(checkpoint(step, x, use_reentrant=False).sum(), x)
    assert torch.equal(got, want)


def test_bad_shapes_are_refused_before_any_kernel() -> None:
    with pytest.raises(ValueError, match="4 · H"):
        qkvu_act(torch.zeros(3, 10))
    with pytest.raises(ValueError, match=r"keep must be \(2, 3\)"):
        qkvu_act(torch.zeros(2, 3, 8), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="forward must be one of"):
        qkvu_act(torch.zeros(2, 3, 8), forward="fast")


def test_reference_is_the_model_s_activation() -> None:
    """The reference is what the token mixer computes with act_kernel torch: silu on q and k, v masked."""
    x = torch.randn(1, 4, 4 * 8, dtype=torch.float64)
    keep = torch.tensor([[True, False, True, True]])
    q, k, v, u = qkvu_act_reference(x, keep)
    torch.testing.assert_close(q, x[..., :8] * torch.sigmoid(x[..., :8]), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(k, x[..., 8:16] * torch.sigmoid(x[..., 8:16]), rtol=1e-14, atol=1e-14)
    assert not v[0, 1].any() and torch.equal(v[0, 0], x[0, 0, 16:24])
    assert torch.equal(u, x[..., 24:])


def test_act_kernel_is_auto_by_default_and_checked(monkeypatch) -> None:
    from tnlora.ops import select

    assert TransnormerConfig().act_kernel == "auto"
    assert kernels_for(TransnormerConfig(), "cpu").act == "torch"
    monkeypatch.setattr(select, "triton_available", lambda: True)
    assert kernels_for(TransnormerConfig(), "cuda").act == "triton"  # measured faster in training steps
    assert kernels_for(TransnormerConfig(act_kernel="torch"), "cuda").act == "torch"
    monkeypatch.setattr(select, "triton_available", lambda: False)
    assert kernels_for(TransnormerConfig(), "cuda").act == "torch"
    with pytest.raises(ConfigError, match="act_kernel must be one of"):
        TransnormerConfig(act_kernel="fast")



def test_select_kernels_sets_every_token_mixer_s_choice() -> None:
    from tnlora.model import TransnormerForCausalLM, config_from_preset
    from tnlora.model.modeling import NormLinearAttention

    model = TransnormerForCausalLM(config_from_preset("tiny", act_kernel="auto"))
    mixers = [m for m in model.modules() if isinstance(m, NormLinearAttention)]
    assert mixers and all(m.act_kernel == "torch" for m in mixers)  # auto on the CPU
    for m in mixers:
        m.act_kernel = "triton"
    model.select_kernels()  # the config's choice again
    assert all(m.act_kernel == "torch" for m in mixers)
