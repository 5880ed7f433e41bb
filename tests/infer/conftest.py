"""A tiny trained adapter shared by the inference tests (trained once per session, ~5 s)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tnlora.config import load_run_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SYSTEM = "Answer briefly."


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: the tiny model gains nothing from two, and two threads per process on a
    shared 2-core machine (other test processes) slow each step down by up to 10×."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def system_prompt() -> str:
    """The system prompt the shared adapter was trained with."""
    return SYSTEM


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory) -> Path:
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
    with one_torch_thread():
        train(cfg)
    return out
