"""tnlora.model.checkpoint: official dirs become loadable through the Auto classes, without remote code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tnlora.cli import main
from tnlora.errors import TnloraError
from tnlora.model import TransnormerConfig, TransnormerForCausalLM
from tnlora.model.checkpoint import add_model_type


@pytest.fixture
def official_copy(official_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "TransNormerLLM-1B"
    shutil.copytree(official_dir, out)
    return out


def test_official_dir_without_model_type_is_refused_by_auto_config(official_copy: Path) -> None:
    # The published config.json has auto_map but no model_type: transformers asks for remote code.
    assert "model_type" not in json.loads((official_copy / "config.json").read_text())
    with pytest.raises(ValueError):
        AutoConfig.from_pretrained(official_copy, trust_remote_code=False)


def test_prepared_dir_loads_natively_through_auto_classes(official_copy: Path) -> None:
    before = json.loads((official_copy / "config.json").read_text())
    assert main(["prepare", str(official_copy)]) == 0
    after = json.loads((official_copy / "config.json").read_text())
    assert after == {"model_type": "transnormer", **before}  # every official field kept, auto_map included

    config = AutoConfig.from_pretrained(official_copy)
    assert isinstance(config, TransnormerConfig)
    model = AutoModelForCausalLM.from_pretrained(official_copy, dtype=torch.float32)
    assert isinstance(model, TransnormerForCausalLM)
    direct = TransnormerForCausalLM.from_pretrained(official_copy, dtype=torch.float32)
    ids = torch.tensor([[5, 900, 31, 7]])
    torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=0)
    tokenizer = AutoTokenizer.from_pretrained(official_copy)
    assert tokenizer.is_fast and tokenizer.pad_token_id == 0


def test_prepare_is_idempotent_and_refuses_other_models(official_copy: Path, tmp_path: Path) -> None:
    assert add_model_type(official_copy) is True
    assert add_model_type(official_copy) is False
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(TnloraError, match="model_type is 'llama'"):
        add_model_type(other)
    with pytest.raises(TnloraError, match="no such file"):
        add_model_type(tmp_path / "missing")
