"""``fp8: true`` in training: the fused LoRA layers' frozen GEMMs in fp8 (``tnlora.ops.fp8``). On the tiny model
the step stays within e4m3's rounding of the plain one (and is not the plain one: the fp8 path runs); the copies
are made when training starts and dropped when it ends; ``tnlora train`` with fp8 trains."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import batch, lora_model, loss_and_grads
from transformers import TrainerCallback

from tnlora.config import resolve_defaults
from tnlora.ops.fp8 import cpu_row_scaled_mm
from tnlora.train.lora_fused import FusedLoraLinear, set_base_fp8
from tnlora.train.run import build_datasets, build_model, build_tokenizer
from tnlora.train.trainer import build_trainer

pytestmark = pytest.mark.skipif(not cpu_row_scaled_mm(), reason="this PyTorch's CPU build has no row-scaled torch._scaled_mm")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_an_fp8_step_is_within_e4m3_rounding_of_the_plain_step() -> None:
    model = lora_model()
    inputs = batch(40)
    want_loss, want_grads = loss_and_grads(model, inputs)
    assert set_base_fp8(model, True) == 10
    assert all(m.fp8_weight is not None for m in model.modules() if isinstance(m, FusedLoraLinear))
    loss, grads = loss_and_grads(model, inputs)
    assert loss != want_loss  # the fp8 GEMMs ran
    assert abs(loss - want_loss) < 1e-2 * abs(want_loss)
    assert grads.keys() == want_grads.keys() and len(grads) == 20
    for name, grad in want_grads.items():
        assert _relative(grads[name], grad) < 0.1, name
    assert set_base_fp8(model, False) == 0
    again, _ = loss_and_grads(model, inputs)
    assert again == want_loss


class Fp8Seen(TrainerCallback):
    """Which fused layers held an fp8 copy at each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(sum(m.fp8_weight is not None for m in model.modules() if isinstance(m, FusedLoraLinear)))


def _train(make_config, out, *args: str) -> tuple[list[float], Fp8Seen, torch.nn.Module]:
    cfg = resolve_defaults(make_config(out, "--max_steps", "8", *args), cuda=False, cuda_bf16=False)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer)
    seen = Fp8Seen()
    trainer = build_trainer(cfg, model, tokenizer, build_datasets(cfg, tokenizer), callbacks=[seen])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return losses, seen, model


def test_training_with_fp8_holds_the_copies_while_it_trains(make_config, tmp_path, capsys):
    losses, seen, model = _train(make_config, tmp_path / "fp8", "--fp8", "true")
    assert "fp8: the frozen weights of 10 adapted layers in fp8" in capsys.readouterr().out
    assert seen.steps == [10] * 8
    assert not any(m.fp8_weight is not None for m in model.modules() if isinstance(m, FusedLoraLinear))
    plain, plain_seen, _ = _train(make_config, tmp_path / "plain")
    assert plain_seen.steps == [0] * 8
    assert len(losses) == len(plain) and all(math.isfinite(x) for x in losses)
    assert losses != plain
    for got, want in zip(losses, plain, strict=True):
        assert abs(got - want) < 2e-2 * abs(want)
