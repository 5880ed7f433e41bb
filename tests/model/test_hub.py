"""tnlora.model.hub: presets in any letter case, local directories made absolute, Hub ids through
huggingface_hub's cache (offline here, against a cache the test lays out), the cache never edited."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tnlora.errors import ConfigError
from tnlora.model import load_model
from tnlora.model.hub import is_hub_id, load_model_config, model_dir, model_source
from tnlora.model.tokenizer import ByteTokenizer, load_tokenizer

HUB_REPO = "OpenNLPLab/TransNormerLLM-7B"
PROBE = torch.tensor([[3 + b for b in b"<|im_start|>user\nHi<|im_end|>\n"]])


def _state(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time (to show nothing in the cache changed)."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip


def test_presets_in_any_case_and_local_directories(tiny_official_dir, tmp_path, monkeypatch):
    assert [model_source(n) for n in ("tiny", "TINY", "7b", "385m")] == ["tiny", "tiny", "7B", "385M"]
    monkeypatch.chdir(tiny_official_dir.parent)
    assert model_source(tiny_official_dir.name) == str(tiny_official_dir)
    assert model_dir("./" + tiny_official_dir.name) == str(tiny_official_dir)
    assert not is_hub_id(tiny_official_dir.name) and is_hub_id(HUB_REPO) and not is_hub_id("../x/y")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^model_name_or_path: .*empty has no config.json"):
        model_source(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"^--model: '\.\./gone' is neither a preset \(tiny, 385M, 1B, 7B\)"):
        model_source("../gone", key="--model")


def test_a_hub_id_resolves_through_the_cache_and_the_cache_is_never_edited(hub_cache):
    before = _state(hub_cache.parents[2])
    assert model_source(HUB_REPO) == HUB_REPO
    assert Path(model_dir(HUB_REPO)).resolve() == hub_cache.resolve()
    # config.json has no model_type (as the official one): read in memory as a TransNormerLLM config
    assert "model_type" not in (hub_cache / "config.json").read_text()
    assert load_model_config(HUB_REPO).decoder_layers == 2
    model = load_model(HUB_REPO)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=PROBE).logits, load_model("tiny")(input_ids=PROBE).logits)
    assert isinstance(load_tokenizer(HUB_REPO), ByteTokenizer)
    assert _state(hub_cache.parents[2]) == before


def test_a_hub_id_missing_from_the_offline_cache_is_one_line(hub_cache):
    with pytest.raises(ConfigError) as info:
        model_source("OpenNLPLab/TransNormerLLM-1B")
    message = str(info.value)
    assert message.startswith(
        f"model_name_or_path: OpenNLPLab/TransNormerLLM-1B is not in the Hugging Face cache ({os.environ['HF_HUB_CACHE']})"
        " and HF_HUB_OFFLINE is set"
    )
    assert "\n" not in message
