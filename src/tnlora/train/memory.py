"""How much GPU memory a training run needs: the estimate the micro-batch, checkpointing and offload defaults
are picked from.

A rough model calibrated on measured peaks rather than derived: the base weights (bf16, or 4-/8-bit for the
quantized linear layers), the trained weights with their gradients and AdamW state, the loss's fp32 logit
chunks, and the activations autograd keeps for the backward, which grow with tokens per micro-batch × layers ×
model width. With gradient checkpointing only each layer's input is kept (in CPU memory when offloaded), plus
the one layer being recomputed.
"""

from __future__ import annotations

import dataclasses
import functools
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
# With checkpointing: each layer's input (bf16 hidden states, 2 bytes per unit of width; offloaded ones wait in
# CPU memory, two layers' worth in flight), and what the backward holds while it runs: kept on the GPU, the
# recomputed layer's saved activations (with the mixers checkpointed apart the larger step's, ~0.85 of a layer;
# un-checkpointed last layers: theirs) plus RECOMPUTE_EXTRA_LAYERS of a layer, and with compiled layers
# RECOMPUTE_BUFFER_BYTES more (measured: the compiled recompute holds ~1.3 layers at 16 x 1,024 tokens, the eager
# one ~0.8); offloaded, two layers' activations (the next layer's inputs are fetched while one recomputes).
# Fitted on 7B's measured peaks at 131,072 tokens (compiled; checkpoint_regions layer / mixers, 0 to 3 layers
# un-checkpointed), at 16 x 1,024 tokens compiled and at 8 x 1,024 eager (benchmarks/RESULTS.md;
# tests/train/test_memory.py holds them).
CHECKPOINT_INPUT_BYTES = 2
RECOMPUTED_LAYERS = 1
MIXER_RECOMPUTED_SHARE = 0.85
RECOMPUTE_EXTRA_LAYERS = 0.05
RECOMPUTE_BUFFER_BYTES = 1.6 * 2**30
OFFLOADED_RECOMPUTED_LAYERS = 2
OFFLOADED_INPUTS_IN_FLIGHT = 2
# Quantized linear layers, bytes per parameter (bitsandbytes): 4-bit values plus one fp32 scale per block of
# 64 (double quantization: an 8-bit scale per block and an fp32 one per 256 blocks); 8-bit values plus one fp32
# scale per output row, negligible.
QUANTIZED_BYTES = {(4, False): 0.5 + 4 / 64, (4, True): 0.5 + 1 / 64 + 4 / (64 * 256), (8, False): 1.0, (8, True): 1.0}
# fp8: true keeps an e4m3 copy of every adapted layer's frozen weight beside the bf16 one (the scales, one fp32 a
# row, are negligible); the backward's transposed copy of one weight and the quantized x / dy live one GEMM each.
FP8_COPY_BYTES = 1.0
# A trained parameter: its fp32 copy, gradient and AdamW's two moments.
TRAINED_BYTES = 16
# The chunked loss holds two fp32 logit chunks (loss_chunk_size × vocabulary) at a time: the logits and their
# softmax gradient.
LOSS_CHUNKS = 2
# The part of the card a run may plan to use: the CUDA context, the allocator's fragmentation and the
# optimizer's first step take the rest.
USABLE_FRACTION = 0.9


def model_config(name_or_path: str):
    """The TransnormerConfig of a preset name, a checkpoint directory or a Hub id (only config.json is read)."""
    from tnlora.model.hub import load_model_config

    return load_model_config(name_or_path)


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    """A model's parameters by what training does with them."""

    total: int  # the tied embedding once
    linear: int  # the decoder layers' linear layers: what quantization_bit quantizes
    lora: int  # LoRA A and B of the run's targets and rank
    adapted: int  # the frozen weights of the run's LoRA targets: what fp8 keeps an fp8 copy of
    additional: int  # additional_target modules, trained in full beside the adapter


def parameter_count(config) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device (no memory, no init)."""
    from tnlora.model import TransnormerForCausalLM
    from tnlora.train.lora import count_parameters

    with torch.device("meta"):
        model = TransnormerForCausalLM(config)
    return count_parameters(model)[1]


def parameter_counts(config, cfg: RunConfig) -> ParameterCounts:
    """:class:`ParameterCounts` of the model ``config`` describes under the run ``cfg`` (on the meta device)."""
    return _counts(config.to_json_string(use_diff=False), cfg.lora_target, cfg.lora_rank, cfg.additional_target)


@functools.lru_cache(maxsize=16)
def _counts(config_json: str, lora_target: str, rank: int, additional: str | None) -> ParameterCounts:
    import json

    from tnlora.config import split_list
    from tnlora.model import TransnormerConfig, TransnormerForCausalLM
    from tnlora.train.lora import count_parameters, linear_modules, resolve_lora_targets

    config = TransnormerConfig(**json.loads(config_json))
    with torch.device("meta"):
        model = TransnormerForCausalLM(config)
    linears = linear_modules(model)
    targets = resolve_lora_targets(model, lora_target)
    adapted = [m for name, m in linears.items() if any(name == t or name.endswith("." + t) for t in targets)]
    lora = sum(rank * (m.in_features + m.out_features) for m in adapted)
    extra = split_list(additional)
    full = {
        id(p): p.numel()
        for name, module in model.named_modules()
        if name and any(name == t or name.endswith("." + t) for t in extra)
        for p in module.parameters()
    }
    return ParameterCounts(
        total=count_parameters(model)[1],
        linear=sum(m.weight.numel() for m in linears.values()),
        lora=lora,
        adapted=sum(m.weight.numel() for m in adapted),
        additional=sum(full.values()),
    )


def weight_bytes(config, cfg: RunConfig) -> float:
    """The model's weights as the run keeps them: the frozen base (bf16 under bf16 LoRA, else fp32; quantized
    linear layers at ``QUANTIZED_BYTES``; with fp8 the adapted layers' fp8 copies too) and 16 bytes per trained
    parameter."""
    counts = parameter_counts(config, cfg)
    if cfg.finetuning_type == "full":
        return TRAINED_BYTES * counts.total
    base = 2 if cfg.bf16 else 4
    if cfg.quantization_bit is not None:
        quantized = QUANTIZED_BYTES[(cfg.quantization_bit, cfg.double_quantization)]
        frozen = quantized * counts.linear + base * (counts.total - counts.linear)
    else:
        frozen = base * counts.total
    if cfg.fp8:
        frozen += FP8_COPY_BYTES * counts.adapted
    if cfg.finetuning_type == "freeze":
        return frozen + TRAINED_BYTES * counts.total * min(1.0, abs(cfg.freeze_trainable_layers) / config.decoder_layers)
    return frozen + TRAINED_BYTES * (counts.lora + counts.additional)


def activation_bytes(config, cfg: RunConfig) -> int:
    """What autograd keeps for the backward of one micro-batch (``cfg`` resolved: the batch size is set)."""
    tokens = cfg.per_device_train_batch_size * cfg.cutoff_len
    per_unit = ACTIVATION_BYTES
    if cfg.finetuning_type == "lora" and cfg.lora_dropout > 0:
        per_unit += ACTIVATION_BYTES_LORA_DROPOUT
    from tnlora.ops import select

    if not cfg.torch_compile and not select.triton_available():
        # Eager layers run the Triton norms (norm_kernel "auto") wherever triton imports.
        per_unit += ACTIVATION_BYTES_TORCH_NORMS
    scale = 1 if cfg.bf16 else 2  # fp32 activations are twice the size
    width, layers = config.decoder_embed_dim, config.decoder_layers
    if not cfg.gradient_checkpointing:
        return int(scale * per_unit * tokens * layers * width)
    kept = min(cfg.uncheckpointed_layers or 0, layers)
    if cfg.use_unsloth_gc:
        # the last layers left un-checkpointed hold their activations when the backward starts, as the first
        # recompute would: each costs a layer only beyond the first
        held = OFFLOADED_RECOMPUTED_LAYERS + max(0, kept - 1)
        return int(scale * (held * per_unit + CHECKPOINT_INPUT_BYTES * OFFLOADED_INPUTS_IN_FLIGHT) * tokens * width)
    mixers = cfg.checkpoint_regions == "mixers"
    # two checkpoints a layer with the mixers apart, each keeping its input (the layer's and its middle residual)
    inputs = (layers - kept) * (2 if mixers else 1)
    held = (MIXER_RECOMPUTED_SHARE if mixers and not kept else max(RECOMPUTED_LAYERS, kept)) + RECOMPUTE_EXTRA_LAYERS
    buffers = RECOMPUTE_BUFFER_BYTES if cfg.torch_compile else 0
    return int(scale * (held * per_unit + CHECKPOINT_INPUT_BYTES * inputs) * tokens * width + buffers)


def memory_estimate(config, cfg: RunConfig) -> int:
    """Estimated peak bytes of a run of ``cfg`` on the model ``config``, with the checkpointing ``cfg`` says."""
    loss = LOSS_CHUNKS * 4 * config.loss_chunk_size * config.vocab_size
    return int(weight_bytes(config, cfg) + loss + activation_bytes(config, cfg))


def memory_without_checkpointing(config, cfg: RunConfig) -> int:
    """Estimated peak bytes of a run of ``cfg`` on the model ``config`` with checkpointing off."""
    return memory_estimate(config, dataclasses.replace(cfg, gradient_checkpointing=False, use_unsloth_gc=False))


def fits_without_checkpointing(cfg: RunConfig, device_bytes: int) -> bool:
    """Whether the estimate without checkpointing stays within the usable part of ``device_bytes``."""
    return memory_without_checkpointing(model_config(cfg.model_name_or_path), cfg) <= USABLE_FRACTION * device_bytes


def fits_in_memory(cfg: RunConfig, device_bytes: int) -> bool:
    """Whether the estimate, with the checkpointing and offload ``cfg`` says, stays within the usable part of
    ``device_bytes``."""
    return memory_estimate(model_config(cfg.model_name_or_path), cfg) <= USABLE_FRACTION * device_bytes


def device_memory(device: int | None = None) -> int:
    """The bytes this process may allocate on a GPU (default: the current one): the card's memory times the
    share ``torch.cuda.set_per_process_memory_fraction`` left it, so a capped process gets defaults that fit
    its share (and ``tnlora bench train --gpu_memory_gib`` can stand in for a smaller card)."""
    index = torch.cuda.current_device() if device is None else device
    return int(torch.cuda.get_device_properties(index).total_memory * torch.cuda.get_per_process_memory_fraction(index))


class MemoryFit:
    """``resolve_defaults``'s ``fits`` for a card of ``device_bytes``: whether a resolved config is estimated to
    fit; ``describe`` words the estimate for a refusal."""

    def __init__(self, device_bytes: int) -> None:
        self.device_bytes = device_bytes

    def __call__(self, cfg: RunConfig) -> bool:
        return fits_in_memory(cfg, self.device_bytes)

    def describe(self, cfg: RunConfig) -> str:
        estimate = memory_estimate(model_config(cfg.model_name_or_path), cfg)
        return (
            f"estimated {estimate / 2**30:.1f} GiB, {USABLE_FRACTION * self.device_bytes / 2**30:.1f} GiB usable "
            f"of {self.device_bytes / 2**30:.1f}"
        )


def gpu_fits(device: int | None = None) -> Callable[[RunConfig], bool]:
    """``resolve_defaults``'s ``fits`` for a GPU (default: the current one), sized by :func:`device_memory`."""
    return MemoryFit(device_memory(device))


__all__ = [
    "ACTIVATION_BYTES",
    "ACTIVATION_BYTES_LORA_DROPOUT",
    "ACTIVATION_BYTES_TORCH_NORMS",
    "MemoryFit",
    "ParameterCounts",
    "activation_bytes",
    "device_memory",
    "fits_in_memory",
    "fits_without_checkpointing",
    "gpu_fits",
    "memory_estimate",
    "memory_without_checkpointing",
    "model_config",
    "parameter_count",
    "parameter_counts",
    "weight_bytes",
]
