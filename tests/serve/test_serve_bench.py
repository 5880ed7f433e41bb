"""benchmarks/serve_bench.py on the CPU, shrunk: it starts a server, drives streaming openai clients and prints
a throughput row and the sessions table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_serve_bench_prints_a_row_per_client_count_and_the_sessions_table() -> None:
    for module in ("fastapi", "uvicorn", "openai"):
        pytest.importorskip(module, reason="needs the serve and test extras")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve_bench.py"), "--model", "tiny", "--device", "cpu",
         "--clients", "2", "--requests", "2", "--max_tokens", "8", "--prompt_tokens", "16", "--turns", "3",
         "--reply_tokens", "4", "--client_procs", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    # 2 clients x 2 requests x 8 tokens (ignore_eos: every request runs to its limit).
    row = re.search(r"^\| 2 \| 2 \| 4 \| 32 \| [\d.]+ \| [\d,]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| "
                    r"(\d+) \| [\d.]+ \| (\d+) \| [\d.]+ \| [\d.]+ \|$", out.stdout, re.M)  # fmt: skip
    assert row, out.stdout
    # Each client's 2 requests run one after the other, 7 decode steps each after the prompt's token; each
    # request is read in some prefill round, the two clients' first ones perhaps together.
    steps, rounds = int(row[1]), int(row[2])
    assert steps >= 14 and 2 <= rounds <= 4, out.stdout
    rows = re.findall(r"^\| (with|without) \|.*\| (\d+) \| (\d+) \|$", out.stdout, re.M)
    assert [r[0] for r in rows] == ["with", "without"], out.stdout
    (_, prompt_with, continued), (_, prompt_without, none) = rows
    assert prompt_with == prompt_without and int(continued) > 0 and none == "0"
