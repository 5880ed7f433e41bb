"""Live servers for the serve tests: uvicorn on 127.0.0.1 (a free port) in a thread of the test process, around
an engine on the tiny preset with a short `tnlora train` adapter (chatml, a custom system prompt)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import SYSTEM, LiveServer, start_server

from tnl_helpers import train_tiny_adapter


@pytest.fixture(autouse=True)
def _single_thread(one_thread) -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def serve_adapter(tmp_path_factory, one_thread) -> Path:
    """Output dir of a 30-step LoRA run on the tiny preset (chatml, system prompt SYSTEM)."""
    with one_thread():
        return train_tiny_adapter(tmp_path_factory.mktemp("serve-adapter") / "out", SYSTEM)


@pytest.fixture(scope="session")
def loaded(serve_adapter):
    """The adapter loaded as `tnlora serve` loads it (merged, CPU, fp32)."""
    from tnlora.infer.loading import load_for_inference

    return load_for_inference(None, serve_adapter, dtype="float32", device="cpu", merge_adapter=True)


@pytest.fixture(scope="session")
def live(loaded) -> Iterator[LiveServer]:
    """The shared server: the trained adapter, 4 slots, no API key."""
    server = start_server(loaded)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def start():
    """``start(loaded, **options)`` → a LiveServer (the caller stops it)."""
    return start_server
