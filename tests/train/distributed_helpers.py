"""What the tests of several processes share: torchrun subprocesses of this checkout, two records of very
different lengths, the tiny-preset arguments and the saved weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import tnlora

SRC = Path(tnlora.__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
RUN_TIMEOUT = 150  # seconds for one torchrun of two processes (imports ~10 s, four tiny steps ~5 s)

def worker_env() -> dict[str, str]:
    """This checkout's sources first; one thread a process (two processes share the CPUs)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def run_processes(args: list[str], timeout: float = RUN_TIMEOUT) -> tuple[int, str, float]:
    """Two processes on this host under torchrun (a free port); their exit status, output and wall time."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=worker_env(), timeout=timeout,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def two_examples(path: Path) -> Path:
    """Two records of very different lengths: a per-token loss over both ranks differs from the mean of the
    ranks' means."""
    records = [
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {
            "instruction": "Describe the sea in a few sentences, please, with some detail about its colour.",
            "input": "",
            "output": "The sea is wide and restless; its colour changes from grey to deep blue with the sky.",
        },
    ]
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def run_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", "tiny", "--dataset", str(data), "--template", "chatml", "--cutoff_len", "256",
        "--packing", "false", "--lora_rank", "4", "--learning_rate", "1e-2", "--max_steps", "4",
        "--logging_steps", "1", "--save_steps", "2", "--report_to", "none", "--seed", "0", "--ddp_timeout", "60",
        "--dataset_cache_dir", str(out.parent / "token-cache"), "--output_dir", str(out), *extra,
    ]  # fmt: skip


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def saved_weights(out: Path) -> dict[str, torch.Tensor]:
    """The run's saved weights: the adapter, or the whole model (one file at the tiny size)."""
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(out / name)
