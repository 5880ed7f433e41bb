"""Native TransNormerLLM: config, model and recurrent-state cache (the kernels live in ``tnlora.ops``)."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from tnlora.model.cache import TransnormerCache
from tnlora.model.configuration import PRESETS, TransnormerConfig, config_from_preset
from tnlora.model.loading import load_model
from tnlora.model.modeling import TransnormerForCausalLM, TransnormerModel, TransnormerPreTrainedModel

__all__ = [
    "PRESETS",
    "TransnormerCache",
    "TransnormerConfig",
    "TransnormerForCausalLM",
    "TransnormerModel",
    "TransnormerPreTrainedModel",
    "config_from_preset",
    "load_model",
    "register_model_classes",
]


def register_model_classes() -> None:
    """Register TransnormerConfig / TransnormerModel / TransnormerForCausalLM with transformers' Auto classes.

    Directories that name ``"model_type": "transnormer"`` (everything save_pretrained writes) then load through
    AutoConfig / AutoModelForCausalLM with our classes and no trust_remote_code prompt, even with an
    ``auto_map``. The official config.json has no model_type, which AutoConfig cannot resolve on its own:
    load those directories with ``load_model(dir)`` or ``TransnormerForCausalLM.from_pretrained(dir)``.
    """
    AutoConfig.register(TransnormerConfig.model_type, TransnormerConfig, exist_ok=True)
    AutoModel.register(TransnormerConfig, TransnormerModel, exist_ok=True)
    AutoModelForCausalLM.register(TransnormerConfig, TransnormerForCausalLM, exist_ok=True)


# Importing the model package is what makes the Auto classes know TransNormerLLM (and its tokenizers): every
# loading path imports it, while ``import tnlora`` alone stays light for the command line.
register_model_classes()
from tnlora.model.tokenizer import register_tokenizer_classes  # noqa: E402  (needs the classes above)

register_tokenizer_classes()
