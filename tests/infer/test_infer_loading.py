"""tnlora.infer.loading: the base, tokenizer and template come from the run dir; checkpoints load too; a run
loads from any folder, moved or not, or says in one line which recorded path is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tnlora.cli import main
from tnlora.errors import TnloraError
from tnlora.infer.loading import load_for_inference, run_dir_of

EXAMPLE_DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
HUB_REPO = "OpenNLPLab/TransNormerLLM-7B"

PROBE = torch.tensor([[3 + b for b in b"<|im_start|>user\nHi<|im_end|>\n"]])

# Their references are CPU tensors: a GPU machine runs them as a CPU-only one (conftest.cpu_only).
pytestmark = pytest.mark.usefixtures("cpu_only")


def test_a_checkpoint_loads_with_its_run_files(adapter_dir):
    checkpoint = adapter_dir / "checkpoint-30"
    assert run_dir_of(checkpoint) == adapter_dir
    final, ckpt = load_for_inference(None, adapter_dir), load_for_inference(None, checkpoint)
    assert ckpt.base == "tiny" and ckpt.template == final.template
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(input_ids=PROBE).logits, final.model(input_ids=PROBE).logits)


def test_overrides_and_refusals(adapter_dir, capsys):
    loaded = load_for_inference("tiny", adapter_dir, template="alpaca", system="S")
    assert loaded.template.name == "alpaca" and loaded.system == "S"
    assert "differs from the template the adapter was trained with" in capsys.readouterr().err
    with pytest.raises(TnloraError, match="--template: unknown template 'nope'"):
        load_for_inference("tiny", None, template="nope")
    with pytest.raises(TnloraError, match="--model: required"):
        load_for_inference(None, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(TnloraError, match="--device: CUDA requested but no GPU is available"):
        load_for_inference("tiny", None, device="cuda")


def _train_from(cwd: Path, monkeypatch, *args: str):
    from tnlora.config import load_run_config
    from tnlora.train.run import train

    monkeypatch.chdir(cwd)
    cfg = load_run_config(None, [
        "--dataset", "quickstart_chat", "--dataset_dir", "data", "--template", "chatml", "--cutoff_len", "256",
        "--max_steps", "1", "--report_to", "none", "--plot_loss", "false", *args,
    ])  # fmt: skip
    return train(cfg)


def test_a_run_records_absolute_paths_and_loads_from_anywhere_even_moved(
    tiny_official_dir, tmp_path, monkeypatch, capsys
):
    work = tmp_path / "work"
    shutil.copytree(EXAMPLE_DATA, work / "data")
    shutil.copytree(tiny_official_dir, work / "models" / "tnl")
    _train_from(work, monkeypatch, "--model_name_or_path", "./models/tnl", "--output_dir", "runs/a")
    run = (work / "runs" / "a" / "tnlora_run.yaml").read_text()
    assert f"model_name_or_path: {work / 'models' / 'tnl'}\n" in run and f"dataset_dir: {work / 'data'}\n" in run
    assert f"output_dir: {work / 'runs' / 'a'}\n" in run
    monkeypatch.chdir(tmp_path)  # another folder
    moved = tmp_path / "elsewhere" / "a"
    shutil.move(work / "runs" / "a", moved)
    assert load_for_inference(None, moved).base == str(work / "models" / "tnl")
    # The base model moved too: one line naming the record and the option that overrides it.
    shutil.move(work / "models" / "tnl", tmp_path / "tnl")
    with pytest.raises(TnloraError) as info:
        load_for_inference(None, moved)
    assert str(info.value) == (
        f"--model: the base model {work / 'models' / 'tnl'} recorded in {moved / 'tnlora_run.yaml'} "
        "(model_name_or_path) is not there; pass --model with its directory, Hub id or preset"
    )
    capsys.readouterr()
    assert main(["eval", "--adapter", str(moved), "--dataset", str(EXAMPLE_DATA / "quickstart_chat.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("error: --model: the base model")
    assert load_for_inference(str(tmp_path / "tnl"), moved).base == str(tmp_path / "tnl")


def test_a_run_on_a_hub_id_records_the_id_and_reloads_through_the_cache(hub_cache, tmp_path, monkeypatch):
    shutil.copytree(EXAMPLE_DATA, tmp_path / "data")
    result = _train_from(tmp_path, monkeypatch, "--model_name_or_path", HUB_REPO, "--output_dir", "out")
    assert result.config.model_name_or_path == HUB_REPO
    assert f"model_name_or_path: {HUB_REPO}\n" in (tmp_path / "out" / "tnlora_run.yaml").read_text()
    assert f"base_model: {HUB_REPO}" in (tmp_path / "out" / "README.md").read_text()
    loaded = load_for_inference(None, tmp_path / "out")
    assert loaded.base == HUB_REPO
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=PROBE).logits, result.model.eval()(input_ids=PROBE).logits)
    # The command line, with huggingface_hub's own variables (set by the fixture) and nothing else.
    proc = subprocess.run(
        [sys.executable, "-m", "tnlora", "chat", "--model", HUB_REPO, "--max_new_tokens", "3", "--do_sample", "false"],
        input="Hi\n", capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("assistant: ")
