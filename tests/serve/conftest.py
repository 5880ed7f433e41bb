"""Live servers for the serve tests: uvicorn on 127.0.0.1 (a free port) in a thread of the test process, around
an engine on the tiny preset with a short `tnlora train` adapter (chatml, a custom system prompt)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SYSTEM = "Answer briefly."
MODEL_NAME = "tiny-chat"


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


@dataclass
class LiveServer:
    """A running server: its base URL, its context (engine, tokenizer, template) and how to stop it."""

    url: str
    ctx: Any
    server: Any
    thread: threading.Thread

    @property
    def engine(self):
        return self.ctx.engine

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.ctx.engine.shutdown()

    def wait_idle(self, timeout: float = 10.0) -> dict[str, Any]:
        """The engine's stats once no request is active or waiting (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine.stats()
            if stats["slots"]["active"] == 0 and stats["waiting"] == 0:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"engine still busy after {timeout} s: {stats}")
            time.sleep(0.02)


def start_server(loaded_model, *, api_key: str | None = None, max_batch: int = 4, max_sessions: int = 8,
                 host_sessions: int = 8, **config: Any) -> LiveServer:  # fmt: skip
    """Engine + app + uvicorn on 127.0.0.1 at a free port, in a daemon thread; returns once it answers."""
    pytest.importorskip("fastapi", reason="needs the serve extra (pip install 'tnlora[serve]')")
    uvicorn = pytest.importorskip("uvicorn", reason="needs the serve extra (pip install 'tnlora[serve]')")

    from tnlora.serve.app import ServeConfig, create_app
    from tnlora.serve.server import EngineOptions, build_context

    options = EngineOptions(max_batch=max_batch, max_sessions=max_sessions, host_sessions=host_sessions)
    ctx = build_context(loaded_model, ServeConfig(model_name=MODEL_NAME, api_key=api_key, **config), options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            ctx.engine.shutdown()
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    return LiveServer(f"http://127.0.0.1:{port}", ctx, server, thread)


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
