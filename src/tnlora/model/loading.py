"""Loading a model the way every tnlora verb does: presets, checkpoint directories and Hub ids, quantized or not
(``tnlora.model.quantization``), with the implementation choice applied, and peft adapters wrapped without
noise."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from tnlora.model.configuration import PRESETS, config_from_preset
from tnlora.model.modeling import TransnormerForCausalLM
from tnlora.model.quantization import Quantization, quantize_linears


def load_model(
    name_or_path: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantization: Quantization | None = None,
) -> TransnormerForCausalLM:
    """A preset name (any letter case) → deterministic random weights (seed 0, built on CPU in fp32, spec §10
    init); a directory or Hugging Face Hub id (``tnlora.model.hub``) → ``from_pretrained`` (official checkpoint
    dirs included; dtype defaults to the config's). Returned in eval mode.

    With ``quantization`` the decoder's linear layers are quantized by bitsandbytes onto ``device`` (default: the
    current GPU), the rest kept in ``dtype`` (default: the quantization's compute dtype, bf16): a checkpoint as
    transformers loads it quantized, a preset cast and quantized layer by layer (the same random weights as
    without quantization, so the two can be compared)."""
    from tnlora.model.hub import model_dir

    name_or_path = model_dir(str(name_or_path))
    if quantization is not None:
        dtype = dtype or quantization.compute_dtype
        device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
    if name_or_path in PRESETS:
        # fork_rng keeps the caller's global RNG stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = TransnormerForCausalLM(config_from_preset(name_or_path))
        if quantization is not None:
            return quantize_linears(model.to(dtype), quantization, device).eval()
        return model.to(device=device, dtype=dtype).eval()
    kwargs: dict = {} if dtype is None else {"dtype": dtype}
    if device is not None:
        kwargs["device_map"] = device
    if quantization is not None:
        kwargs["quantization_config"] = quantization.bnb_config()
    return TransnormerForCausalLM.from_pretrained(name_or_path, **kwargs).eval()


def load_base_model(
    name: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    attention_impl: str = "auto",
    quantization: Quantization | None = None,
):
    """:func:`load_model` with the lightning-attention choice applied and the official config's ``auto_map``
    dropped: what train, chat, generate, eval, merge and serve load."""
    model = load_model(name, dtype=dtype, device=device, quantization=quantization)
    set_attention_impl(model, attention_impl)
    # The official config names remote code files (auto_map) that no directory tnlora saves contains; a saved
    # config that kept it would point transformers at files that are not there.
    if hasattr(model.config, "auto_map"):
        del model.config.auto_map
    return model


def set_attention_impl(model, impl: str) -> None:
    """Run the lightning attention as ``impl`` (auto, chunked, recurrent, fla): the config's choice, applied to
    the model's token mixers for the device the model is on (a later move re-applies it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.lightning_impl = impl
    base.select_kernels()


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """Wrap a model with peft without transformers' ``is_gradient_checkpointing`` FutureWarning.

    peft (0.21) reads the deprecated ``model.is_gradient_checkpointing`` property while wrapping a model, and
    transformers 5 warns on every read; neither the user nor tnlora can act on it. Only that one warning is
    filtered, and only around the wrapping call.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        yield
