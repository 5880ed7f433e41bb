"""peft's LoRA linear layer with its training forward as one operation (:func:`tnlora.ops.lora.lora_linear`).

Given to peft through its custom-layer hook (``LoraConfig._register_custom_module``, the mapping peft's
dispatcher consults before its own layers), so the adapter's parameters, names, saving, merging and every
other behaviour stay peft's own: only the forward that training differentiates changes, and only in the case
it covers (one plain vanilla-LoRA adapter on a plain ``nn.Linear`` whose weight is not a DeepSpeed ZeRO-3
partition). Evaluation, inference and every other case run peft's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn

from tnlora.model.modeling import partitioned
from tnlora.ops.lora import lora_linear


class FusedLoraLinear(LoraLinear):
    """peft's ``lora.Linear``; in training with gradients on, the vanilla adapter's forward is fused with the
    base layer's (the B matmul accumulates into the base output, forward and backward). Compiled code calls
    the fused form as custom operators, or with ``compiled_op`` False peft's composition (``tnlora bench train
    --no-lora_compiled_op``)."""

    compiled_op = True
    # "triton": the backward's two products of dy from one read of it (tnlora.ops.lora_grad, CUDA); "torch": two
    # GEMMs; "auto" (the default): the one read from tnlora.ops.lora.LORA_GRAD_MIN_ROWS tokens a micro-batch.
    # `tnlora bench train --lora_grad_kernel` sets it.
    grad_kernel = "auto"
    # False while a checkpointed layer recomputes this projection and reads none of its output (set by the
    # layer's recompute context, TransnormerDecoderLayer.recomputing): the frozen GEMM is left out.
    output_needed = True

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
        )

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


def register_fused_lora(lora_config: Any) -> Any:
    """``lora_config`` (a peft ``LoraConfig``) with plain ``nn.Linear`` targets wrapped by
    :class:`FusedLoraLinear`; returned for chaining."""
    lora_config._register_custom_module({nn.Linear: FusedLoraLinear})
    return lora_config


__all__ = ["FusedLoraLinear", "register_fused_lora"]
