"""Helpers for the end-to-end training tests (tiny preset, the quickstart sample data)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tnlora.config import RunConfig, load_run_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def _single_thread(one_thread) -> Iterator[None]:
    with one_thread():
        yield


def tiny_config(output_dir: Path, *overrides: str) -> RunConfig:
    """A fast run on the tiny preset; ``overrides`` are ``--key value`` pairs."""
    base = [
        "--model_name_or_path", "tiny",
        "--dataset", "quickstart_alpaca,quickstart_chat",
        "--dataset_dir", str(EXAMPLES / "data"),
        "--template", "chatml",
        "--cutoff_len", "256",
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2",
        "--lora_rank", "8",
        "--logging_steps", "2",
        "--save_steps", "1000",
        "--report_to", "none",
        "--plot_loss", "false",
        "--seed", "0",
        "--dataset_cache_dir", str(output_dir.parent / f"{output_dir.name}-token-cache"),
    ]  # fmt: skip
    return load_run_config(None, [*base, *overrides])


@pytest.fixture(scope="session")
def make_config():
    """``make_config(output_dir, "--key", "value", …)`` → a fast tiny-preset RunConfig."""
    return tiny_config
