"""The chunked loss's fused cross-entropy (``tnlora.ops.cross_entropy``) against PyTorch's composition: each row's
loss and softmax − onehot written over the logits, fp64 / fp32 / bf16, vocabularies inside one step, at a step
boundary and over several steps; then the chunked loss's value and gradients with the kernel against without.

The kernel tests need triton and a CUDA device, or Triton's CPU interpreter:

    TRITON_INTERPRET=1 PYTHONPATH=<dir holding triton> pytest -q tests/ops/test_cross_entropy.py
"""

from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE, INTERPRET, needs_kernel
from torch import nn

from tnlora.model.configuration import TransnormerConfig
from tnlora.model.modeling import chunked_causal_lm_loss
from tnlora.ops.cross_entropy import BLOCK_V, cross_entropy_grad_, cross_entropy_grad_reference
from tnlora.ops.select import kernels_for

# fp64 / fp32: the order of the sums. bf16: the gradient's rounding to bf16 (the interpreter truncates where the
# GPU rounds to nearest): one unit in the last place, 2⁻⁷ of the value.
LOSS_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}
GRAD_TOLERANCE = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 2**-7}


def _logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)
    targets = torch.randint(0, vocab, (rows,), generator=gen).to(DEVICE)
    return logits, targets


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [3, 1000, BLOCK_V, BLOCK_V + 5])  # one step (masked), exact, a partial step
def test_kernel_equals_the_composition(dtype: torch.dtype, vocab: int) -> None:
    logits, targets = _logits(5, vocab, dtype, seed=vocab)
    want_loss, want_grad = cross_entropy_grad_reference(logits, targets)
    want_grad = want_grad.to(dtype)
    buffer = logits.clone()
    got_loss = cross_entropy_grad_(buffer, targets)
    assert got_loss.dtype == want_loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert buffer.dtype == want_grad.dtype == dtype  # the gradient, written over the logits
    loss_err = ((got_loss - want_loss).abs() / want_loss.abs()).max().item()
    assert loss_err <= LOSS_TOLERANCE[dtype], loss_err
    scale = want_grad.double().abs() if dtype == torch.bfloat16 else 1.0
    grad_err = ((buffer.double() - want_grad.double()).abs() - GRAD_TOLERANCE[dtype] * scale).max().item()
    assert grad_err <= (0 if dtype == torch.bfloat16 else GRAD_TOLERANCE[dtype]), grad_err
    # softmax − onehot sums to 0 over a row, and the target's entry is the only negative one.
    assert torch.allclose(buffer.double().sum(1), torch.zeros(5, dtype=torch.float64, device=buffer.device), atol=1e-2)
    assert (buffer.argmin(1) == targets).all()


@needs_kernel
def test_a_strided_row_view_is_written_in_place() -> None:
    """Rows that are slices of wider rows (stride(0) > V) are read and written where they are."""
    logits, targets = _logits(4, 300, torch.float32)
    wide = torch.full((4, 320), 7.0, device=DEVICE)
    wide[:, 10:310] = logits
    losses = cross_entropy_grad_(wide[:, 10:310], targets)
    want_loss, want_grad = cross_entropy_grad_reference(logits, targets)
    torch.testing.assert_close(losses, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wide[:, 10:310], want_grad, rtol=1e-5, atol=1e-6)
    assert (wide[:, :10] == 7).all() and (wide[:, 310:] == 7).all()


def test_arguments_are_checked() -> None:
    logits, targets = torch.zeros(4, 10), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="contiguous rows"):
        cross_entropy_grad_(logits.t(), targets)
    with pytest.raises(ValueError, match=r"one per row \(4\)"):
        cross_entropy_grad_(logits, targets[:3])
    assert cross_entropy_grad_(logits[:0], targets[:0]).shape == (0,)  # no rows: no launch


@needs_kernel
@pytest.mark.parametrize("with_weight_grad", [False, True])
def test_chunked_loss_with_the_kernel_equals_without(with_weight_grad: bool) -> None:
    """float64: the loss and the gradients of the hidden states (and of the head, when it trains) over 3
    chunks, the last one partial, with num_items_in_batch."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 16, generator=gen, dtype=torch.float64).to(DEVICE)
    labels = torch.randint(0, 50, (2, 9), generator=gen).to(DEVICE)
    labels[0, :3] = -100
    head = nn.Linear(16, 50, bias=False).double().to(DEVICE)
    head.weight.requires_grad_(with_weight_grad)
    results = []
    for kernel in ("torch", "triton"):
        h = hidden.clone().requires_grad_()
        head.weight.grad = None
        loss = chunked_causal_lm_loss(h, head, labels, num_items_in_batch=13, chunk_size=5, kernel=kernel)
        loss.backward()
        results.append((loss.detach(), h.grad, head.weight.grad))
    (loss0, dh0, dw0), (loss1, dh1, dw1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=0)
    torch.testing.assert_close(dh1, dh0, rtol=1e-12, atol=1e-15)
    if with_weight_grad:
        torch.testing.assert_close(dw1, dw0, rtol=1e-12, atol=1e-15)
    else:
        assert dw0 is None and dw1 is None


def test_loss_kernel_is_chosen_per_device_and_checked() -> None:
    from tnlora.errors import ConfigError

    assert kernels_for(TransnormerConfig(), "cpu").loss == "torch"
    assert kernels_for(TransnormerConfig(loss_kernel="auto"), "cpu").loss == "torch"
    assert kernels_for(TransnormerConfig(loss_kernel="torch"), "cuda").loss == "torch"
    with pytest.raises(ConfigError, match="loss_kernel must be one of"):
        TransnormerConfig(loss_kernel="fast")


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device (model-sized shapes)")
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1024, 333])
def test_cuda_kernel_at_the_vocabulary_of_the_released_models(rows: int) -> None:
    """bf16 logits of a full and a partial chunk over TNL's 64,000-token vocabulary."""
    logits, targets = _logits(rows, 64000, torch.bfloat16, seed=rows)
    want_loss, want_grad = cross_entropy_grad_reference(logits, targets)
    want_grad = want_grad.to(torch.bfloat16)
    got_loss = cross_entropy_grad_(logits, targets)
    assert ((got_loss - want_loss).abs() / want_loss.abs()).max().item() <= 1e-5
    excess = (logits.double() - want_grad.double()).abs() - 2**-7 * want_grad.double().abs()
    assert excess.max().item() <= 0
