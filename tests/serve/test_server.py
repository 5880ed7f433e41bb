"""serve/server.py and the `tnlora serve` verb: one-line refusals before anything loads, and the real command
serving on 127.0.0.1 until interrupted."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tnlora.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_missing_extra_is_one_line_naming_it(monkeypatch, capsys) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", "--model", "tiny"]) == 2
    assert capsys.readouterr().err == "error: tnlora serve needs the serve extra: pip install 'tnlora[serve]'\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max_batch", "0"], "error: --max_batch: must be >= 1, got 0\n"),
        (["--max_sessions", "-1"], "error: --max_sessions: must be >= 0, got -1\n"),
        (["--temperature", "-1"], "error: --temperature: must be in [0, 2], got -1.0\n"),
        (["--top_p", "2"], "error: --top_p: must be in [0, 1], got 2.0\n"),
        (["--port", "0"], "error: --port: must be >= 1, got 0\n"),
        (["--defer_steps", "1"], "error: --defer_steps: must be 0 (every step) or at least 2, got 1\n"),
        (["--fused_projections", "--max_batch", "65"],
         "error: --fused_projections: at most 64 slots (--max_batch), got 65\n"),
    ],
)
def test_bad_options_are_refused_before_the_model_loads(args, message, capsys) -> None:
    pytest.importorskip("fastapi", reason="needs the serve extra")
    assert main(["serve", "--model", "no-such-model", *args]) == 2
    assert capsys.readouterr().err == message


def test_the_key_comes_from_the_option_else_the_environment(monkeypatch) -> None:
    from tnlora.cli import build_parser
    from tnlora.serve.server import options_from_args

    parser = build_parser()
    monkeypatch.setenv("TNLORA_API_KEY", "from-env")
    config, options = options_from_args(parser.parse_args(["serve", "--adapter", "runs/my-run", "--max_batch", "3"]))
    assert config.api_key == "from-env" and config.model_name == "my-run" and options.max_batch == 3
    config, _ = options_from_args(parser.parse_args(["serve", "--model", "tiny", "--api_key", "given"]))
    assert config.api_key == "given" and config.model_name == "tiny"
    monkeypatch.delenv("TNLORA_API_KEY")
    assert options_from_args(parser.parse_args(["serve", "--model", "tiny"]))[0].api_key is None


@pytest.mark.parametrize(
    ("args", "fused"),
    [
        (["--max_batch", "1"], True),
        (["--max_batch", "2"], False),
        (["--max_batch", "3"], False),
        (["--max_batch", "4"], True),
        ([], True),  # the default 16 slots
        (["--max_batch", "32"], True),
        (["--max_batch", "33"], False),
        (["--max_batch", "65"], False),  # unset: no refusal above 64 slots, the layer forwards
        (["--max_batch", "16", "--no-fused_projections"], False),
        (["--max_batch", "2", "--fused_projections"], True),
    ],
)
def test_fused_projections_default_to_the_slot_counts_generate_fuses(args, fused) -> None:
    """Unset, ``--fused_projections`` follows greedy generate()'s rule on the slot count (1, or 4 to 32 slots);
    given, it is what was given."""
    from tnlora.cli import build_parser
    from tnlora.serve.server import options_from_args

    _, options = options_from_args(build_parser().parse_args(["serve", "--model", "tiny", *args]))
    assert options.fused_projections is fused


def test_tnlora_serve_answers_on_127_0_0_1_until_interrupted(tmp_path) -> None:
    pytest.importorskip("uvicorn", reason="needs the serve extra")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TNLORA_API_KEY", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "tnlora.cli", "serve", "--model", "tiny", "--device", "cpu", "--port", str(port),
         "--served_model_name", "cli-tiny", "--max_batch", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    health = json.load(response)
                break
            except OSError:
                assert process.poll() is None, process.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "tnlora serve did not come up"
                time.sleep(0.2)
        assert health["model"] == "cli-tiny" and health["slots"]["total"] == 2
        # greedy: the reply is the same every run (a sampled one can end early at a drawn end-of-text token)
        body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["usage"]["completion_tokens"] == 3
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, err[-2000:]
    assert "Traceback" not in err


@pytest.mark.parametrize(("args", "steps"), [([], 4), (["--max_batch", "8"], 0), (["--max_batch", "32"], 4),
                                             (["--defer_steps", "0"], 0), (["--max_batch", "8", "--defer_steps", "3"], 3)])
def test_state_writes_are_deferred_by_default_from_16_slots(args, steps) -> None:
    from tnlora.cli import build_parser
    from tnlora.serve.server import options_from_args

    _, options = options_from_args(build_parser().parse_args(["serve", "--model", "tiny", *args]))
    assert options.defer_steps == steps
