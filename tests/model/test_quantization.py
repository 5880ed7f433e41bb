"""tnlora.model.quantization on the CPU (bitsandbytes' CPU backend; skipped where bitsandbytes is not installed,
as in CI): which layers are quantized, that a quantized model computes with exactly its dequantized weights,
that checkpoints, presets and meta-built models quantize alike. Training on a quantized base is a GPU matter
(tests/train/test_qlora_gpu.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from tnlora.errors import ConfigError
from tnlora.model import TransnormerForCausalLM, config_from_preset
from tnlora.model.loading import load_model
from tnlora.model.quantization import (
    Quantization,
    dequantize_linears,
    is_quantized,
    logical_numel,
    quantize_linears,
)

needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed (pip install 'tnlora[qlora]')"
)
LINEARS = ("qkvu_proj", "out_proj", "l1", "l2", "l3")


def _ids() -> torch.Tensor:
    return torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(3))


def _logits(model: nn.Module) -> torch.Tensor:
    # train mode: bitsandbytes' CPU backend repacks 4-bit weights for its inference kernel on the first eval
    # forward, after which they no longer dequantize (the GPU has no such step)
    model.train()
    with torch.no_grad():
        return model(_ids()).logits.float()


def test_the_quantization_keys_become_a_bitsandbytes_config():
    config = Quantization(4, "fp4", double_quant=False).bnb_config()
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == (True, "fp4", False)
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and config.llm_int8_skip_modules == ["lm_head"]
    assert Quantization(8).bnb_config().load_in_8bit
    assert Quantization(4).describe() == "4-bit nf4, double quantization"
    with pytest.raises(ConfigError, match=r"^quantization_bit: 4 or 8, got 2$"):
        Quantization(2)


def test_without_bitsandbytes_nothing_counts_as_quantized(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    assert not is_quantized(load_model("tiny"))


def test_quantizing_without_bitsandbytes_is_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    with torch.device("meta"):
        model = TransnormerForCausalLM(config_from_preset("tiny"))
    with pytest.raises(ConfigError, match=r"^quantization_bit: a quantized base needs bitsandbytes, which is not "
                                          r"installed"):  # fmt: skip
        quantize_linears(model, Quantization(4), "cpu", init_std=0.02)


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_only_the_decoder_linear_layers_are_quantized(bits):
    import bitsandbytes as bnb

    model = load_model("tiny", device="cpu", quantization=Quantization(bits))
    layer_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    quantized = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, layer_type)}
    assert quantized == set(LINEARS) and is_quantized(model)
    assert sum(isinstance(m, layer_type) for m in model.modules()) == 5 * model.config.decoder_layers
    # the embedding, and the head tied to it, stay bf16; the decay buffers fp32
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(layer.token_mixer.log_decay.dtype == torch.float32 for layer in model.model.layers)
    # marked as transformers marks a model it quantized: peft and the Trainer read these
    assert getattr(model, f"is_loaded_in_{bits}bit") and model.hf_quantizer is not None
    assert getattr(model.config.quantization_config, f"load_in_{bits}bit") and model.quantization_method == "bitsandbytes"


@needs_bnb
@pytest.mark.parametrize("quantization", [Quantization(4), Quantization(4, "fp4", False), Quantization(8)])
def test_a_quantized_model_computes_with_its_dequantized_weights(quantization):
    """The reference: the same model with each quantized layer replaced by an nn.Linear holding the weight
    bitsandbytes dequantizes; 4-bit differs from the bf16 model by the quantization error, not by anything else."""
    quantized = load_model("tiny", device="cpu", quantization=quantization)
    reference = dequantize_linears(load_model("tiny", device="cpu", quantization=quantization), "cpu", torch.bfloat16)
    assert not is_quantized(reference) and not hasattr(reference, "hf_quantizer")
    assert type(reference.model.layers[0].token_mixer.qkvu_proj) is nn.Linear
    got, want = _logits(quantized), _logits(reference)
    assert torch.allclose(got, want, rtol=0, atol=1e-6 * want.abs().max())
    bf16 = _logits(load_model("tiny", dtype=torch.bfloat16))
    error = ((got - bf16).norm() / bf16.norm()).item()
    assert 1e-3 < error < (0.1 if quantization.bits == 4 else 0.02)


@needs_bnb
def test_a_checkpoint_loads_quantized_exactly_as_the_preset_is_quantized(tmp_path):
    load_model("tiny", dtype=torch.bfloat16).save_pretrained(tmp_path)
    from_dir = load_model(str(tmp_path), device="cpu", quantization=Quantization(4))
    from_preset = load_model("tiny", device="cpu", quantization=Quantization(4))
    assert from_dir.is_loaded_in_4bit and from_dir.lm_head.weight is from_dir.model.embed_tokens.weight
    assert torch.equal(_logits(from_dir), _logits(from_preset))


@needs_bnb
def test_a_model_built_on_the_meta_device_is_quantized_one_layer_at_a_time():
    with torch.device("meta"):
        model = TransnormerForCausalLM(config_from_preset("tiny"))
    quantize_linears(model.to(torch.bfloat16), Quantization(4), "cpu", init_std=0.02)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight[0], torch.zeros(64, dtype=torch.bfloat16))  # pad row
    reference = load_model("tiny")
    assert torch.equal(model.model.layers[0].token_mixer.log_decay, reference.model.layers[0].token_mixer.log_decay)
    # random weights: the loss of a uniform guess over the 384-token vocabulary, ln 384 = 5.95
    model.train()
    ids = _ids()
    assert abs(model(ids, labels=ids).loss.item() - 5.95) < 0.1
    with pytest.raises(ValueError, match="needs init_std"):
        with torch.device("meta"):
            again = TransnormerForCausalLM(config_from_preset("tiny"))
        quantize_linears(again, Quantization(4), "cpu")


@needs_bnb
def test_a_4bit_weight_counts_as_the_parameters_it_stands_for():
    from tnlora.train.lora import count_parameters

    quantized = load_model("tiny", device="cpu", quantization=Quantization(4))
    assert count_parameters(quantized)[1] == count_parameters(load_model("tiny"))[1] == 114_752
    weight = quantized.model.layers[0].channel_mixer.l1.weight
    assert logical_numel(weight) == 2 * weight.numel() == 128 * 64
