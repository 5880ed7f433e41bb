"""peft's LoRA linear layer with its training forward as one operation (:func:`tnlora.ops.lora.lora_linear`).

Given to peft through its custom-layer hook (``LoraConfig._register_custom_module``, the mapping peft's
dispatcher consults before its own layers), so the adapter's parameters, names, saving, merging and every
other behaviour stay peft's own: only the forward that training differentiates changes, and only in the case
it covers (one plain vanilla-LoRA adapter on a plain ``nn.Linear`` whose weight is not a DeepSpeed ZeRO-3
partition). Evaluation, inference and every other case run peft's forward.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn
from transformers import TrainerCallback

from tnlora.model.modeling import partitioned
from tnlora.ops.lora import LoraOperands, lora_linear, lora_linear_pair


class FusedLoraLinear(LoraLinear):
    """peft's ``lora.Linear``; in training with gradients on, the vanilla adapter's forward is fused with the
    base layer's (the B matmul accumulates into the base output, forward and backward). Compiled code calls
    the fused form as custom operators, or with ``compiled_op`` False peft's composition (``tnlora bench train
    --no-lora_compiled_op``)."""

    compiled_op = True
    # Two fused layers reading one input (the GLU's l1 and l2) run as one operation where the model asks for it
    # (forward_with); False: each as its own. `tnlora bench train --no-lora_pair` sets it.
    paired = True
    # "triton": the backward's two products of dy from one read of it (tnlora.ops.lora_grad, CUDA); "torch": two
    # GEMMs; "auto" (the default): the one read where dy holds tnlora.ops.lora.LORA_GRAD_MIN_ELEMENTS elements.
    # `tnlora bench train --lora_grad_kernel` sets it.
    grad_kernel = "auto"
    # "triton": LoRA's dropout applied inside the adapter's kernels as a byte mask (tnlora.ops.lora_dropout: the
    # dropped input neither written nor kept; opt-in: PyTorch's speed, less memory); "torch" and "auto" (the
    # default): PyTorch's dropout. `tnlora bench train --lora_dropout_kernel` sets it.
    dropout_kernel = "auto"
    # False while a checkpointed layer recomputes this projection and reads none of its output (set by the
    # layer's recompute context, TransnormerDecoderLayer.recomputing): the frozen GEMM is left out.
    output_needed = True
    # The frozen weight in fp8 (quantized values, scales: tnlora.ops.fp8.quantize_weight) while a run with fp8: true
    # trains (set_base_fp8); the fused forward's frozen GEMMs then run in fp8. A plain attribute, not a buffer:
    # it is never saved, and DDP does not broadcast it each step.
    fp8_weight: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapter = self._fused_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        dropout = self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        return lora_linear(
            x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
            self.scaling[adapter], p, dropout.training, self.compiled_op, self.output_needed, self.grad_kernel,
            self.fp8_weight, self.dropout_kernel,
        )

    def forward_with(self, other: nn.Module, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """(self(x), other(x)) as one operation (:func:`tnlora.ops.lora.lora_linear_pair`: the adapters' down
        products in one GEMM, one input gradient) where both are fused layers in the case it covers (no dropout, no
        fp8 copy, both outputs needed); None otherwise, and the caller calls each."""
        if not (self.paired and type(other) is FusedLoraLinear):
            return None
        pair = []
        for layer in (self, other):
            adapter = layer._fused_adapter(x, (), {})
            if adapter is None or layer.fp8_weight is not None or not layer.output_needed:
                return None
            dropout = layer.lora_dropout[adapter]
            if isinstance(dropout, nn.Dropout) and dropout.p > 0.0 and dropout.training:
                return None
            base = layer.get_base_layer()
            pair.append(LoraOperands(base.weight, base.bias, layer.lora_A[adapter].weight,
                                     layer.lora_B[adapter].weight, layer.scaling[adapter]))  # fmt: skip
        if torch.compiler.is_compiling() and not (self.compiled_op and other.compiled_op):
            return None
        return lora_linear_pair(x, pair[0], pair[1], grad_kernel=self.grad_kernel)

    def _fused_adapter(self, x: Tensor, args: tuple, kwargs: dict) -> str | None:
        """The adapter the fused forward computes, or None where peft's forward must run."""
        if args or kwargs or not (self.training and torch.is_grad_enabled()):
            return None
        if self.disable_adapters or self.merged or self.fan_in_fan_out:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant:
            return None
        adapter = active[0]
        base = self.get_base_layer()
        if type(base) is not nn.Linear:
            return None  # quantized and other linear subclasses keep their own forward
        if partitioned(base):
            # DeepSpeed ZeRO-3 gathers a partitioned weight around the base layer's own forward only
            return None
        if not isinstance(self.lora_dropout[adapter], nn.Dropout | nn.Identity):
            return None
        weight_dtype = self.lora_A[adapter].weight.dtype
        if (
            getattr(self, "cast_input_dtype_enabled", True)
            and x.dtype != weight_dtype
            and not torch.is_autocast_enabled(x.device.type)
        ):
            return None  # peft computes the adapter in its weights' dtype here; keep its numbers
        return adapter


def set_base_fp8(model: nn.Module, enabled: bool) -> int:
    """Give every fused LoRA layer an fp8 copy of its frozen weight, made where the weight is now
    (:func:`tnlora.ops.fp8.quantize_weight`: one byte a weight and a scale a row), or drop the copies (``enabled``
    False). Layers whose weight the fp8 GEMMs cannot take there (:func:`tnlora.ops.fp8.fp8_supported`) keep the
    compute dtype. Returns how many layers have a copy."""
    from tnlora.ops.fp8 import fp8_supported, quantize_weight

    count = 0
    for module in model.modules():
        if not isinstance(module, FusedLoraLinear):
            continue
        weight = module.get_base_layer().weight
        if enabled and type(module.get_base_layer()) is nn.Linear and fp8_supported(weight):
            module.fp8_weight = quantize_weight(weight)
            count += 1
        else:
            module.fp8_weight = None
    return count


class BaseFp8Callback(TrainerCallback):
    """``fp8: true``: the fp8 copies of the frozen weights are made when training starts (the Trainer has put the
    model on its device by then) and dropped when it ends (evaluation after it, sample replies and the returned
    model use the bf16 base)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        count = set_base_fp8(model, True)
        fused = sum(isinstance(m, FusedLoraLinear) for m in model.modules())
        if not state.is_world_process_zero:
            return
        if count == fused:
            print(f"fp8: the frozen weights of {count} adapted layers in fp8 (e4m3, row scales)", flush=True)
        else:
            print(
                f"warning: fp8: {fused - count} of {fused} adapted layers keep bf16 here (fp8 GEMMs need compute "
                "capability ≥ 8.9 and widths that are multiples of 16)",
                file=sys.stderr,
                flush=True,
            )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        set_base_fp8(model, False)


def register_fused_lora(lora_config: Any) -> Any:
    """``lora_config`` (a peft ``LoraConfig``) with plain ``nn.Linear`` targets wrapped by
    :class:`FusedLoraLinear`; returned for chaining."""
    lora_config._register_custom_module({nn.Linear: FusedLoraLinear})
    return lora_config


__all__ = ["BaseFp8Callback", "FusedLoraLinear", "register_fused_lora", "set_base_fp8"]
