"""Which parameters train: LoRA target discovery and peft config, full and freeze fine-tuning.

TransNormerLLM's only linear layers are ``qkvu_proj`` and ``out_proj`` (token mixer) and ``l1``, ``l2``, ``l3``
(channel mixer), plus ``lm_head``. A Llama-style target list (q_proj, v_proj, …) matches nothing, and peft
would fail or silently train nothing, so every requested name is checked against the model first.

On a quantized base (QLoRA) peft wraps bitsandbytes' layers with its own LoRA layers (``get_peft_model`` sees
``is_loaded_in_4bit`` / ``is_loaded_in_8bit``). peft's ``prepare_model_for_kbit_training`` is not called: of
what it does, freezing the base is ``get_peft_model``'s own work, the input-gradient hook serves reentrant
checkpointing only (tnlora checkpoints non-reentrantly) and the Trainer switches checkpointing on; what remains
is its cast of every non-quantized weight to fp32, which exists for the gains of LayerNorms in fp16. TNL's
norms have no weights and compute in fp32 inside; an fp32 embedding would make the whole residual stream fp32
(bitsandbytes casts each quantized layer's output back to its input's dtype), so q, k and v would reach the fla
kernel in fp32 and every saved activation would double. The embedding stays bf16, as on a bf16 base, and the
adapter weights train in fp32 under bf16 autocast, as there.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from tnlora.config import LINEAR_TARGETS_ALL, RunConfig, split_list
from tnlora.errors import ConfigError
from tnlora.model.loading import peft_quietly
from tnlora.model.quantization import logical_numel

# The output head is tied to the embedding; adapting it with LoRA would untie what the checkpoint ties.
EXCLUDED_LINEARS = ("lm_head",)

_LLAMA_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "query_key_value"}


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` by qualified name, the output head excluded."""
    out: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf not in EXCLUDED_LINEARS:
            out[name] = module
    return out


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct leaf names of the linear layers, in model order (for TNL: qkvu_proj, out_proj, l1, l2, l3)."""
    names: list[str] = []
    for name in linear_modules(model):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in names:
            names.append(leaf)
    return names


def resolve_lora_targets(model: nn.Module, lora_target: str | Sequence[str]) -> list[str]:
    """Turn ``"all"`` or a comma list into peft ``target_modules``; a name that matches no linear layer is an error."""
    available = linear_layer_names(model)
    if isinstance(lora_target, str):
        if lora_target.strip().lower() == LINEAR_TARGETS_ALL:
            if not available:
                raise ConfigError("lora_target: this model has no linear layers to adapt")
            return available
        requested = split_list(lora_target)
    else:
        requested = [t.strip() for t in lora_target if t.strip()]
    qualified = list(linear_modules(model))
    missing = [t for t in requested if not any(q == t or q.endswith("." + t) for q in qualified)]
    if missing:
        hint = ""
        if _LLAMA_NAMES.intersection(missing):
            hint = " (TransNormerLLM fuses q, k, v and the output gate into qkvu_proj)"
        raise ConfigError(
            f"lora_target: {', '.join(repr(m) for m in missing)} matches no linear layer of this model{hint}; "
            f"its linear layers are: {', '.join(available)} (or use 'all')"
        )
    return requested


def build_lora_config(
    cfg: RunConfig, target_modules: list[str], trainable_token_ids: list[int] | None = None
):  # -> peft.LoraConfig (peft imported lazily: it is slow to import)
    """The peft ``LoraConfig`` of a run."""
    from peft import LoraConfig, TaskType

    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank
    modules_to_save = split_list(cfg.additional_target) or None
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.lora_rank,
        lora_alpha=alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        modules_to_save=modules_to_save,
        trainable_token_indices=({"embed_tokens": list(trainable_token_ids)} if trainable_token_ids else None),
        # embed_tokens and lm_head share one tensor; keep them shared in any trained copy of either
        ensure_weight_tying=bool(modules_to_save),
        bias="none",
    )


def check_finetuning(model: nn.Module, cfg: RunConfig) -> None:
    """Refuse LoRA / additional / freeze targets that name nothing in ``model`` (its module tree is enough: the
    training preflight passes a model built on the meta device, before any weight is read)."""
    if cfg.finetuning_type == "lora":
        resolve_lora_targets(model, cfg.lora_target)
        if cfg.additional_target:
            _check_module_names(model, split_list(cfg.additional_target), "additional_target")
            if cfg.quantization_bit is not None:
                _check_not_quantized(model, split_list(cfg.additional_target))
    elif cfg.finetuning_type == "freeze":
        layers = decoder_layers(model)
        if abs(cfg.freeze_trainable_layers) > len(layers):
            raise ConfigError(
                f"freeze_trainable_layers: {cfg.freeze_trainable_layers} but the model has only {len(layers)} layers"
            )


def apply_finetuning(model: nn.Module, cfg: RunConfig, trainable_token_ids: list[int] | None = None) -> nn.Module:
    """Make the parameters of ``cfg.finetuning_type`` trainable; for LoRA return the peft-wrapped model."""
    if cfg.finetuning_type == "lora":
        from peft import get_peft_model

        targets = resolve_lora_targets(model, cfg.lora_target)
        if cfg.additional_target:
            _check_module_names(model, split_list(cfg.additional_target), "additional_target")
        lora_config = build_lora_config(cfg, targets, trainable_token_ids)
        if cfg.lora_kernel == "fused" and cfg.quantization_bit is None:
            # (quantized layers subclass nn.Linear; they keep peft's own bitsandbytes layers)
            from tnlora.train.lora_fused import register_fused_lora

            register_fused_lora(lora_config)
        with peft_quietly():
            return get_peft_model(model, lora_config)
    if cfg.finetuning_type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    _freeze_all_but_layers(model, cfg.freeze_trainable_layers)
    return model


def set_adapter_input_casts(model: nn.Module, enabled: bool) -> int:
    """Switch peft's cast of each adapted layer's input to the adapter weights' dtype; returns how many layers.

    Off for bf16 mixed-precision training only, and back on after it for use outside autocast: under the
    Trainer's autocast the adapter matmuls run in the compute dtype whatever their weights' dtype, so peft's
    cast of each input to the fp32 adapter weights' dtype only writes an fp32 copy of the activation (and
    autocast casts it straight back) in every adapted layer, forward and backward. ``cast_input_dtype_enabled`` is peft's own switch for this
    (``peft.helpers.disable_input_dtype_casting``); the result under autocast is identical.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = enabled
    return len(layers)


def _check_module_names(model: nn.Module, names: list[str], key: str) -> None:
    qualified = [n for n, _ in model.named_modules() if n]
    missing = [t for t in names if not any(q == t or q.endswith("." + t) for q in qualified)]
    if missing:
        raise ConfigError(f"{key}: {', '.join(repr(m) for m in missing)} matches no module of this model")


def _check_not_quantized(model: nn.Module, names: list[str]) -> None:
    """additional_target modules train in full: none of them may be (or hold) a layer quantization_bit
    quantizes."""
    quantized = list(linear_modules(model))
    for target in names:
        for name, _ in model.named_modules():
            if (name == target or name.endswith("." + target)) and any(
                q == name or q.startswith(name + ".") for q in quantized
            ):
                raise ConfigError(
                    f"additional_target: {target!r} is (or holds) a linear layer that quantization_bit quantizes; "
                    "a quantized layer trains through LoRA only (lora_target)"
                )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers (``model.layers`` of a CausalLM, or ``layers`` of a bare model)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            return module
    raise ConfigError("finetuning_type: freeze needs a model with a 'layers' list; this model has none")


def _freeze_all_but_layers(model: nn.Module, n: int) -> None:
    """LLaMA-Factory's freeze tuning: train the last ``n`` decoder layers (the first ``-n`` when negative)."""
    layers = decoder_layers(model)
    if abs(n) > len(layers):
        raise ConfigError(f"freeze_trainable_layers: {n} but the model has only {len(layers)} layers")
    chosen = layers[len(layers) - n :] if n > 0 else layers[: -n]
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in chosen:
        for p in layer.parameters():
            p.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors count once. (A DeepSpeed ZeRO-3 partition
    counts its full size, ``ds_numel``: its own data is empty outside its module's forward.)"""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        # a 4-bit weight packs two parameters a byte; a ZeRO-3 partition is empty outside its module's forward
        size = getattr(p, "ds_numel", None) or logical_numel(p)
        total += size
        if p.requires_grad:
            trainable += size
    return trainable, total


def describe_trainable(model: nn.Module) -> str:
    """The line printed at the start of training."""
    trainable, total = count_parameters(model)
    share = 100.0 * trainable / max(total, 1)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"
