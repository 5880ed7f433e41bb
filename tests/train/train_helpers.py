"""Shared pieces of the training-step tests: a tiny LoRA model with nonzero adapters, packed batches, and the
loss + LoRA gradients of one step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from tnlora.config import RunConfig
from tnlora.model import TransnormerForCausalLM, config_from_preset
from tnlora.model.loading import set_attention_impl
from tnlora.train.lora import apply_finetuning
from tnlora.train.run import upcast_trainable

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Two layers with the 1B's head geometry (16 heads of 128; layer 0 at K = 256 with LRPE): the GPU tests.
GEOMETRY_1B = {"decoder_embed_dim": 2048, "hidden_dim": 2048, "decoder_attention_heads": 16, "glu_dim": 1024}


def lora_model(
    dropout: float = 0.0,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    impl: str = "chunked",
    lora_kernel: str = "fused",
    **overrides: object,
) -> torch.nn.Module:
    """The tiny preset (with config ``overrides``) with LoRA on every linear layer, trainable weights in fp32
    as ``tnlora train`` keeps them; the adapters get random values (the zero-initialised B would make every
    lora_A gradient zero and the comparison vacuous)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TransnormerForCausalLM(config_from_preset("tiny", **overrides))
    model = model.to(device=device, dtype=dtype)
    set_attention_impl(model, impl)
    model.config.use_cache = False
    cfg = RunConfig(
        model_name_or_path="tiny", dataset="d", output_dir="o", lora_rank=4, lora_alpha=8.0, lora_dropout=dropout,
        lora_kernel=lora_kernel,
    )
    model = apply_finetuning(model, cfg)
    if dtype != torch.float64:
        # tnlora train's fp32 adapters; a float64 model keeps float64 ones, so that the fused layers (which leave a
        # cast input to peft) run in the float64 comparisons
        upcast_trainable(model)
    return randomize_lora(model).train()


def randomize_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Every LoRA weight drawn at random (seeded; a zero B would make every lora_A gradient zero)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.05)
    return model


def batch(length: int, rows: int = 2) -> dict[str, torch.Tensor]:
    """Packed rows: three examples per row, the tail of the second row padded (mask 0, own seq id)."""
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(3, 300, (rows, length), generator=gen)
    cut1, cut2 = length // 3, 2 * length // 3
    seq_ids = torch.zeros(rows, length, dtype=torch.long)
    seq_ids[:, cut1:] = 1
    seq_ids[:, cut2:] = 2
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[-1, -5:] = 0
    seq_ids[-1, -5:] = 3
    labels = ids.clone()
    labels[mask == 0] = -100
    return {"input_ids": ids, "labels": labels, "seq_ids": seq_ids, "attention_mask": mask}


def half_labelled(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``inputs`` with every other position unlabelled, as prompts leave them: the last layer then trims
    (``trim_last_layer``)."""
    labels = inputs["labels"].clone()
    labels[:, ::2] = -100
    return {**inputs, "labels": labels}


def loss_and_grads(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], backward_context: Any = None
) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and trainable gradients of one step; ``backward_context`` (a context manager) around its
    backward alone."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, num_items_in_batch=int((inputs["labels"][:, 1:] != -100).sum())).loss
    with backward_context or contextlib.nullcontext():
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def counted_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    """A list that gets one entry per call of ``owner.name`` from now on (the function still does its work)."""
    calls: list[int] = []
    function = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *args, **kwargs: calls.append(1) or function(*args, **kwargs))
    return calls


def kernel_and_torch_steps(
    make_model: Callable[[str], torch.nn.Module],
    after: Callable[[str, torch.nn.Module], None] | None = None,
    compiled: bool = False,
    prepare: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """One bf16 step on CUDA of ``make_model("triton")``, then of ``make_model("torch")``, on packed rows (fla's
    varlen path; ``prepare`` changes them first), their decoder layers compiled with ``compiled``, the same dropout
    draws in both; ``after(kind, model)`` once each step is done. The GPU tests of a kernel against PyTorch's form
    compare the two results."""
    from tnlora.train.compile import compile_decoder_layers

    rows = batch(1000) if prepare is None else prepare(batch(1000))
    inputs = {name: t.cuda() for name, t in rows.items()}
    results = []
    for kind in ("triton", "torch"):
        torch.manual_seed(0)  # the same LoRA dropout masks in both runs
        model = make_model(kind)
        if compiled:
            compile_decoder_layers(model)
        torch.manual_seed(4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results.append(loss_and_grads(model, inputs))
        if after is not None:
            after(kind, model)
    return results


def assert_bf16_step_matches(
    got: tuple[float, dict[str, torch.Tensor]],
    want: tuple[float, dict[str, torch.Tensor]],
    label: str,
    tolerance: float = 2e-2,
) -> None:
    """Loss within 1 % and every LoRA gradient within ``tolerance`` (relative norm) of the reference step;
    prints both figures (the GPU tests' results go into the notes)."""
    (loss, grads), (want_loss, want_grads) = got, want
    print(f"{label}: loss {loss:.6f}, reference {want_loss:.6f}")
    assert loss == pytest.approx(want_loss, rel=1e-2)
    errors = sorted(
        ((grads[n].float() - g.float()).norm() / g.float().norm().clamp(min=1e-30)).item() for n, g in want_grads.items()
    )
    worst = errors[-1]
    print(f"{label}: worst LoRA-gradient relative error {worst:.2e}, median {errors[len(errors) // 2]:.2e}")
    assert worst < tolerance


class StopAtStep(TrainerCallback):
    """Ask the Trainer to stop (saving a checkpoint) after optimizer step ``step``: an orderly interruption."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def tiny_argv(output_dir: Path, *overrides: str) -> list[str]:
    """``tnlora train`` arguments of a fast run on the tiny preset; ``overrides`` are ``--key value`` pairs."""
    base = [
        "--model_name_or_path", "tiny",
        "--dataset", "quickstart_alpaca,quickstart_chat",
        "--dataset_dir", str(EXAMPLES / "data"),
        "--template", "chatml",
        "--cutoff_len", "256",
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2",
        "--lora_rank", "8",
        "--logging_steps", "2",
        "--save_steps", "1000",
        "--report_to", "none",
        "--plot_loss", "false",
        "--seed", "0",
        "--dataset_cache_dir", str(output_dir.parent / f"{output_dir.name}-token-cache"),
    ]  # fmt: skip
    return [*base, *overrides]
