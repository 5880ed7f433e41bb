"""A checkpointed layer's recompute leaves out the GLU output projection's output (``l3``: its frozen GEMM and
its adapter's B product): that output feeds only the residual add, so the backward reads nothing of it. Checked
on the CPU in float32: the loss and every LoRA gradient equal the un-checkpointed step bit for bit (with and
without dropout, whose masks the recompute replays), the GEMMs the backward runs hold a recompute of every
layer but no ``x Wᵀ`` of ``l3``, and the layer's modules read as before once the step is over. The same in
compiled layers (the custom operator told so in the recompute): test_compile.py.

With ``checkpoint_regions: "mixers"`` each layer's token-mixer and channel-mixer steps are checkpoints of their
own, and the token step's recompute also leaves out ``out_proj``'s output (it too feeds only a residual add):
the same exactness, two GEMMs a layer fewer again, and the refusals where it cannot apply. With
``uncheckpointed_layers: N`` the last N layers are not checkpointed: the same exactness, no recompute of theirs.
A last layer that computes the labelled positions alone (``trim_last_layer``) recomputes them alone, under every
form of checkpointing, with the same exactness."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import noop_context_fn
from train_helpers import batch, half_labelled, lora_model, loss_and_grads

from tnlora.train.lora import decoder_layers
from tnlora.train.lora_fused import FusedLoraLinear

GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default}


class Gemms(TorchDispatchMode):
    """Every GEMM dispatched while active: its first operand's shape and the storage of its second (a frozen
    weight's, transposed or not, is the weight's own)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            mat1, mat2 = (args[0], args[1]) if func is torch.ops.aten.mm.default else (args[1], args[2])
            self.seen.append((tuple(mat1.shape), mat2.untyped_storage().data_ptr()))
        return func(*args, **(kwargs or {}))

    def count(self, x_shape: tuple[int, ...], linear: torch.nn.Module) -> int:
        """How many GEMMs multiplied an input of ``x_shape`` by the frozen weight of ``linear``."""
        return self.seen.count((x_shape, linear.get_base_layer().weight.untyped_storage().data_ptr()))


def step_with_backward_gemms(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[Any, Gemms]:
    """Loss and LoRA gradients of one step, and the GEMMs of its backward alone."""
    gemms = Gemms()
    return loss_and_grads(model, inputs, backward_context=gemms), gemms


def checkpointed_steps(dropout: float, *settings: dict[str, Any]) -> tuple[int, Any, list[tuple[Any, Any, Gemms]]]:
    """One step of the un-checkpointed model (the reference) and of a model checkpointed with each of
    ``settings`` (``gradient_checkpointing_kwargs``), the same dropout masks in all: the tokens, the reference's
    loss and gradients, and (model, loss and gradients, backward GEMMs) of each checkpointed one."""
    reference, models = lora_model(dropout), [lora_model(dropout) for _ in settings]
    for model, kwargs in zip(models, settings, strict=True):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    inputs = batch(48)
    torch.manual_seed(3)
    want = loss_and_grads(reference, inputs)
    runs = []
    for model in models:
        torch.manual_seed(3)
        runs.append((model, *step_with_backward_gemms(model, inputs)))
    return inputs["input_ids"].numel(), want, runs


def assert_same_step(got: Any, want: Any) -> None:
    """The same loss and every LoRA gradient bit for bit."""
    assert any("lora_A" in name for name in want[1])
    assert got[0] == want[0] and set(got[1]) == set(want[1])
    for name, grad in want[1].items():
        assert torch.equal(got[1][name], grad), name


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recompute_leaves_out_the_output_projection_and_trains_exactly(dropout: float) -> None:
    # A context_fn of the caller's own is kept: torch's no-op one recomputes the whole layer.
    tokens, want, runs = checkpointed_steps(
        dropout, {"use_reentrant": False}, {"use_reentrant": False, "context_fn": noop_context_fn}
    )
    (skipping, got, skipped_gemms), (plain, got_plain, plain_gemms) = runs
    assert_same_step(got, want)
    assert_same_step(got_plain, want)

    for run, gemms in ((skipping, skipped_gemms), (plain, plain_gemms)):
        for layer in decoder_layers(run):
            l3, qkvu = layer.channel_mixer.l3, layer.token_mixer.qkvu_proj
            assert isinstance(l3, FusedLoraLinear)
            # the layer is recomputed: its qkvu projection's frozen GEMM runs again in the backward ...
            assert gemms.count((tokens, qkvu.in_features), qkvu) == 1
            # ... and l3's x Wᵀ only where the whole layer is recomputed
            assert gemms.count((tokens, l3.in_features), l3) == (0 if run is skipping else 1)
    # two GEMMs a layer fewer in all: l3's x Wᵀ and its adapter's s · h Bᵀ (its s · x Aᵀ is saved for dB)
    assert len(skipped_gemms.seen) == len(plain_gemms.seen) - 2 * len(decoder_layers(skipping))
    # the recompute's setting does not outlive it: a forward after the step computes the whole output
    assert all(layer.channel_mixer.l3.output_needed for layer in decoder_layers(skipping))


def test_the_recompute_context_is_installed_on_decoder_layers_only() -> None:
    model = lora_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in decoder_layers(model):
        context_fn = layer._gradient_checkpointing_func.keywords["context_fn"]
        forward_context, recompute_context = context_fn()
        with forward_context:
            assert layer.channel_mixer.l3.output_needed
        with recompute_context:
            assert not layer.channel_mixer.l3.output_needed
            assert layer.channel_mixer.l1.output_needed and layer.token_mixer.out_proj.output_needed
        assert layer.channel_mixer.l3.output_needed
    # the other module transformers gives a checkpoint function (the decoder stack) gets none
    others = [m for m in model.modules() if hasattr(m, "_gradient_checkpointing_func") and m not in decoder_layers(model)]
    assert others and all("context_fn" not in m._gradient_checkpointing_func.keywords for m in others)
    # reentrant checkpointing takes no context_fn
    reentrant = lora_model()
    reentrant.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert all("context_fn" not in layer._gradient_checkpointing_func.keywords for layer in decoder_layers(reentrant))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_mixers_checkpointed_apart_leave_out_both_output_projections_and_train_exactly(dropout: float) -> None:
    tokens, want, runs = checkpointed_steps(
        dropout, {"use_reentrant": False}, {"use_reentrant": False, "checkpoint_regions": "mixers"}
    )
    (layered, _, layered_gemms), (apart, got, gemms) = runs
    assert apart.is_gradient_checkpointing
    assert_same_step(got, want)
    for layer, whole in zip(decoder_layers(apart), decoder_layers(layered), strict=True):
        mixer, glu = layer.token_mixer, layer.channel_mixer
        assert isinstance(mixer.out_proj, FusedLoraLinear)
        # both steps are recomputed (their input projections run again) ...
        assert gemms.count((tokens, mixer.qkvu_proj.in_features), mixer.qkvu_proj) == 1
        assert gemms.count((tokens, glu.l1.in_features), glu.l1) == 1
        # ... without either output projection's x Wᵀ (the tiny out_proj is square: its input gradient dy W has
        # the same shape, so one GEMM fewer than the whole layer's recompute, which runs both)
        x_shape = (tokens, mixer.out_proj.in_features)
        assert gemms.count(x_shape, mixer.out_proj) == layered_gemms.count(x_shape, whole.token_mixer.out_proj) - 1
        assert gemms.count((tokens, glu.l3.in_features), glu.l3) == 0
        assert mixer.out_proj.output_needed and glu.l3.output_needed
    # out_proj's x Wᵀ and its adapter's B product fewer a layer than the whole layer's recompute
    assert len(gemms.seen) == len(layered_gemms.seen) - 2 * len(decoder_layers(apart))


def test_mixers_apart_run_as_one_layer_without_grad_and_after_checkpointing_is_off() -> None:
    model = lora_model()
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "checkpoint_regions": "mixers"}
    )
    inputs = batch(16)
    with torch.no_grad():
        before = model(**inputs).logits
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)
    # enabled again for whole layers: the regions' checkpoint is gone
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.region_checkpoint is None for layer in decoder_layers(model))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"use_reentrant": False, "checkpoint_regions": "layers"}, "checkpoint_regions must be one of layer, mixers"),
        ({"use_reentrant": True, "checkpoint_regions": "mixers"}, "needs non-reentrant checkpointing"),
        ({"use_reentrant": False, "checkpoint_regions": "mixers", "offload_to_cpu": True}, "without offload"),
    ],
)
def test_mixers_apart_are_refused_where_they_cannot_apply(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lora_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("regions", ["layer", "mixers"])
def test_the_last_layers_left_out_of_checkpointing_are_not_recomputed_and_train_exactly(regions: str) -> None:
    kwargs = {"use_reentrant": False, "checkpoint_regions": regions, "uncheckpointed_layers": 1}
    tokens, want, [(model, got, gemms)] = checkpointed_steps(0.1, kwargs)
    layers = decoder_layers(model)
    assert len(layers) >= 2
    assert [layer.gradient_checkpointing for layer in layers] == [True] * (len(layers) - 1) + [False]
    assert_same_step(got, want)
    # the qkvu projection's frozen GEMM runs again in the backward of the checkpointed layers only
    recomputed = [gemms.count((tokens, layer.token_mixer.qkvu_proj.in_features), layer.token_mixer.qkvu_proj)
                  for layer in layers]  # fmt: skip
    assert recomputed == [1] * (len(layers) - 1) + [0]


def test_more_uncheckpointed_layers_than_the_model_has_are_refused() -> None:
    model = lora_model()
    count = len(decoder_layers(model))
    with pytest.raises(ValueError, match=f"uncheckpointed_layers must be 0 to {count} .*got {count + 1}"):
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "uncheckpointed_layers": count + 1}
        )
    # all of them: nothing is checkpointed
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, "uncheckpointed_layers": count})
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"use_reentrant": False},
        {"use_reentrant": True},
        {"use_reentrant": False, "checkpoint_regions": "mixers"},
        {"use_reentrant": False, "offload_to_cpu": True},
    ],
    ids=["layer", "reentrant", "mixers", "offload"],
)
def test_a_trimmed_last_layer_recomputes_its_labelled_positions_and_trains_exactly(kwargs: dict[str, Any]) -> None:
    """trim_last_layer under checkpointing: the last layer's recompute runs on the labelled positions as its
    forward did, and the step equals the un-checkpointed trimmed one bit for bit (dropout masks replayed)."""
    reference, model = lora_model(0.1), lora_model(0.1)
    for m in (reference, model):
        m.config.trim_last_layer = True
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    inputs = half_labelled(batch(48))
    torch.manual_seed(3)
    want = loss_and_grads(reference, inputs)
    torch.manual_seed(3)
    got, gemms = step_with_backward_gemms(model, inputs)
    assert_same_step(got, want)
    labelled = int((inputs["labels"][:, 1:] != -100).sum())
    assert labelled < inputs["labels"].numel() // 2
    *layers, last = decoder_layers(model)
    l1 = last.channel_mixer.l1
    # in the backward: the GLU's input projection recomputed on the labelled rows of the last layer, on every
    # row of the others
    assert gemms.count((labelled, l1.in_features), l1) == 1
    assert all(gemms.count((inputs["input_ids"].numel(), l1.in_features), layer.channel_mixer.l1) == 1 for layer in layers)
