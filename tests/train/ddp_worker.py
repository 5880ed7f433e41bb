"""One rank of a ``tnlora train`` run under torchrun, with test-side hooks (tnlora has no switch for them):

    torchrun --nproc_per_node 2 tests/train/ddp_worker.py [--record FILE] [--exit_after_save N]
        [--fail_rank R --fail_step N] :: CONFIG.yaml --key value ...

``--record FILE``: every file this rank writes, replaces or removes under the run's output_dir is appended to
FILE.rank<R> (one relative path a line). ``--exit_after_save N``: rank 0 dies (exit 1, no cleanup) right after
checkpoint-N is complete, as a crash would leave it. ``--fail_rank R --fail_step N``: rank R raises a DataError
at the start of step N.
"""

from __future__ import annotations

import argparse
import builtins
import os
import shutil
import sys
from pathlib import Path

from transformers import TrainerCallback


def record_writes(log: Path, root: Path) -> None:
    """Wrap the ways a file gets written, replaced or removed; paths under ``root`` go to ``log``."""
    import safetensors.torch
    import torch

    root = root.resolve()

    def note(path) -> None:
        if not isinstance(path, (str, os.PathLike)):
            return
        target = Path(path).resolve()
        if target == root or root in target.parents:
            with open_original(log, "a", encoding="utf-8") as handle:
                handle.write(f"{target.relative_to(root)}\n")

    open_original = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            note(file)
        return open_original(file, mode, *args, **kwargs)

    def wrap(owner, name, position=0):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if len(args) > position:
                note(args[position])
            return original(*args, **kwargs)

        setattr(owner, name, wrapped)

    builtins.open = open_
    for name in ("replace", "rename", "remove", "unlink"):
        wrap(os, name, 1 if name in ("replace", "rename") else 0)
    wrap(shutil, "rmtree")
    wrap(torch, "save", 1)
    wrap(safetensors.torch, "save_file", 1)


class ExitAfterSave(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step and state.is_world_process_zero:
            sys.stderr.flush()
            os._exit(1)


class FailAtStep(TrainerCallback):
    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_step_begin(self, args, state, control, **kwargs):
        if args.process_index == self.rank and state.global_step + 1 == self.step:
            from tnlora.errors import DataError

            raise DataError("train.json", "an injected bad record", record=self.step)


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--record")
    parser.add_argument("--output_dir_for_record")
    parser.add_argument("--exit_after_save", type=int)
    parser.add_argument("--fail_rank", type=int)
    parser.add_argument("--fail_step", type=int)
    split = sys.argv.index("::")  # (torchrun drops a "--")
    args = parser.parse_args(sys.argv[1:split])
    argv = sys.argv[split + 1 :]
    rank = int(os.environ.get("RANK", "0"))
    if args.record:
        record_writes(Path(f"{args.record}.rank{rank}"), Path(args.output_dir_for_record))
    callbacks = []
    if args.exit_after_save is not None:
        callbacks.append(ExitAfterSave(args.exit_after_save))
    if args.fail_rank is not None:
        callbacks.append(FailAtStep(args.fail_rank, args.fail_step))

    import tnlora.train.run as run
    from tnlora.cli import main as cli_main

    original = run.train
    run.train = lambda cfg, callbacks_=None: original(cfg, callbacks=callbacks)  # only in this process
    return cli_main(["train", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
