"""Live servers for the serve tests: uvicorn on 127.0.0.1 (a free port) in a thread of the test process, around
an engine on the tiny preset with a short `tnlora train` adapter (chatml, a custom system prompt)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import SYSTEM, LiveServer, start_server

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def _single_thread(one_thread) -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def serve_adapter(tmp_path_factory, one_thread) -> Path:
    """Output dir of a 30-step LoRA run on the tiny preset (chatml, system prompt SYSTEM)."""
    from tnlora.config import load_run_config
    from tnlora.train.run import train

    out = tmp_path_factory.mktemp("serve-adapter") / "out"
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
