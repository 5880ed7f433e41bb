"""The whole flow on a directory in the official OpenNLPLab layout (Baichuan tokenizer, bf16 .bin weights,
no model_type): train a LoRA adapter, reload it, merge it into a checkpoint AutoModelForCausalLM loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tnlora.cli import main
from tnlora.config import load_run_config
from tnlora.infer.loading import load_for_inference
from tnlora.train.run import train

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"

# Their references are CPU tensors: a GPU machine runs them as a CPU-only one (conftest.cpu_only).
pytestmark = pytest.mark.usefixtures("cpu_only")


def test_official_checkpoint_train_reload_merge(official_dir, tmp_path):
    import tnlora  # noqa: F401

    cfg = load_run_config(None, [
        "--model_name_or_path", str(official_dir), "--dataset", "quickstart_chat", "--dataset_dir", str(DATA),
        "--template", "chatml", "--cutoff_len", "128", "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", "2", "--max_steps", "3", "--learning_rate", "1e-2",
        "--report_to", "none", "--plot_loss", "false",
    ])  # fmt: skip
    result = train(cfg)
    assert result.global_step == 3
    loaded = load_for_inference(None, tmp_path / "out")
    assert loaded.base == str(official_dir) and type(loaded.tokenizer).__name__ != "ByteTokenizer"
    ids = torch.tensor([loaded.tokenizer("<|im_start|>user\nHi<|im_end|>\n", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = loaded.model(input_ids=ids).logits.float()
    assert main(["merge", "--adapter", str(tmp_path / "out"), "--output", str(tmp_path / "merged")]) == 0
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 (safe_open is not iterable); the base dtype
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits.float()
    # the merged weights were rounded to the base's bf16
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
