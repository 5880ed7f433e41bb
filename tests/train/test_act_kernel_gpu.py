"""``act_kernel: triton`` on CUDA in bf16: a training step whose token mixers run the activation kernels
(``tnlora.ops.qkvu_act``) gives the loss and LoRA gradients of PyTorch's form within bf16 tolerance, eager and in
compiled layers, and every token mixer calls the kernels. Skipped without CUDA; run on a GPU with
``pytest -s -m gpu tests/train``.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from train_helpers import GEOMETRY_1B, assert_bf16_step_matches, kernel_and_torch_steps, lora_model

from tnlora.model import modeling

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("compiled", [False, True])
def test_the_activation_kernels_match_the_pytorch_form(monkeypatch, compiled: bool) -> None:
    calls = []
    monkeypatch.setattr(modeling, "qkvu_act", lambda *a, _f=modeling.qkvu_act: calls.append(1) or _f(*a))

    def make(kind: str) -> torch.nn.Module:
        model = lora_model(device="cuda", dtype=torch.bfloat16, impl="fla", act_kernel=kind, **GEOMETRY_1B)
        assert all(layer.token_mixer.act_kernel == kind for layer in model.base_model.model.model.layers)
        return model

    def after(kind: str, model: torch.nn.Module) -> None:
        if kind == "triton" and not compiled:
            assert len(calls) == len(model.base_model.model.model.layers)  # one call a token mixer

    results = kernel_and_torch_steps(make, after, compiled)
    assert calls  # compiled: the calls happen while the graphs are traced
    assert_bf16_step_matches(results[0], results[1], f"act_kernel triton, compiled {compiled}")
