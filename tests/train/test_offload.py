"""use_unsloth_gc: checkpointed layers whose saved inputs wait in CPU memory train exactly like plain ones.

On the CPU the offload copies are no-ops, so these tests check what can fail anywhere: that the non-reentrant
checkpoint saves only the layer's inputs at its own level (the premise of wrapping it in saved-tensor hooks),
that the model installs the offloading function from ``gradient_checkpointing_kwargs`` on every transformers
entry point, and that loss and LoRA gradients (dropout replayed) equal the un-checkpointed step. The copies
themselves are checked on a GPU (test_offload_gpu.py) and timed by ``tnlora bench train --use_unsloth_gc true``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from train_helpers import batch, lora_model, loss_and_grads

from tnlora.config import load_run_config, resolve_defaults
from tnlora.errors import ConfigError
from tnlora.model.offload import offloaded_checkpoint
from tnlora.train.lora import decoder_layers

OFFLOAD = {"use_reentrant": False, "offload_to_cpu": True}


def test_checkpoint_saves_only_its_inputs_outside_its_own_hooks():
    layer = decoder_layers(lora_model(dropout=0.1))[0]
    hidden = torch.randn(2, 40, layer.channel_mixer.l1.in_features, requires_grad=True)
    seen: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = checkpoint(layer, hidden, use_reentrant=False)
    # The inner activations (GLU hidden, q/k/v, norms) are held by the checkpoint's own hooks, not here; torch
    # 2.11 also saves an empty placeholder of its own (which the offload leaves where it is: too small to move).
    kept = [t for t in seen if t.numel()]
    assert len(kept) == 1 and kept[0] is hidden
    out.sum().backward()
    assert hidden.grad is not None


def test_offloaded_checkpoint_is_installed_and_trains_like_no_checkpoint():
    reference = lora_model(dropout=0.1)
    plain_ckpt, offloaded = lora_model(dropout=0.1), lora_model(dropout=0.1)
    plain_ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offloaded.gradient_checkpointing_enable(gradient_checkpointing_kwargs=OFFLOAD)  # through peft's wrapper
    layers = decoder_layers(offloaded)
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(layer._gradient_checkpointing_func.func is offloaded_checkpoint for layer in layers)
    assert all(layer._gradient_checkpointing_func.func is not offloaded_checkpoint for layer in decoder_layers(plain_ckpt))

    inputs = batch(48)
    results = []
    for model in (reference, plain_ckpt, offloaded):
        torch.manual_seed(3)  # the same dropout masks; checkpointing replays them in the recompute
        results.append(loss_and_grads(model, inputs))
    (loss0, grads0), *others = results
    assert any("lora_A" in name for name in grads0)
    for loss, grads in others:
        assert loss == loss0
        for name, grad in grads0.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-8, msg=name)


def test_activation_checkpointing_enable_reaches_the_override():
    model = lora_model().get_base_model()
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:  # transformers ≤ 5.23 has only gradient_checkpointing_enable (tested above)
        enable = model.gradient_checkpointing_enable
        enable(gradient_checkpointing_kwargs=OFFLOAD)
    else:
        enable(activation_checkpointing_kwargs=OFFLOAD)
    assert all(layer._gradient_checkpointing_func.func is offloaded_checkpoint for layer in decoder_layers(model))


def test_transformers_own_offload_argument_gets_the_side_stream_offload():
    import inspect

    model = lora_model().get_base_model()
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None or "offload" not in inspect.signature(enable).parameters:
        pytest.skip("this transformers has no offload argument (5.24+ has)")
    enable(activation_checkpointing_kwargs={"use_reentrant": False}, offload=True)
    assert all(layer._gradient_checkpointing_func.func is offloaded_checkpoint for layer in decoder_layers(model))
    enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer._gradient_checkpointing_func.func is checkpoint for layer in decoder_layers(model))


def test_use_unsloth_gc_implies_gradient_checkpointing():
    base = ["--model_name_or_path", "tiny", "--dataset", "d.json", "--output_dir", "out"]
    cfg = load_run_config(None, [*base, "--use_unsloth_gc", "true"])
    assert cfg.gradient_checkpointing is None  # "pick for me" until resolved
    assert resolve_defaults(cfg, cuda=False, cuda_bf16=False).gradient_checkpointing is True


def test_training_arguments_use_this_transformers_checkpointing_names(tmp_path):
    """No deprecation warning on transformers 5.24+ (activation_checkpointing*), the old names before; the
    offload key reaches the kwargs either way."""
    import warnings

    from tnlora.train.trainer import training_arguments

    base = ["--model_name_or_path", "tiny", "--dataset", "d.json", "--output_dir", str(tmp_path)]
    cfg = resolve_defaults(load_run_config(None, [*base, "--use_unsloth_gc", "true"]), cuda=False, cuda_bf16=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpointing.*deprecated")
        args = training_arguments(cfg, has_eval=False)
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
    assert args.gradient_checkpointing is True  # mirrored from the new name on 5.24+
    assert kwargs == {"use_reentrant": False, "offload_to_cpu": True}
    apart = ["--gradient_checkpointing", "true", "--checkpoint_regions", "mixers", "--uncheckpointed_layers", "1"]
    cfg = resolve_defaults(load_run_config(None, [*base, *apart]), cuda=False, cuda_bf16=False)
    args = training_arguments(cfg, has_eval=False)
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
    assert kwargs == {"use_reentrant": False, "offload_to_cpu": False, "checkpoint_regions": "mixers",
                      "uncheckpointed_layers": 1}  # fmt: skip
    with pytest.raises(ConfigError, match=r"^uncheckpointed_layers: applies under gradient checkpointing, which is "
                       r"off \(gradient_checkpointing: false\); drop one of them$"):  # fmt: skip
        load_run_config(None, [*base, "--uncheckpointed_layers", "2", "--gradient_checkpointing", "false"])
    with pytest.raises(ConfigError, match=r"^checkpoint_regions: mixers keeps each layer's middle residual on the GPU, "
                       r"use_unsloth_gc moves layer inputs off it; set one of them$"):  # fmt: skip
        load_run_config(None, [*base, "--checkpoint_regions", "mixers", "--use_unsloth_gc", "true"])
    plain = resolve_defaults(load_run_config(None, base), cuda=False, cuda_bf16=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpointing.*deprecated")
        assert training_arguments(plain, has_eval=False).gradient_checkpointing is False
