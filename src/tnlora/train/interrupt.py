"""Ctrl-C while training: the first asks for a checkpoint at the end of the current optimizer step and a clean
stop; a second stops at once. Either way ``--resume_from_checkpoint true`` continues the run (a save cut short
by the second one is an incomplete checkpoint, skipped in favour of the last complete one).

The handler is installed only around ``trainer.train()`` (in the main thread) and the previous one restored
after, so Ctrl-C while the data is read or the model loads still stops at once.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from transformers import TrainerCallback

from tnlora.errors import RunInterrupted

FIRST_INTERRUPT = "Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again stops at once)"


class StopOnInterrupt(TrainerCallback):
    """Once ``requested``, asks the Trainer at the next step end to save a checkpoint and stop."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None  # the step whose end saved the checkpoint

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested and self.stopped_at is None:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


@contextlib.contextmanager
def stop_cleanly_on_interrupt(stop: StopOnInterrupt) -> Iterator[None]:
    """SIGINT sets ``stop.requested`` (the first time) or raises ``RunInterrupted`` (the second time)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    previous = signal.getsignal(signal.SIGINT)
    if (
        previous is signal.SIG_IGN
    ):  # a run started to ignore Ctrl-C (nohup, background jobs) keeps ignoring it
        yield
        return

    def handler(signum, frame) -> None:
        if stop.requested:
            raise RunInterrupted(
                "interrupted again: stopped at once; --resume_from_checkpoint true resumes from the last "
                "complete checkpoint"
            )
        stop.requested = True
        print(f"\n{FIRST_INTERRUPT}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
