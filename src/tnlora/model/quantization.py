"""A quantized base model (bitsandbytes): the decoder's linear layers (``qkvu_proj``, ``out_proj``, ``l1``, ``l2``,
``l3``) in 4 bits (NF4 / FP4, QLoRA) or 8 bits (LLM.int8()); the embedding, the tied LM head, the LRPE angles and
the norms (which have no weights) stay in the compute dtype.

Checkpoint directories are quantized by transformers as they load (``from_pretrained(quantization_config=
BitsAndBytesConfig(...))``). A model already built (the random-weight presets) goes through the same quantizer:
its ``preprocess_model`` swaps each ``nn.Linear`` for bitsandbytes' layer, and each weight becomes bitsandbytes'
quantized parameter as it is moved to the GPU, one layer at a time, as ``from_pretrained`` does with a
checkpoint's tensors; ``postprocess_model`` then marks the model as quantized for peft and the Trainer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from tnlora.errors import ConfigError

# Left in the compute dtype: the output head, tied to the embedding (which is no linear layer anyway).
SKIPPED_MODULES = ["lm_head"]
INSTALL_HINT = "pip install 'tnlora[qlora]'"


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How the base's linear layers are quantized (LLaMA-Factory's keys quantization_bit, quantization_type,
    double_quantization) and the dtype they compute in."""

    bits: int
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"quantization_bit: 4 or 8, got {self.bits!r}")

    def describe(self) -> str:
        """E.g. ``4-bit nf4, double quantization``."""
        if self.bits == 8:
            return "8-bit (LLM.int8())"
        return f"4-bit {self.quant_type}" + (", double quantization" if self.double_quant else "")

    def bnb_config(self):  # -> transformers.BitsAndBytesConfig
        """The ``BitsAndBytesConfig`` that ``from_pretrained`` and the quantizer take."""
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(SKIPPED_MODULES))
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.compute_dtype,
            llm_int8_skip_modules=list(SKIPPED_MODULES),
        )


def check_quantization_available(key: str = "quantization_bit", remedy: str | None = None) -> None:
    """Refuse quantization, in one line naming ``key``, on a machine without a CUDA GPU or without bitsandbytes
    (checked in that order, before any model loads); ``remedy`` says how to go without."""
    if not torch.cuda.is_available():
        remedy = remedy or f"leave {key} unset to load the base in bf16 / fp32"
        raise ConfigError(f"{key}: a quantized base needs a CUDA GPU (bitsandbytes), and this machine has none; {remedy}")
    require_bitsandbytes(key)


def require_bitsandbytes(key: str = "quantization_bit") -> None:
    """Refuse quantization, in one line naming ``key``, where bitsandbytes does not import."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"{key}: a quantized base needs bitsandbytes, which is not installed: {INSTALL_HINT}") from None


def quantized_layer_types() -> tuple[type[nn.Module], ...]:
    """bitsandbytes' quantized linear layers (empty when bitsandbytes is not installed)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized(model: nn.Module) -> bool:
    """Whether any of ``model``'s layers (peft-wrapped or not) is a bitsandbytes quantized layer."""
    types = quantized_layer_types()
    return bool(types) and any(isinstance(m, types) for m in model.modules())


def quantize_linears(model, quantization: Quantization, device: torch.device | str, init_std: float | None = None):
    """Quantize ``model``'s decoder linear layers onto ``device`` one at a time, as ``from_pretrained`` quantizes
    a checkpoint's; move (or, from the meta device, create) the rest of the model there. Returns the model.

    Each layer's weight is cast to the compute dtype and quantized as it reaches ``device``, so the unquantized
    weights are never all there at once (a 7B on a 12 GiB card). A model built on the meta device (``init_std``
    given) gets each linear weight drawn on ``device`` from N(0, init_std) just before it is quantized, and its
    other tensors (embedding, LRPE angles, decay buffers) created on ``device`` and initialised by the model's
    own ``_init_weights``.
    """
    from transformers.quantizers import AutoHfQuantizer

    require_bitsandbytes()  # transformers' quantizer would fail later on a name bitsandbytes defines
    device = torch.device(device)
    dtype = quantization.compute_dtype
    originals = {name: (m.weight, m.bias) for name, m in model.named_modules() if type(m) is nn.Linear}
    quantizer = AutoHfQuantizer.from_config(quantization.bnb_config(), pre_quantized=False)
    quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": device})
    for name, module in model.named_modules():
        if not isinstance(module, quantized_layer_types()):
            continue
        weight, bias = originals.pop(name)
        if weight.is_meta:
            if init_std is None:
                raise ValueError(f"{name}: a weight on the meta device needs init_std to be drawn")
            weight = torch.empty(weight.shape, dtype=dtype, device=device).normal_(0.0, init_std)
        module.weight = _quantized_parameter(module.weight, weight.to(dtype), device)
        if bias is not None:
            module.bias = nn.Parameter(
                torch.zeros(bias.shape, dtype=dtype, device=device) if bias.is_meta else bias.to(device, dtype),
                requires_grad=False,
            )
        module._is_hf_initialized = True  # transformers' own init must not touch it again
    _move_the_rest(model, device, dtype)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    model.select_kernels()
    return model


def _quantized_parameter(placeholder: nn.Parameter, weight: torch.Tensor, device: torch.device) -> nn.Parameter:
    """bitsandbytes' parameter for ``weight``, quantized as it moves to ``device`` (the attributes the quantizer
    gave the placeholder, as transformers' own conversion passes them on)."""
    import bitsandbytes as bnb

    attributes: dict[str, Any] = dict(placeholder.__dict__)
    if isinstance(placeholder, bnb.nn.Params4bit):
        return bnb.nn.Params4bit(weight, requires_grad=False, **attributes).to(device)
    attributes.pop("SCB", None)
    return bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, **attributes).to(device)


def _move_the_rest(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Every tensor outside the quantized layers onto ``device``: moved in place (tied weights stay tied), or
    created and initialised there when on the meta device. The decay buffers keep their fp32."""
    layers = quantized_layer_types()
    for module in model.modules():
        if isinstance(module, layers):
            continue
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(t.is_meta for t in own):
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device, dtype if param.is_floating_point() else None)
        for key, buffer in module.named_buffers(recurse=False):
            module._buffers[key] = buffer.to(device)
    model.tie_weights()


def dequantize_linears(model, device: torch.device | str, dtype: torch.dtype):
    """The quantized linear layers back as ``nn.Linear`` on ``device`` in ``dtype``, one layer at a time (each
    weight as the quantized layer computes with it: dequantized in the compute dtype, then cast), and the rest
    of the model moved there: a plain model that ``merge_and_unload`` can fold an adapter into. Returns it."""
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    device = torch.device(device)
    for name, module in list(model.named_modules()):
        if not isinstance(module, quantized_layer_types()):
            continue
        weight = dequantize_bnb_weight(module.weight, getattr(module, "state", None))
        with torch.device("meta"):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight = nn.Parameter(weight.to(device, dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(device, dtype), requires_grad=False)
        model.set_submodule(name, linear)
        del module, weight
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, flag):
            delattr(model, flag)
    model.config._is_quantized = False
    return model.to(device=device, dtype=dtype)


def logical_numel(param: torch.Tensor) -> int:
    """Parameters a tensor stands for: a 4-bit bitsandbytes weight packs two in a byte (its ``quant_state``
    keeps the original shape)."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()
