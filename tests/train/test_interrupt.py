"""tnlora.train.interrupt: a real SIGINT to a training process; the first saves a checkpoint at the end of the
step and stops cleanly (exit 130, one line saying where), a second stops at once (exit 130, no traceback); either
way ``--resume_from_checkpoint true`` ends at the adapter of an uninterrupted run."""

from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path

import torch
from fault_helpers import cli_train, start_child, wait_child
from safetensors.torch import load_file
from train_helpers import tiny_argv
from transformers import TrainerCallback

from tnlora.train.checkpoints import complete_checkpoints, is_complete
from tnlora.train.run import train

ARGS = ("--max_steps", "6", "--save_steps", "2")
FIRST = "Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again stops at once)"


class Rendezvous(TrainerCallback):
    """At the end of step ``step``: one byte to the test on ``ready``, then wait for one on ``go`` (so the test's
    signals arrive while the run is inside the training loop)."""

    def __init__(self, step: int, ready: int, go: int):
        self.step, self.ready, self.go = step, ready, go

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.write(self.ready, b"r")
            os.read(self.go, 1)


def _wait_for(fd: int, timeout: float = 60.0) -> None:
    assert select.select([fd], [], [], timeout)[0], "the run never reached the rendezvous"
    os.read(fd, 1)


def _wait_for_line(log: Path, line: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while line not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.01)


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def _resume_equals_uninterrupted(make_config, tmp_path: Path, cut: Path) -> None:
    before = signal.getsignal(signal.SIGINT)
    whole = train(make_config(tmp_path / "whole", *ARGS))
    assert signal.getsignal(signal.SIGINT) is before  # the handler lives only while training
    resumed = train(make_config(cut, *ARGS, "--resume_from_checkpoint", "true"))
    assert resumed.global_step == whole.global_step == 6
    a, b = _adapter(whole.output_dir), _adapter(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _interrupt(tmp_path: Path, step: int, signals: int) -> tuple[int, str, Path]:
    cut, log = tmp_path / "cut", tmp_path / "cut.log"
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    argv = tiny_argv(cut, *ARGS)
    pid = start_child(lambda: cli_train(argv, [Rendezvous(step, ready_w, go_r)]), log)
    _wait_for(ready_r)
    os.kill(pid, signal.SIGINT)
    _wait_for_line(log, FIRST)  # handled: a second signal now is a second Ctrl-C, not the same one
    if signals == 2:
        os.kill(pid, signal.SIGINT)
    os.write(go_w, b"g")
    code = wait_child(pid, log)
    for fd in (ready_r, ready_w, go_r, go_w):
        os.close(fd)
    return code, log.read_text(), cut


def test_first_ctrl_c_saves_at_the_end_of_the_step_and_stops_cleanly(make_config, tmp_path):
    code, log, cut = _interrupt(tmp_path, step=3, signals=1)
    assert code == 130, log[-3000:]
    assert "Traceback" not in log and FIRST in log
    # signalled during step 3's end (after the stop callback looked): checkpoint-4 at the end of the next step
    assert log.rstrip().splitlines()[-1] == (
        f"interrupted at step 4 of 6: saved {cut / 'checkpoint-4'}; --resume_from_checkpoint true continues the run"
    )
    assert [p.name for p in complete_checkpoints(cut)] == ["checkpoint-2", "checkpoint-4"]
    assert not (cut / "adapter_model.safetensors").exists()  # not a finished run
    _resume_equals_uninterrupted(make_config, tmp_path, cut)


def test_second_ctrl_c_stops_at_once_and_the_run_still_resumes(make_config, tmp_path):
    code, log, cut = _interrupt(tmp_path, step=3, signals=2)
    assert code == 130, log[-3000:]
    assert "Traceback" not in log
    assert log.rstrip().splitlines()[-1] == (
        "interrupted again: stopped at once; --resume_from_checkpoint true resumes from the last complete checkpoint"
    )
    assert [p.name for p in complete_checkpoints(cut)] == ["checkpoint-2"] and is_complete(
        cut / "checkpoint-2"
    )
    _resume_equals_uninterrupted(make_config, tmp_path, cut)
