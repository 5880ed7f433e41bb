"""Loading and saving: official layouts (.bin with both tied keys, single and sharded), safetensors, Auto-class
registration and load_model."""

from __future__ import annotations

import builtins
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from tnlora.model import TransnormerConfig, TransnormerForCausalLM, load_model
from tnlora.model.modeling import layer_log_decay

IDS = torch.randint(3, 64000, (2, 21), generator=torch.Generator().manual_seed(0))


@contextmanager
def transformers_warnings() -> Iterator[list[str]]:
    """Collect the warnings transformers logs (its logger does not propagate to pytest's caplog)."""
    records: list[str] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _load_fp32(path: Path) -> TransnormerForCausalLM:
    return TransnormerForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_official_dir_loads_both_tied_keys_cleanly(official_dir: Path) -> None:
    with transformers_warnings() as warnings:
        model, info = TransnormerForCausalLM.from_pretrained(official_dir, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    assert not [w for w in warnings if "missing" in w.lower() or "unexpected" in w.lower()]
    assert model.dtype == torch.bfloat16  # the config's torch_dtype
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    stored = torch.load(official_dir / "pytorch_model.bin", weights_only=True)
    assert set(stored) == set(model.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(value, stored[name]), name


def test_decay_buffers_hold_real_values_after_from_pretrained(official_dir: Path) -> None:
    model = TransnormerForCausalLM.from_pretrained(official_dir)
    for i, layer in enumerate(model.model.layers):
        decay = layer.token_mixer.log_decay
        assert decay.device.type == "cpu" and decay.dtype == torch.float32
        assert torch.equal(decay, layer_log_decay(2, i, 2))


def test_safetensors_round_trip_gives_identical_logits(official_dir: Path, tmp_path: Path) -> None:
    model = _load_fp32(official_dir)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    again = _load_fp32(tmp_path)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_sharded_bin_with_index_loads_like_the_single_file(official_dir: Path, tmp_path: Path) -> None:
    state = torch.load(official_dir / "pytorch_model.bin", weights_only=True)
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[:6], "pytorch_model-00002-of-00002.bin": names[6:]}
    assert "lm_head.weight" in shards["pytorch_model-00002-of-00002.bin"]
    weight_map = {}
    for file, keys in shards.items():
        torch.save({k: state[k].clone() for k in keys}, tmp_path / file)  # separate copies of the tied pair
        weight_map.update(dict.fromkeys(keys, file))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    shutil.copy(official_dir / "config.json", tmp_path / "config.json")

    model, info = TransnormerForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model(IDS).logits, _load_fp32(official_dir)(IDS).logits)


class _NotATensor:
    """A pickled object that weights-only loading must refuse."""


def test_bin_files_are_loaded_weights_only(official_dir: Path, tmp_path: Path) -> None:
    state = torch.load(official_dir / "pytorch_model.bin", weights_only=True)
    state["decoder.version"] = _NotATensor()
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(official_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(Exception, match=r"(?i)weights.only|unsupported global"):
        TransnormerForCausalLM.from_pretrained(tmp_path)


def test_auto_classes_load_saved_dirs_without_remote_code(
    official_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_prompt(*args: object) -> str:
        raise AssertionError("transformers asked whether to trust remote code")

    monkeypatch.setattr(builtins, "input", no_prompt)
    _load_fp32(official_dir).save_pretrained(tmp_path)
    assert "auto_map" in json.loads((tmp_path / "config.json").read_text())  # kept, still no prompt
    assert type(AutoConfig.from_pretrained(tmp_path)) is TransnormerConfig
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is TransnormerForCausalLM
    # The official dir has no model_type; with our config class named, the Auto class works too.
    config = TransnormerConfig.from_pretrained(official_dir)
    assert type(AutoModelForCausalLM.from_pretrained(official_dir, config=config)) is TransnormerForCausalLM


def test_autoconfig_cannot_resolve_official_dirs_that_lack_model_type(official_dir: Path) -> None:
    # Documented limitation of transformers 5.17: without "model_type" AutoConfig can only run the remote
    # code named in auto_map. tnlora.load_model / TransnormerForCausalLM.from_pretrained are the routes.
    assert "model_type" not in json.loads((official_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="custom code"):
        AutoConfig.from_pretrained(official_dir, trust_remote_code=False)


def test_load_model_builds_presets_deterministically() -> None:
    first, second = load_model("tiny"), load_model("tiny")
    assert not first.training
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    config = first.config
    assert (config.vocab_size, config.decoder_embed_dim, config.hidden_dim) == (384, 64, 64)
    assert (config.decoder_layers, config.decoder_attention_heads, config.glu_dim) == (2, 2, 128)
    assert config.linear_use_lrpe_list == [1, 0]
    rng_before = torch.random.get_rng_state()
    half = load_model("tiny", dtype=torch.bfloat16, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert half.dtype == torch.bfloat16
    assert half.model.layers[0].token_mixer.log_decay.dtype == torch.float32
    assert torch.equal(half.lm_head.weight, first.lm_head.weight.to(torch.bfloat16))


def test_load_model_reads_official_dirs(official_dir: Path) -> None:
    model = load_model(str(official_dir))
    assert isinstance(model, TransnormerForCausalLM) and not model.training
    assert model.dtype == torch.bfloat16
    assert load_model(str(official_dir), dtype=torch.float32).dtype == torch.float32
    out = model.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_resizing_the_vocabulary_keeps_the_tie(official_dir: Path) -> None:
    model = _load_fp32(official_dir)
    model.resize_token_embeddings(64008)
    assert model.lm_head.weight.shape == (64008, 64)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model(torch.tensor([[64005, 7]])).logits.shape == (1, 2, 64008)
