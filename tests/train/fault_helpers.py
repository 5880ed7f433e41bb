"""Fault injection for the training tests, all on the test's side (tnlora has no switch for it): ``tnlora train``
run in a forked child process, that child killed with SIGKILL at a chosen moment or sent SIGINT.

A child is forked from the test process, which has torch, transformers and tnlora imported already: a fresh
interpreter spends seconds importing them, and a fault test starts a dozen runs. Everything the child changes
(hooks on torch.save, open, os.replace, …) dies with it.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

EXIT_CRASHED = 99  # the child raised something that is not tnlora's one-line error


def run_in_child(target: Callable[[], int], log: Path, timeout: float = 120.0) -> int:
    """Run ``target()`` in a forked child with its stdout and stderr in ``log``; its exit status, or minus the
    signal that ended it (-9: SIGKILL)."""
    return wait_child(start_child(target, log), log, timeout)


def start_child(target: Callable[[], int], log: Path) -> int:
    """Fork a child that runs ``target()`` with its stdout and stderr in ``log`` and exits with its status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = EXIT_CRASHED
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
            signal.signal(signal.SIGINT, signal.default_int_handler)
            code = target()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait_child(pid: int, log: Path, timeout: float = 120.0) -> int:
    """The child's exit status, or minus the signal that ended it; killed (and an error) past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the child ran past {timeout} s; its output: {log.read_text()[-2000:]}")
        time.sleep(0.01)


def cli_train(argv: list[str], callbacks: list[Any]) -> int:
    """``tnlora train ARGV`` (the real command: its messages and exit status) with extra Trainer callbacks."""
    import tnlora.train.run as run
    from tnlora.cli import main

    original = run.train
    run.train = lambda cfg, callbacks_=None: original(cfg, callbacks=callbacks)  # only in this child
    return main(["train", *argv])


class KillSwitch:
    """Counts the moments of a run: every file opened for writing (and again at its close, before the data is
    flushed), every ``torch.save`` / safetensors save (before and after), every rename and tree removal, and the
    Trainer's step phases. At moment ``at`` (counting only the moments inside checkpoint saves, while the
    staging folder exists, when ``inside_saves``) it notes what the moment was in ``notes`` and SIGKILLs its
    process; with ``at`` None it only counts, and ``phases`` records the count at the start and end of
    training."""

    def __init__(self, at: int | None, notes: Path, output_dir: Path, inside_saves: bool = False):
        self.at, self.notes, self.output_dir, self.inside_saves = at, notes, output_dir, inside_saves
        self.count = 0
        self.saving = 0  # moments inside checkpoint saves
        self.phases: dict[str, int] = {}

    def moment(self, what: str) -> None:
        self.count += 1
        saving = (self.output_dir / ".tnlora-saving").is_dir()
        self.saving += saving
        if (self.saving if self.inside_saves else self.count) != self.at or (self.inside_saves and not saving):
            return
        line = json.dumps({"moment": self.count, "what": what, "inside_a_checkpoint_save": saving}) + "\n"
        fd = os.open(self.notes, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, line.encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        """Wrap the writers (in this process only: call it in the child)."""
        import peft.peft_model
        import safetensors.torch

        switch = self
        real_open = builtins.open

        class Closing:
            """A file opened for writing whose close is a moment (killed there, its data was never flushed)."""

            def __init__(self, f, name: str):
                self._f, self._name = f, name

            def close(self):
                switch.moment(f"close {self._name}")
                return self._f.close()

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.close()

            def __iter__(self):
                return iter(self._f)

            def __getattr__(self, attr):
                return getattr(self._f, attr)

        def opening(file, mode="r", *args, **kwargs):
            writing = isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
            if not writing:
                return real_open(file, mode, *args, **kwargs)
            name = Path(file).name
            self.moment(f"open {name}")
            return Closing(real_open(file, mode, *args, **kwargs), name)

        builtins.open = io.open = opening

        def around(what: str, function: Callable, name_of: Callable[..., str]):
            def wrapper(*args, **kwargs):
                name = name_of(*args, **kwargs)
                switch.moment(f"{what} {name} (before)")
                result = function(*args, **kwargs)
                switch.moment(f"{what} {name} (after)")
                return result

            return wrapper

        torch.save = around("torch.save", torch.save, lambda obj, f, *a, **k: Path(str(f)).name)
        peft.peft_model.safe_save_file = around(
            "safetensors", peft.peft_model.safe_save_file, lambda tensors, f, *a, **k: Path(str(f)).name
        )
        safetensors.torch.save_file = around(
            "safetensors", safetensors.torch.save_file, lambda tensors, f, *a, **k: Path(str(f)).name
        )
        os.replace = around("replace", os.replace, lambda a, b, *x, **k: f"{Path(a).name} → {Path(b).name}")
        os.rename = around("rename", os.rename, lambda a, b, *x, **k: f"{Path(a).name} → {Path(b).name}")
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            switch.moment(f"rmtree {Path(path).name}")
            return real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree

    def callback(self) -> TrainerCallback:
        switch = self

        class Moments(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                switch.phases["train_begin"] = switch.count
                switch.moment("train begin")

            def on_step_begin(self, args, state, control, **kwargs):
                switch.moment(f"step {state.global_step + 1} begins")

            def on_substep_end(self, args, state, control, **kwargs):
                switch.moment(f"step {state.global_step + 1}: a micro-batch done")

            def on_step_end(self, args, state, control, **kwargs):
                switch.moment(f"step {state.global_step} ends")

            def on_save(self, args, state, control, **kwargs):
                switch.moment(f"checkpoint-{state.global_step} saved")

            def on_train_end(self, args, state, control, **kwargs):
                switch.phases["train_end"] = switch.count
                switch.moment("train end")

        return Moments()


def train_with_kill_switch(
    argv: list[str], at: int | None, notes: Path, output_dir: Path, inside_saves: bool = False
) -> int:
    """The child's work: ``tnlora train ARGV`` killed at moment ``at`` (see ``KillSwitch``); a run that ends
    writes its moment counts to ``notes`` (as JSON: phases, the total and those inside checkpoint saves)."""
    switch = KillSwitch(at, notes, output_dir, inside_saves)
    switch.install()
    code = cli_train(argv, [switch.callback()])
    if at is None:
        notes.write_text(json.dumps({**switch.phases, "total": switch.count, "saving": switch.saving}))
    return code
