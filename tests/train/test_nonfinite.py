"""tnlora.train.nonfinite: a NaN or infinite loss or gradient norm stops the run in one line naming the step and
the last good checkpoint, nothing after it saved (nan_policy: stop); or its batch is skipped without touching a
weight or an optimizer moment, counted across resumes, and the run stops past nan_skip_limit (nan_policy: skip)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import tiny_argv
from transformers import TrainerCallback

import tnlora.train.run as run
from tnlora.cli import main
from tnlora.errors import NonFiniteLoss
from tnlora.train.checkpoints import complete_checkpoints


class Poison(TrainerCallback):
    """During the steps in ``steps`` (1-based, as logged): the embeddings' output times NaN (a NaN loss, NaN
    gradients) or, with ``grad_only``, one LoRA weight's gradient times inf (a finite loss, an infinite norm)."""

    def __init__(self, steps: set[int], grad_only: bool = False):
        self.steps, self.grad_only, self.handle = steps, grad_only, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 not in self.steps:
            return
        if self.grad_only:
            weight = next(p for n, p in model.named_parameters() if "lora_B" in n)
            self.handle = weight.register_hook(lambda g: g * float("inf"))
        else:
            self.handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o * float("nan"))

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class Snapshots(TrainerCallback):
    """The trainable weights and optimizer moments at each step's start and end."""

    def __init__(self):
        self.begin: dict[int, list[torch.Tensor]] = {}
        self.end: dict[int, list[torch.Tensor]] = {}

    @staticmethod
    def _take(model, optimizer) -> list[torch.Tensor]:
        weights = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        moments = [t.clone() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return weights + moments

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.begin[state.global_step + 1] = self._take(model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.end[state.global_step] = self._take(model, optimizer)


TRAIN = run.train


def _train_cli(monkeypatch, out: Path, callbacks, *extra: str) -> int:
    """``tnlora train`` (the command: its messages and exit status) with extra Trainer callbacks."""
    monkeypatch.setattr(run, "train", lambda cfg, callbacks_=None: TRAIN(cfg, callbacks=callbacks))
    return main(["train", *tiny_argv(out, "--max_steps", "6", "--save_steps", "1", *extra)])


def _error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("grad_only", [False, True], ids=["nan-loss", "inf-grad-norm"])
def test_stop_names_the_step_and_the_last_good_checkpoint_and_saves_nothing_after(
    tmp_path, capsys, monkeypatch, grad_only
):
    out = tmp_path / "o"
    assert _train_cli(monkeypatch, out, [Poison({4}, grad_only)]) == 2
    line = _error(capsys)
    values = r"\(loss \d+\.\d+, gradient norm inf\)" if grad_only else r"\(loss nan, gradient norm nan\)"
    # On a GPU the check reads back only its verdict (no values) a step or two later, so the line names the
    # step without them.
    values = rf"(?: {values})?" if torch.cuda.is_available() else f" {values}"
    assert re.match(f"error: nan_policy: step 4 had a non-finite loss or gradient norm{values}; ", line), line
    assert line.endswith(
        f"training stopped there (nan_policy: stop). The last good checkpoint is {out / 'checkpoint-3'}. "
        "nan_policy: skip would skip such batches; a lower learning_rate may avoid them."
    )
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter
    for checkpoint in complete_checkpoints(out):
        assert all(
            torch.isfinite(t).all() for t in load_file(str(checkpoint / "adapter_model.safetensors")).values()
        )


def test_skip_leaves_weights_and_optimizer_untouched_and_counts_across_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    snaps = Snapshots()
    assert (
        _train_cli(monkeypatch, out, [Poison({4}), snaps], "--nan_policy", "skip", "--nan_skip_limit", "1")
        == 0
    )
    err = capsys.readouterr().err
    assert ("step 4: a non-finite loss or gradient norm (loss nan, gradient norm nan); its batch skipped "
            "(nan_policy: skip; 1 skipped, nan_skip_limit 1)") in err  # fmt: skip
    # the skipped step changed no weight and no moment; the steps around it did
    assert all(torch.equal(a, b) for a, b in zip(snaps.begin[4], snaps.end[4], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(snaps.begin[5], snaps.end[5], strict=True))
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter_model.safetensors")).values())
    a, b = (load_file(str(out / f"checkpoint-{s}" / "adapter_model.safetensors")) for s in (3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["NonFiniteGuard"]["attributes"]["skipped"] == [4]
    # the logged loss of the step with the skipped batch leaves it out
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert all(v == v for v in losses)
    # resumed from step 4, a second bad step is one more than nan_skip_limit 1
    argv = ("--nan_policy", "skip", "--nan_skip_limit", "1", "--max_steps", "8")
    assert (
        _train_cli(
            monkeypatch, out, [Poison({7})], *argv, "--resume_from_checkpoint", str(out / "checkpoint-4")
        )
        == 2
    )
    assert _error(capsys) == (
        "error: nan_skip_limit: 2 steps had a non-finite loss or gradient norm (steps 4, 7), more than "
        f"nan_skip_limit 1; training stopped at step 7. The last good checkpoint is {out / 'checkpoint-6'}."
    )


def test_the_guard_reads_the_verdict_behind_the_gpu_and_drains_before_a_save():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (the CPU reads the verdict at once)")
    from tnlora.train.nonfinite import NonFiniteGuard

    class Trainer:
        class state:
            global_step = 0

    guard = NonFiniteGuard("stop", 10, None)
    trainer = Trainer()
    for step, value in enumerate([1.0, 2.0, float("nan"), 3.0], start=1):
        trainer.state.global_step = step - 1
        guard.add_loss(torch.tensor(value, device="cuda"), trainer)
        try:
            guard.check_step(trainer, torch.nn.Linear(1, 1), torch.tensor(1.0, device="cuda"))
        except NonFiniteLoss as exc:  # a later step's poll found it
            assert "step 3 had" in str(exc) and step > 3
            return
    with pytest.raises(NonFiniteLoss, match="step 3 had a non-finite loss"):
        guard.drain()


def test_a_gradient_norm_given_as_a_dtensor_becomes_a_plain_tensor():
    """FSDP2 hands the step a replicated DTensor norm; the verdict must come out a plain tensor (a GPU guard
    copies it into pinned memory, which a DTensor cannot be copied into)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    from tnlora.train.nonfinite import gradient_norm

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for value in (2.5, float("nan")):
            norm = gradient_norm(DTensor.from_local(torch.tensor(value), mesh, [Replicate()]), torch.device("cpu"))
            assert type(norm) is torch.Tensor and norm.dtype == torch.float32
            assert torch.equal(norm, torch.tensor(value)) or (norm.isnan() and value != value)
        assert type(gradient_norm(1.5, torch.device("cpu"))) is torch.Tensor
    finally:
        dist.destroy_process_group()
