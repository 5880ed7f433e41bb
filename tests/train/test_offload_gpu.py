"""use_unsloth_gc on CUDA: the layer inputs really leave the GPU in the forward, come back (each once, the next
layer's fetched ahead) in the backward, and the step equals plain checkpointing's. Skipped without CUDA."""

from __future__ import annotations

import gc

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from train_helpers import GEOMETRY_1B, batch, lora_model

from tnlora.model.offload import InputOffload
from tnlora.train.lora import decoder_layers

pytestmark = pytest.mark.gpu

LAYERS = 6
TOKENS = 2 * 1000  # batch(1000): two packed rows


def _model(offload: bool) -> torch.nn.Module:
    layers = {"decoder_layers": LAYERS, "linear_use_lrpe_list": [1] + [0] * (LAYERS - 1)}  # LRPE in layer 0, as 1B
    model = lora_model(device="cuda", **GEOMETRY_1B, **layers)
    kwargs = {"use_reentrant": False, "offload_to_cpu": offload}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def _offload_of(model: torch.nn.Module) -> InputOffload:
    (offload,) = {layer._gradient_checkpointing_func.args[0] for layer in decoder_layers(model)}
    return offload


def test_offloaded_inputs_leave_the_gpu_and_the_step_equals_plain_checkpointing() -> None:
    inputs = {name: t.cuda() for name, t in batch(1000).items()}
    count = int((inputs["labels"][:, 1:] != -100).sum())
    results, held = [], []
    for offload in (False, True):
        model = _model(offload)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(**inputs, num_items_in_batch=count).loss
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # the allocator takes back blocks whose side-stream copies are done
        held.append(torch.cuda.memory_allocated() - before)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
        if offload:
            hooks = _offload_of(model)
            # every layer's hidden states went to the host and came back once (layer 0's input needs no grad
            # under LoRA but is still saved: the recompute needs it)
            assert hooks.fetches == LAYERS
        del model, loss
    (plain_loss, plain_grads), (loss, grads) = results
    # fp32, the same kernels in the same order: the offloaded copies are bit-exact
    assert loss == plain_loss
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
    input_bytes = TOKENS * GEOMETRY_1B["decoder_embed_dim"] * 4
    print(f"held after the forward: plain {held[0] / 2**20:.1f} MiB, offloaded {held[1] / 2**20:.1f} MiB")
    assert held[0] - held[1] >= (LAYERS - 1) * input_bytes


def test_a_step_without_backward_leaves_nothing_behind() -> None:
    """A forward whose graph is dropped (no backward) frees its host copies: the next step's groups alone are kept."""
    model = _model(True)
    inputs = {name: t.cuda() for name, t in batch(1000).items()}
    model(**inputs).loss.detach()  # graph dropped
    gc.collect()
    loss = model(**inputs).loss
    hooks = _offload_of(model)
    assert len(hooks.groups) == LAYERS
    loss.backward()
    assert hooks.fetches == LAYERS
