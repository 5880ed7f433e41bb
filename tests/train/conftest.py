"""Helpers for the end-to-end training tests (tiny preset, the quickstart sample data)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from train_helpers import tiny_argv

from tnlora.config import RunConfig, load_run_config


@pytest.fixture(autouse=True)
def _single_thread(one_thread) -> Iterator[None]:
    with one_thread():
        yield


def tiny_config(output_dir: Path, *overrides: str) -> RunConfig:
    """A fast run on the tiny preset; ``overrides`` are ``--key value`` pairs."""
    return load_run_config(None, tiny_argv(output_dir, *overrides))


@pytest.fixture(scope="session")
def make_config():
    """``make_config(output_dir, "--key", "value", …)`` → a fast tiny-preset RunConfig."""
    return tiny_config
