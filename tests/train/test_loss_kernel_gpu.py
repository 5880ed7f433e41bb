"""``loss_kernel: triton`` on CUDA in bf16: a LoRA training step with the fused cross-entropy gives the loss and
LoRA gradients of PyTorch's composition within bf16 tolerance, and every chunk of the loss runs the kernel.
Skipped without CUDA; run on a GPU with ``pytest -s -m gpu tests/train``.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from train_helpers import GEOMETRY_1B, assert_bf16_step_matches, batch, lora_model, loss_and_grads

from tnlora.model import modeling

pytestmark = pytest.mark.gpu


def test_triton_loss_matches_the_pytorch_composition(monkeypatch) -> None:
    calls = []
    fused = modeling.cross_entropy_grad_
    monkeypatch.setattr(modeling, "cross_entropy_grad_", lambda *a: calls.append(1) or fused(*a))
    inputs = {name: t.cuda() for name, t in batch(1000).items()}
    results = []
    for kernel in ("triton", "torch"):
        model = lora_model(device="cuda", dtype=torch.bfloat16, loss_kernel=kernel, loss_chunk_size=256,
                           **GEOMETRY_1B)  # fmt: skip
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results.append(loss_and_grads(model, inputs))
        if kernel == "triton":
            labelled = int((inputs["labels"][:, 1:] != -100).sum())
            assert len(calls) == -(-labelled // 256)  # one launch a chunk
    assert len(calls) == -(-labelled // 256)  # none with loss_kernel torch
    assert_bf16_step_matches(results[0], results[1], "loss_kernel triton")
