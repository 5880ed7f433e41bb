"""tnlora.model.configuration: official files accepted unchanged, presets, aliases, validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixture_files import OFFICIAL_CONFIGS as MODELS
from fixture_files import needs_shared
from tnlora.errors import ConfigError
from tnlora.model import PRESETS, TransnormerConfig, config_from_preset


@pytest.fixture
def shared_models() -> Path:
    return needs_shared("models")


@pytest.mark.parametrize("size", ["385M", "1B", "7B"])
def test_committed_official_files_equal_the_shared_ones(shared_models: Path, size: str) -> None:
    shared = shared_models / size
    names = sorted(p.name for p in (MODELS / size).iterdir())
    assert names == ["config.json", "generation_config.json", "special_tokens_map.json", "tokenizer_config.json"]
    for name in names:
        assert (MODELS / size / name).read_bytes() == (shared / name).read_bytes(), name


@pytest.mark.parametrize("size", ["385M", "1B", "7B"])
def test_official_config_files_load_unchanged(size: str) -> None:
    raw = json.loads((MODELS / size / "config.json").read_text())
    config = TransnormerConfig.from_pretrained(MODELS / size)
    for key, value in raw.items():
        if key == "torch_dtype":
            assert str(config.dtype) == f"torch.{value}"
        else:
            assert getattr(config, key) == value, key
    assert config.tie_word_embeddings is True
    assert config.num_hidden_layers == raw["decoder_layers"]
    assert config.hidden_size == raw["decoder_embed_dim"]
    assert config.num_attention_heads == raw["decoder_attention_heads"]


def test_config_round_trip_keeps_official_extras(tmp_path: Path) -> None:
    config = TransnormerConfig.from_pretrained(MODELS / "7B")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "transnormer"
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_transnormer.TransnormerForCausalLM"
    assert saved["model_max_length"] == 8192
    again = TransnormerConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()


def test_num_hidden_layers_alias_writes_through() -> None:
    config = config_from_preset("tiny")
    config.num_hidden_layers = 3
    assert config.decoder_layers == 3


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("tiny", (384, 64, 64, 2, 2, 128)),
        ("385M", (64000, 1024, 1024, 24, 8, 2816)),
        ("1B", (64000, 2048, 2048, 16, 16, 5632)),
        ("7B", (64000, 4096, 4096, 30, 32, 11008)),
    ],
)
def test_presets_have_the_documented_sizes(name: str, sizes: tuple[int, ...]) -> None:
    config = config_from_preset(name)
    got = (
        config.vocab_size,
        config.decoder_embed_dim,
        config.hidden_dim,
        config.decoder_layers,
        config.decoder_attention_heads,
        config.glu_dim,
    )
    assert got == sizes
    assert config.linear_use_lrpe_list == [1] + [0] * (config.decoder_layers - 1)
    assert set(PRESETS) == {"tiny", "385M", "1B", "7B"}


def test_presets_match_official_files_on_every_architecture_field() -> None:
    for size in ("385M", "1B", "7B"):
        official = TransnormerConfig.from_pretrained(MODELS / size).to_dict()
        preset = config_from_preset(size).to_dict()
        for key in (
            "vocab_size",
            "decoder_embed_dim",
            "decoder_layers",
            "decoder_attention_heads",
            "no_scale_embedding",
            "linear_use_lrpe_list",
            "hidden_dim",
            "linear_act_fun",
            "glu_dim",
            "bias",
            "norm_type",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
        ):
            assert preset[key] == official[key], (size, key)


@pytest.mark.parametrize(("size", "scale"), [("385M", 32.0), ("1B", 45.254834), ("7B", 1.0)])
def test_embed_scale_follows_no_scale_embedding(size: str, scale: float) -> None:
    assert config_from_preset(size).embed_scale == pytest.approx(scale, rel=1e-7)


def test_preset_overrides_apply() -> None:
    config = config_from_preset(
        "tiny", lrpe_angle_dtype="model", decoder_layers=3, linear_use_lrpe_list=[1, 0, 0]
    )
    assert config.lrpe_angle_dtype == "model" and config.decoder_layers == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_dim": 65}, "multiple of decoder_attention_heads"),
        ({"linear_use_lrpe_list": [1]}, "one per layer"),
        ({"norm_type": "layernorm"}, "not supported"),
        ({"lrpe_angle_dtype": "bf16"}, "lrpe_angle_dtype"),
        ({"lightning_impl": "flash"}, "lightning_impl"),
        ({"norm_kernel": "cuda"}, "norm_kernel"),
    ],
)
def test_bad_values_are_refused_where_they_enter(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_preset("tiny", **overrides)


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="tiny, 385M, 1B, 7B"):
        config_from_preset("15B")
