"""``tnlora.train.lora_fused``: peft's LoRA layer with the fused training forward, given to peft through its
custom-layer hook. The tiny model's training step equals peft's own layers' in float64 (dropout included);
evaluation, saving and loading stay peft's."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from train_helpers import batch, lora_model, loss_and_grads

from tnlora.config import RunConfig
from tnlora.model import TransnormerForCausalLM, config_from_preset
from tnlora.ops import lora as lora_op
from tnlora.train.lora import apply_finetuning
from tnlora.train.lora_fused import FusedLoraLinear


def _layers(model: torch.nn.Module) -> list[PeftLoraLinear]:
    return [m for m in model.modules() if isinstance(m, PeftLoraLinear)]


def test_the_default_wraps_every_target_in_the_fused_layer_and_peft_keeps_its_own() -> None:
    fused, plain = lora_model(lora_kernel="fused"), lora_model(lora_kernel="peft")
    assert len(_layers(fused)) == 10 and all(type(m) is FusedLoraLinear for m in _layers(fused))
    assert len(_layers(plain)) == 10 and all(type(m) is PeftLoraLinear for m in _layers(plain))


def test_a_quantized_base_keeps_peft_layers() -> None:
    """bitsandbytes' layers subclass nn.Linear: with quantization_bit the fused layer is not registered."""
    cfg = RunConfig(model_name_or_path="tiny", dataset="d", output_dir="o", quantization_bit=4)
    model = apply_finetuning(TransnormerForCausalLM(config_from_preset("tiny")), cfg)
    assert _layers(model) and all(type(m) is PeftLoraLinear for m in _layers(model))


def test_training_step_equals_peft_layers_in_float64() -> None:
    inputs = batch(40)
    for dropout in (0.0, 0.2):
        results = []
        for kernel in ("fused", "peft"):
            model = lora_model(dropout, dtype=torch.float64, lora_kernel=kernel)
            torch.manual_seed(5)  # the same dropout draws, layer by layer
            results.append(loss_and_grads(model, inputs))
        (loss, grads), (want_loss, want_grads) = results
        assert abs(loss - want_loss) < 1e-12 * abs(want_loss)
        assert grads.keys() == want_grads.keys() and len(grads) == 20
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """One entry per adapted layer a call of the fused operations computes: 1 for a layer's own, 2 for a pair's."""
    calls: list[int] = []

    def counting(real, layers):
        def call(*args, **kwargs):
            calls.append(layers)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr("tnlora.train.lora_fused.lora_linear", counting(lora_op.lora_linear, 1))
    monkeypatch.setattr("tnlora.train.lora_fused.lora_linear_pair", counting(lora_op.lora_linear_pair, 2))
    return calls


def test_the_fused_forward_runs_in_training_only(fused_calls) -> None:
    calls = fused_calls
    model = lora_model()
    inputs = batch(24)
    loss_and_grads(model, inputs)
    assert sum(calls) == 10  # every adapted layer of the step
    assert calls.count(2) == 2  # each GLU's l1 and l2 as one operation
    calls.clear()
    with torch.no_grad():
        model(**inputs)
    model.eval()
    model(**inputs)
    assert calls == []


def test_the_glu_pair_equals_each_layer_on_its_own_in_float64(fused_calls) -> None:
    """The GLU's l1 and l2 as one operation (FusedLoraLinear.paired, the default) against each layer's own fused
    operation: the same loss and LoRA gradients; without dropout only (with it each layer runs its own)."""
    inputs = batch(40)
    results = []
    for paired in (True, False):
        model = lora_model(dtype=torch.float64)
        for layer in _layers(model):
            layer.paired = paired
        fused_calls.clear()
        results.append(loss_and_grads(model, inputs))
        assert fused_calls.count(2) == (2 if paired else 0) and sum(fused_calls) == 10
    (loss, grads), (want_loss, want_grads) = results
    assert abs(loss - want_loss) < 1e-12 * abs(want_loss)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    fused_calls.clear()
    loss_and_grads(lora_model(0.2, dtype=torch.float64), inputs)
    assert fused_calls == [1] * 10


def test_zero3_partitioned_weights_keep_peft_forward(fused_calls) -> None:
    """A base weight DeepSpeed ZeRO-3 partitions (tagged ds_id) is gathered around the base layer's forward
    only: such layers run peft's forward, which calls it."""
    calls = fused_calls
    model = lora_model()
    layers = _layers(model)
    layers[0].get_base_layer().weight.ds_id = 0
    loss_and_grads(model, batch(24))
    assert sum(calls) == len(layers) - 1


def test_saved_adapter_loads_into_plain_peft(tmp_path) -> None:
    model = lora_model(lora_kernel="fused").eval()
    inputs = batch(24)
    with torch.no_grad():
        want = model(input_ids=inputs["input_ids"]).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "custom" not in json.dumps(config).lower()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # lora_model's base weights
        base = TransnormerForCausalLM(config_from_preset("tiny"))
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert all(type(m) is PeftLoraLinear for m in _layers(loaded))
    with torch.no_grad():
        got = loaded(input_ids=inputs["input_ids"]).logits
    torch.testing.assert_close(got, want)
