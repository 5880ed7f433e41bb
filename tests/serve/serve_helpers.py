"""What the serve tests share: the served model's name and system prompt, and a live server on 127.0.0.1 (a
free port) in a thread of the test process (uvicorn around an engine)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

SYSTEM = "Answer briefly."
MODEL_NAME = "tiny-chat"


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
