"""Training-step kernels against the PyTorch form they replace, on CUDA in bf16: a training step gives the loss
and LoRA gradients of the PyTorch form within bf16 tolerance, eager and in compiled layers, and every layer calls
the kernel. ``act_kernel: triton``: the token mixers' activation (``tnlora.ops.qkvu_act``). The fused LoRA
layers' ``grad_kernel = "triton"``: their backward's g = dy B and dB from one read of dy
(``tnlora.ops.lora_grad``) instead of two GEMMs. ``fp8: true``: the frozen GEMMs in fp8 (``tnlora.ops.fp8``),
within e4m3's rounding of the bf16 step. ``trim_last_layer``: the last layer computing the labelled positions
alone after its attention, within bf16 tolerance of every position. Skipped without CUDA; run on a GPU with
``pytest -s -m gpu tests/train``.
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
    half_labelled,
    kernel_and_torch_steps,
    lora_model,
)

from tnlora.model import modeling
from tnlora.ops import lora as lora_ops
from tnlora.train.lora_fused import FusedLoraLinear

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("compiled", [False, True])
def test_the_activation_kernels_match_the_pytorch_form(monkeypatch, compiled: bool) -> None:
    calls = counted_calls(monkeypatch, modeling, "qkvu_act")

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


@pytest.mark.parametrize("compiled", [False, True])
def test_one_read_of_dy_in_the_lora_backward_matches_the_two_gemms(monkeypatch, compiled: bool) -> None:
    calls = counted_calls(monkeypatch, lora_ops, "lora_dy_products")  # where the LoRA backward looks it up

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


@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_frozen_gemms_stay_within_e4m3_rounding_of_bf16(compiled: bool) -> None:
    """``fp8: true`` on CUDA: the frozen GEMMs on the fp8 tensor cores (the model of 1B's width, packed rows, fla).
    e4m3 keeps 3 mantissa bits (a relative step of 2^-4, ~3.6 % rms per rounded operand), so the tolerance is
    the rounding's, not bf16's: loss within 1 %, each LoRA gradient within 15 % of its norm (its error gathers
    the rounding of every fp8 GEMM of the forward and the backward before it: worst 10.8 % on the H200, the
    CPU run of the tiny model ~1e-2); the step must differ from bf16's."""
    from tnlora.ops.fp8 import CUDA_MIN_CAPABILITY
    from tnlora.train.lora_fused import set_base_fp8

    if torch.cuda.get_device_capability() < CUDA_MIN_CAPABILITY:
        pytest.skip("fp8 tensor cores need compute capability 8.9 or later")

    def make(kind: str) -> torch.nn.Module:
        model = lora_model(0.1, device="cuda", dtype=torch.bfloat16, impl="fla", **GEOMETRY_1B)
        adapted = sum(isinstance(m, FusedLoraLinear) for m in model.modules())
        assert set_base_fp8(model, kind == "triton") == (adapted if kind == "triton" else 0)
        return model

    results = kernel_and_torch_steps(make, None, compiled)
    assert results[0][0] != results[1][0]
    assert_bf16_step_matches(results[0], results[1], f"fp8 base, compiled {compiled}", tolerance=0.15)


@pytest.mark.parametrize("compiled", [False, True])
def test_the_trimmed_last_layer_matches_every_position(monkeypatch, compiled: bool) -> None:
    """``trim_last_layer`` on CUDA (fla, the model of 1B's width with three layers, half the positions labelled):
    the step within bf16 tolerance of the one that computes every position; compiled, the trimming layer runs
    eagerly beside the compiled one before it; the trimmed rows padded (a row step of 128 for these 2,000
    positions)."""
    monkeypatch.setattr(modeling, "TRIM_ROW_STEP", 128)
    trims = counted_calls(monkeypatch, modeling.TransnormerDecoderLayer, "forward_kept")

    def make(kind: str) -> torch.nn.Module:
        model = lora_model(device="cuda", dtype=torch.bfloat16, impl="fla", decoder_layers=3,
                           linear_use_lrpe_list=[1, 0, 0], **GEOMETRY_1B)  # fmt: skip
        model.config.trim_last_layer = kind == "triton"
        return model

    def after(kind: str, model: torch.nn.Module) -> None:
        assert len(trims) == (1 if kind == "triton" else 0)
        trims.clear()

    results = kernel_and_torch_steps(make, after, compiled, prepare=half_labelled)
    assert_bf16_step_matches(results[0], results[1], f"trim_last_layer, compiled {compiled}")
