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

from train_helpers import GEOMETRY_1B, assert_bf16_step_matches, batch, lora_model, loss_and_grads

from tnlora.model import modeling
from tnlora.train.compile import compile_decoder_layers

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("compiled", [False, True])
def test_the_activation_kernels_match_the_pytorch_form(monkeypatch, compiled: bool) -> None:
    calls = []
    monkeypatch.setattr(modeling, "qkvu_act", lambda *a, _f=modeling.qkvu_act: calls.append(1) or _f(*a))
    inputs = {name: t.cuda() for name, t in batch(1000).items()}
    results = []
    for kernel in ("triton", "torch"):
        model = lora_model(device="cuda", dtype=torch.bfloat16, impl="fla", act_kernel=kernel, **GEOMETRY_1B)
        layers = model.base_model.model.model.layers
        assert all(layer.token_mixer.act_kernel == kernel for layer in layers)
        if compiled:
            compile_decoder_layers(model)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results.append(loss_and_grads(model, inputs))
        if kernel == "triton" and not compiled:
            assert len(calls) == len(layers)  # one call a token mixer
    assert calls  # compiled: the calls happen while the graphs are traced
    assert_bf16_step_matches(results[0], results[1], f"act_kernel triton, compiled {compiled}")
