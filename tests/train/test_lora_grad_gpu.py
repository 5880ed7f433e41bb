"""The fused LoRA layers' backward with ``grad_kernel: triton`` on CUDA in bf16: a training step whose adapted
layers take g = dy B and dB from one read of dy (``tnlora.ops.lora_grad``) gives the loss and LoRA gradients of
the two-GEMM backward within bf16 tolerance, eager and in compiled layers (the custom operators), and every
adapted layer's backward calls the kernel. Skipped without CUDA; run on a GPU with
``pytest -s -m gpu tests/train``.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from train_helpers import GEOMETRY_1B, assert_bf16_step_matches, kernel_and_torch_steps, lora_model

from tnlora.ops import lora_grad
from tnlora.train.lora_fused import FusedLoraLinear

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("compiled", [False, True])
def test_one_read_of_dy_matches_the_two_gemms(monkeypatch, compiled: bool) -> None:
    calls = []
    monkeypatch.setattr(lora_grad, "lora_dy_products", lambda *a, _f=lora_grad.lora_dy_products: calls.append(1) or _f(*a))

    def make(kind: str) -> torch.nn.Module:
        model = lora_model(0.1, device="cuda", dtype=torch.bfloat16, impl="fla", **GEOMETRY_1B)
        for module in model.modules():
            if isinstance(module, FusedLoraLinear):
                module.grad_kernel = kind
        return model

    def after(kind: str, model: torch.nn.Module) -> None:
        adapted = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
        assert len(calls) == len(adapted)  # one call an adapted layer's backward; none with the two GEMMs

    results = kernel_and_torch_steps(make, after, compiled)
    assert_bf16_step_matches(results[0], results[1], f"lora grad_kernel triton, compiled {compiled}")
