"""Skipping peft's input casts in mixed precision changes nothing under autocast: same loss, same gradients."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from train_helpers import batch, lora_model, loss_and_grads

from tnlora.config import RunConfig
from tnlora.model import TransnormerForCausalLM, config_from_preset
from tnlora.train.lora import set_adapter_input_casts
from tnlora.train.run import prepare_for_training


def test_autocast_step_is_identical_without_adapter_input_casts():
    inputs = batch(40)
    model = lora_model(dtype=torch.bfloat16)  # bf16 base, fp32 adapters, as tnlora train keeps them
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_cast, grads_cast = loss_and_grads(model, inputs)
        assert set_adapter_input_casts(model, False) == 10  # 5 linear layers in each of the tiny model's 2 layers
        loss_plain, grads_plain = loss_and_grads(model, inputs)
    assert loss_plain == loss_cast
    assert grads_plain.keys() == grads_cast.keys() and len(grads_plain) == 20
    for name, grad in grads_cast.items():
        assert grads_plain[name].dtype == torch.float32
        torch.testing.assert_close(grads_plain[name], grad, rtol=0, atol=0, msg=name)


def _tuner_flags(model) -> set[bool]:
    return {m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer)}


def test_prepare_for_training_skips_casts_only_in_mixed_precision():
    for bf16, expected in [(True, {False}), (False, {True})]:
        cfg = RunConfig(model_name_or_path="tiny", dataset="d", output_dir="o", bf16=bf16, torch_compile=False)
        model = prepare_for_training(TransnormerForCausalLM(config_from_preset("tiny")), cfg)
        assert _tuner_flags(model) == expected
