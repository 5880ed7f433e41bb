"""The tnlora command on LLaMA-Factory-shaped YAMLs (tests/fixtures/llamafactory): train, chat, generate,
predict (eval) and export run them unchanged but for the model and the template (LLaMA-Factory's key=value overrides)."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from tnlora.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "llamafactory"
EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
OURS = ["model_name_or_path=tiny", "template=chatml"]  # what is specific to another model


@pytest.fixture
def llamafactory_folder(tmp_path, monkeypatch, one_thread):
    """A working folder laid out as LLaMA-Factory's: the datasets in ./data."""
    shutil.copytree(EXAMPLE_DATA, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    with one_thread():
        yield tmp_path


def test_train_chat_generate_predict_and_export_yamls_run_unchanged(llamafactory_folder, capsys, monkeypatch):
    assert main(["train", str(FIXTURES / "tnl_lora_sft.yaml"), *OURS]) == 0
    err = capsys.readouterr().err
    assert "trust_remote_code: ignored; tnlora never runs a model's remote code" in err
    run = llamafactory_folder / "saves" / "tnl-385m" / "lora" / "sft"
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 21  # 54 train examples (val_size 0.1 of 60) × 3 epochs / 8 accumulated
    assert any("eval_loss" in e for e in state["log_history"])  # eval_strategy: steps, at the end
    assert (run / "loss.png").is_file() and (run / "adapter_model.safetensors").is_file()
    recorded = (run / "tnlora_run.yaml").read_text()
    assert "bf16: true" in recorded and "ddp_timeout: 180000000" in recorded and "template: chatml" in recorded

    infer = str(FIXTURES / "tnl_lora_sft_infer.yaml")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who are you?\n"))
    assert main(["chat", infer, *OURS, "max_new_tokens=8", "do_sample=false"]) == 0
    assert capsys.readouterr().out.startswith("assistant: ")
    (llamafactory_folder / "prompts.txt").write_text("Who are you?\nSay hi.\n")
    assert main(["generate", infer, *OURS, "--prompts", "prompts.txt", "--output", "preds.jsonl",
                 "max_new_tokens=8"]) == 0  # fmt: skip
    assert len((llamafactory_folder / "preds.jsonl").read_text().splitlines()) == 2

    assert main(["eval", str(FIXTURES / "tnl_lora_sft_predict.yaml"), *OURS, "max_new_tokens=4"]) == 0
    predicted = llamafactory_folder / "saves" / "tnl-385m" / "lora" / "predict"
    assert len((predicted / "predictions.jsonl").read_text().splitlines()) == 4  # max_samples: 4
    assert "predict_bleu-4" in json.loads((predicted / "metrics.json").read_text())

    assert main(["export", str(FIXTURES / "tnl_lora_sft_merge.yaml"), *OURS]) == 0
    merged = llamafactory_folder / "output" / "tnl-385m_lora_sft"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer_config.json").is_file()
    # LLaMA-Factory's YAMLs overwrite their output dir: a rerun replaces the earlier run's files only
    assert main(["train", str(FIXTURES / "tnl_lora_sft.yaml"), *OURS, "num_train_epochs=1"]) == 0
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 7
