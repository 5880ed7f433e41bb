"""tnlora.train.lora on a small module with TransNormerLLM's module names (no model code needed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tnlora.config import load_run_config
from tnlora.errors import ConfigError
from tnlora.train.lora import (
    apply_finetuning,
    count_parameters,
    describe_trainable,
    linear_layer_names,
    resolve_lora_targets,
)

TNL_LINEARS = ["qkvu_proj", "out_proj", "l1", "l2", "l3"]


class TokenMixer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.qkvu_proj = nn.Linear(d, 4 * d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)


class ChannelMixer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.l1 = nn.Linear(d, 2 * d, bias=False)
        self.l2 = nn.Linear(d, 2 * d, bias=False)
        self.l3 = nn.Linear(2 * d, d, bias=False)


class Layer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.token_mixer = TokenMixer(d)
        self.channel_mixer = ChannelMixer(d)

    def forward(self, x):
        q, _, _, u = self.token_mixer.qkvu_proj(x).chunk(4, -1)
        x = x + self.token_mixer.out_proj(q * u)
        return x + self.channel_mixer.l3(self.channel_mixer.l1(x) * self.channel_mixer.l2(x))


class Inner(nn.Module):
    def __init__(self, d: int, n: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(16, d)
        self.layers = nn.ModuleList(Layer(d) for _ in range(n))


class ToyTNL(nn.Module):
    """Same qualified names as TransnormerForCausalLM (model.layers.i.token_mixer.qkvu_proj, …, lm_head)."""

    def __init__(self, d: int = 8, n: int = 3):
        super().__init__()
        self.model = Inner(d, n)
        self.lm_head = nn.Linear(d, 16, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids):
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(x)

    def prepare_inputs_for_generation(self, *args, **kwargs):  # peft's CAUSAL_LM wrapper looks it up
        raise NotImplementedError


def cfg(*overrides: str):
    return load_run_config(None, ["--model_name_or_path", "tiny", "--dataset", "d", "--output_dir", "o", *overrides])


def test_all_means_every_linear_layer_but_the_head():
    assert linear_layer_names(ToyTNL()) == TNL_LINEARS
    assert resolve_lora_targets(ToyTNL(), "all") == TNL_LINEARS
    assert resolve_lora_targets(ToyTNL(), "ALL") == TNL_LINEARS


def test_comma_list_and_qualified_suffixes_are_accepted():
    assert resolve_lora_targets(ToyTNL(), "qkvu_proj, l3") == ["qkvu_proj", "l3"]
    assert resolve_lora_targets(ToyTNL(), ["token_mixer.out_proj"]) == ["token_mixer.out_proj"]


def test_a_target_matching_nothing_lists_the_linear_layers():
    with pytest.raises(ConfigError) as info:
        resolve_lora_targets(ToyTNL(), "q_proj,v_proj,l1")
    message = str(info.value)
    assert message.startswith("lora_target: 'q_proj', 'v_proj' matches no linear layer")
    assert "qkvu_proj" in message and "fuses q, k, v" in message
    assert message.endswith("its linear layers are: qkvu_proj, out_proj, l1, l2, l3 (or use 'all')")
    # a module that exists but is not linear is refused too
    with pytest.raises(ConfigError, match="'token_mixer' matches no linear layer"):
        resolve_lora_targets(ToyTNL(), "token_mixer")
    with pytest.raises(ConfigError, match="'lm_head' matches no linear layer"):
        resolve_lora_targets(ToyTNL(), "lm_head")


def test_lora_wraps_only_the_targets_and_starts_as_identity():
    torch.manual_seed(0)
    base = ToyTNL()
    ids = torch.tensor([[1, 2, 3, 4]])
    before = base(ids).detach().clone()
    _, total_before = count_parameters(base)
    model = apply_finetuning(base, cfg("--lora_rank", "2", "--lora_target", "l1,l2"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"l1", "l2"}
    # B starts at zero: the wrapped model computes what the base did
    torch.testing.assert_close(model.get_base_model()(ids), before)
    trainable, total = count_parameters(model)
    assert trainable == 3 * 2 * (8 * 2 + 2 * 16)  # 3 layers × (l1, l2) × (A: 8→2, B: 2→16)
    assert total == total_before + trainable
    assert describe_trainable(model).startswith(f"trainable params: {trainable:,} || all params: {total:,}")


def test_lora_alpha_defaults_to_twice_the_rank_and_dora_rslora_pass_through():
    model = apply_finetuning(ToyTNL(), cfg("--lora_rank", "4", "--use_rslora", "--use_dora"))
    peft_cfg = model.peft_config["default"]
    assert peft_cfg.r == 4 and peft_cfg.lora_alpha == 8
    assert peft_cfg.use_rslora and peft_cfg.use_dora
    assert set(peft_cfg.target_modules) == set(TNL_LINEARS)


def test_additional_target_must_exist():
    with pytest.raises(ConfigError, match="additional_target: 'embeddings' matches no module"):
        apply_finetuning(ToyTNL(), cfg("--additional_target", "embeddings"))


def test_full_trains_everything_and_freeze_trains_the_last_layers():
    full = apply_finetuning(ToyTNL(), cfg("--finetuning_type", "full"))
    assert all(p.requires_grad for p in full.parameters())
    frozen = apply_finetuning(ToyTNL(n=3), cfg("--finetuning_type", "freeze", "--freeze_trainable_layers", "1"))
    trainable = {n.split(".")[2] for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable == {"2"}
    first = apply_finetuning(ToyTNL(n=3), cfg("--finetuning_type", "freeze", "--freeze_trainable_layers", "-2"))
    assert {n.split(".")[2] for n, p in first.named_parameters() if p.requires_grad} == {"0", "1"}
    with pytest.raises(ConfigError, match="freeze_trainable_layers: 5 but the model has only 3 layers"):
        apply_finetuning(ToyTNL(n=3), cfg("--finetuning_type", "freeze", "--freeze_trainable_layers", "5"))


def test_tied_parameters_count_once():
    model = ToyTNL(d=8, n=1)
    _, total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())  # parameters() already dedups
    assert total == 16 * 8 + (8 * 32 + 8 * 8) + 3 * (8 * 16)
