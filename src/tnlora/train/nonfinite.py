"""The run's answer to a NaN or infinite loss or gradient norm (``nan_policy``).

Each optimizer step is checked once, just before the optimizer would apply it: the step's loss (the sum of its
micro-batch losses, added up on the device) and the gradient norm the Trainer computes for clipping anyway.

- ``stop`` (default): the run stops with one line naming the first bad step and the last good checkpoint.
  On a GPU the check reads nothing back per step: the verdict is copied to pinned host memory behind the step
  and read once the GPU got there (a step or two later); every checkpoint save, and the end of training, waits
  for the verdicts first, so nothing after a bad step is ever saved (the steps between it and the stop update
  weights that are then thrown away). On the CPU the verdict is read at once (no device to wait for).
- ``skip``: a bad step's gradients are dropped before the optimizer runs, so no weight and no optimizer moment
  changes (the learning-rate schedule still advances; the step's loss is left out of the logged mean); the run
  stops once more than ``nan_skip_limit`` steps were skipped. Deciding before the update needs the verdict at
  once: one device→host read per optimizer step on a GPU. The skipped steps are kept in the checkpoints'
  trainer state, so a resumed run counts on.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from tnlora.errors import NonFiniteLoss


class NonFiniteGuard(TrainerCallback, ExportableState):
    """Checks each optimizer step for a non-finite loss or gradient norm; ``trainer.trainer_class()`` calls
    ``add_loss`` for every micro-batch and ``check_step`` before every optimizer step."""

    def __init__(self, policy: str = "stop", limit: int = 10, output_dir: str | None = None):
        self.policy, self.limit, self.output_dir = policy, limit, output_dir
        self.skipped: list[int] = []  # the steps whose batches were skipped
        self._loss: torch.Tensor | None = None  # this step's micro-batch losses, summed where they are
        self._logged_loss: torch.Tensor | None = None  # the Trainer's running loss before this step
        self._pending: deque[tuple[int, torch.Tensor, Any]] = deque()  # (step, pinned verdict, CUDA event)
        self._spare: list[torch.Tensor] = []  # pinned verdict buffers whose event has passed

    # --- ExportableState: the skipped steps travel with each checkpoint's trainer_state.json
    def state(self) -> dict[str, Any]:
        return {
            "args": {"policy": self.policy, "limit": self.limit, "output_dir": self.output_dir},
            "attributes": {"skipped": list(self.skipped)},
        }

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict):
            self.skipped = [int(s) for s in saved.get("attributes", {}).get("skipped", [])]
        self._loss, self._pending = None, deque()

    def on_train_end(self, args, state, control, **kwargs):
        self.drain()  # the final save comes next

    # --- called by the Trainer subclass
    def add_loss(self, loss: torch.Tensor, trainer) -> None:
        """Add a micro-batch's (detached) loss to this step's sum, on its device (no read-back)."""
        if self._loss is None:
            self._loss = loss.detach().float().clone()
            if self.policy == "skip":
                self._logged_loss = trainer._tr_loss.detach().clone()
        else:
            self._loss += loss.detach().float()

    def check_step(self, trainer, model, grad_norm) -> None:
        """Before the optimizer step: judge this step (stop, skip, or queue the verdict on a GPU)."""
        loss, self._loss = self._loss, None
        if loss is None:
            return
        step = trainer.state.global_step + 1  # the step being taken, as it will be logged
        norm = gradient_norm(grad_norm, loss.device)
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        if self.policy == "stop" and finite.is_cuda:
            self._poll()
            self._queue(step, finite)
            return
        if not bool(finite):  # CPU: free; skip on a GPU: the one read per optimizer step
            if self.policy == "skip":
                self._skip(trainer, model, step, loss, norm)
            else:
                self._stop(step, loss, norm)

    def drain(self) -> None:
        """Wait for every queued verdict (before a save and at the end); stop at the first bad step."""
        while self._pending:
            step, verdict, event = self._pending.popleft()
            event.synchronize()
            self._spare.append(verdict)
            if not bool(verdict):
                self._pending.clear()
                self._stop(step, None, None)

    # --- internals
    def _queue(self, step: int, finite: torch.Tensor) -> None:
        verdict = self._spare.pop() if self._spare else torch.empty((), dtype=torch.bool, pin_memory=True)
        verdict.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((step, verdict, event))

    def _poll(self) -> None:
        """Read the verdicts the GPU has already produced (an event query does not wait)."""
        while self._pending and self._pending[0][2].query():
            step, verdict, _ = self._pending.popleft()
            self._spare.append(verdict)
            if not bool(verdict):
                self._pending.clear()
                self._stop(step, None, None)

    def _skip(self, trainer, model, step: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        # No gradient, no update: torch's optimizers leave a parameter without .grad, and its moments, as is.
        for p in model.parameters():
            p.grad = None
        if self._logged_loss is not None and getattr(trainer, "_tr_loss", None) is not None:
            trainer._tr_loss.copy_(self._logged_loss)
        self.skipped.append(step)
        print(
            f"step {step}: a non-finite loss or gradient norm{_values(loss, norm)}; its batch skipped "
            f"(nan_policy: skip; {len(self.skipped)} skipped, nan_skip_limit {self.limit})",
            file=sys.stderr,
            flush=True,
        )
        if len(self.skipped) > self.limit:
            raise NonFiniteLoss(
                f"nan_skip_limit: {len(self.skipped)} steps had a non-finite loss or gradient norm (steps "
                f"{_steps(self.skipped)}), more than nan_skip_limit {self.limit}; training stopped at step "
                f"{step}. {self._last_good()}"
            )

    def _stop(self, step: int, loss: torch.Tensor | None, norm: torch.Tensor | None) -> None:
        raise NonFiniteLoss(
            f"nan_policy: step {step} had a non-finite loss or gradient norm{_values(loss, norm)}; training "
            f"stopped there (nan_policy: stop). {self._last_good(step)} nan_policy: skip would skip such "
            "batches; a lower learning_rate may avoid them."
        )

    def _last_good(self, before: int | None = None) -> str:
        from tnlora.train.checkpoints import checkpoint_step, complete_checkpoints

        found = complete_checkpoints(self.output_dir) if self.output_dir else []
        if before is not None:
            found = [p for p in found if (checkpoint_step(p) or 0) < before]
        if not found:
            return "No checkpoint was saved before it."
        return f"The last good checkpoint is {found[-1]}."


def _values(loss: torch.Tensor | None, norm: torch.Tensor | None) -> str:
    parts = [f"{name} {float(v):g}" for name, v in (("loss", loss), ("gradient norm", norm)) if v is not None]
    return f" ({', '.join(parts)})" if parts else ""


def _steps(steps: list[int], shown: int = 5) -> str:
    text = ", ".join(str(s) for s in steps[:shown])
    return text + (f" and {len(steps) - shown} more" if len(steps) > shown else "")


def gradient_norm(grad_norm: Any, device: torch.device) -> torch.Tensor:
    """The step's gradient norm as a plain fp32 tensor on ``device``: FSDP2 returns it as a replicated
    DTensor, which the GPU guard's pinned verdict cannot be copied from."""
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    return torch.as_tensor(grad_norm, device=device, dtype=torch.float32)
