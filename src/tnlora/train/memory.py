"""How much GPU memory a training run needs without gradient checkpointing: the default's deciding figure.

A rough model calibrated on measured peaks rather than derived: the frozen weights plus the activations
that autograd keeps for the backward, which grow with tokens per micro-batch × layers × model width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tnlora.config import RunConfig

# Saved activations in bytes per token, per layer, per unit of model width (decoder_embed_dim), LoRA on every
# linear layer, bf16, no checkpointing: fitted on measured peaks (benchmarks/RESULTS.md, "Memory estimate
# against measured peaks") and rounded up, so that each estimate lies a little above its peak
# (tests/train/test_memory.py holds those peaks). Compiled layers and eager ones with the Triton norms keep
# about the same; LoRA dropout also keeps each adapted layer's dropped input; the PyTorch norms (eager, no
# triton) keep an fp32 copy of each norm's input.
ACTIVATION_BYTES = 46
ACTIVATION_BYTES_LORA_DROPOUT = 10
ACTIVATION_BYTES_TORCH_NORMS = 12
# The part of the card a run may plan to use: the CUDA context, the allocator's fragmentation and the
# optimizer's first step take the rest.
USABLE_FRACTION = 0.9


def model_config(name_or_path: str):
    """The TransnormerConfig of a preset name, a checkpoint directory or a Hub id (only config.json is read)."""
    from tnlora.model.hub import load_model_config

    return load_model_config(name_or_path)


def parameter_count(config) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device (no memory, no init)."""
    from tnlora.model import TransnormerForCausalLM
    from tnlora.train.lora import count_parameters

    with torch.device("meta"):
        model = TransnormerForCausalLM(config)
    return count_parameters(model)[1]


def memory_without_checkpointing(config, cfg: RunConfig) -> int:
    """Estimated peak bytes of a run of ``cfg`` on the model ``config`` with checkpointing off."""
    tokens = cfg.per_device_train_batch_size * cfg.cutoff_len  # cfg is resolved: the batch size is set
    params = parameter_count(config)
    weights = params * (2 if cfg.bf16 else 4)
    # Trained weights also hold an fp32 copy, its gradient and AdamW's two moments: 16 bytes each.
    if cfg.finetuning_type == "full":
        weights = 16 * params
    elif cfg.finetuning_type == "freeze":
        weights += 16 * params * min(1.0, abs(cfg.freeze_trainable_layers) / config.decoder_layers)
    per_unit = ACTIVATION_BYTES
    if cfg.finetuning_type == "lora" and cfg.lora_dropout > 0:
        per_unit += ACTIVATION_BYTES_LORA_DROPOUT
    from tnlora.ops import select

    if not cfg.torch_compile and not select.triton_available():
        # Eager layers run the Triton norms (norm_kernel "auto") wherever triton imports.
        per_unit += ACTIVATION_BYTES_TORCH_NORMS
    per_unit *= 1 if cfg.bf16 else 2  # fp32 activations are twice the size
    return int(weights + per_unit * tokens * config.decoder_layers * config.decoder_embed_dim)


def fits_without_checkpointing(cfg: RunConfig, device_bytes: int) -> bool:
    """Whether the estimate stays within the usable part of ``device_bytes``."""
    return memory_without_checkpointing(model_config(cfg.model_name_or_path), cfg) <= USABLE_FRACTION * device_bytes


def device_memory(device: int | None = None) -> int:
    """The bytes this process may allocate on a GPU (default: the current one): the card's memory times the
    share ``torch.cuda.set_per_process_memory_fraction`` left it, so a capped process gets defaults that fit
    its share (and ``tnlora bench train --gpu_memory_gib`` can stand in for a smaller card)."""
    index = torch.cuda.current_device() if device is None else device
    return int(torch.cuda.get_device_properties(index).total_memory * torch.cuda.get_per_process_memory_fraction(index))


def gpu_fits(device: int | None = None) -> Callable[[RunConfig], bool]:
    """``resolve_defaults``'s ``fits`` for a GPU: whether a resolved config trains without checkpointing there."""
    device_bytes = device_memory(device)
    return lambda resolved: fits_without_checkpointing(resolved, device_bytes)


__all__ = [
    "ACTIVATION_BYTES",
    "ACTIVATION_BYTES_LORA_DROPOUT",
    "ACTIVATION_BYTES_TORCH_NORMS",
    "device_memory",
    "fits_without_checkpointing",
    "gpu_fits",
    "memory_without_checkpointing",
    "model_config",
    "parameter_count",
]
