"""A tiny trained adapter shared by the inference tests (trained once per session, ~5 s)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tnl_helpers import train_tiny_adapter

SYSTEM = "Answer briefly."


@pytest.fixture(autouse=True)
def _single_thread(one_thread) -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture
def cpu_only(monkeypatch) -> None:
    """This machine as a CPU-only one: what CI and a user's laptop are. Tests that compare a loaded model with
    CPU tensors, or check what such a machine refuses, use it so that a GPU machine runs them the same way
    (``load_for_inference`` would otherwise put the model on the GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def system_prompt() -> str:
    """The system prompt the shared adapter was trained with."""
    return SYSTEM


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, one_thread) -> Path:
    """Output dir of a 30-step LoRA run on the tiny preset (chatml, a custom system prompt)."""
    with one_thread():
        return train_tiny_adapter(tmp_path_factory.mktemp("adapter") / "out", SYSTEM)
