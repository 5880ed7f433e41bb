"""``norm_kernel`` on CUDA in bf16: eager training with the Triton norms (forward and backward kernels) gives
the loss and LoRA gradients of the PyTorch norms within bf16 tolerance, and each norm of the step runs the
kernel. Skipped without CUDA; run on a GPU with ``pytest -s -m gpu tests/train``.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from train_helpers import (
    GEOMETRY_1B,
    assert_bf16_step_matches,
    counted_calls,
    kernel_and_torch_steps,
    lora_model,
)

from tnlora.model import modeling

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_triton_training_norms_match_the_pytorch_form(monkeypatch, dropout: float) -> None:
    calls = counted_calls(monkeypatch, modeling, "rms_norm")

    def after(kind: str, model: torch.nn.Module) -> None:
        layers = len(model.base_model.model.model.layers)
        # token, output-gate and channel norm a layer; the final norm; none with norm_kernel torch
        assert len(calls) == 3 * layers + 1

    results = kernel_and_torch_steps(
        lambda kind: lora_model(dropout, device="cuda", dtype=torch.bfloat16, norm_kernel=kind, **GEOMETRY_1B), after
    )
    # bf16 autocast; the kernel keeps fp32 where the PyTorch form rounds. Reference: the PyTorch norms.
    assert_bf16_step_matches(results[0], results[1], f"norm_kernel triton, dropout {dropout}")
