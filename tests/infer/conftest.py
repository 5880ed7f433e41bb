"""A tiny trained adapter shared by the inference tests (trained once per session, ~5 s)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tnlora.config import load_run_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SYSTEM = "Answer briefly."




@pytest.fixture(autouse=True)
def _single_thread(one_thread) -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def system_prompt() -> str:
    """The system prompt the shared adapter was trained with."""
    return SYSTEM


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, one_thread) -> Path:
    """Output dir of a 30-step LoRA run on the tiny preset (chatml, a custom system prompt)."""
    from tnlora.train.run import train

    out = tmp_path_factory.mktemp("adapter") / "out"
    cfg = load_run_config(
        None,
        [
            "--model_name_or_path", "tiny",
            "--dataset", "quickstart_alpaca,quickstart_chat",
            "--dataset_dir", str(EXAMPLES / "data"),
            "--template", "chatml",
            "--system", SYSTEM,
            "--cutoff_len", "256",
            "--output_dir", str(out),
            "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-2",
            "--max_steps", "30",
            "--save_steps", "1000",
            "--report_to", "none",
            "--plot_loss", "false",
            "--seed", "0",
        ],
    )  # fmt: skip
    with one_thread():
        train(cfg)
    return out
