"""Greedy and multinomial generation that keeps the GPU fed between decode steps.

transformers' loop (``GenerationMixin._sample``) ends every step by reading on the host whether every row has
finished (``unfinished_sequences.max() == 0``). The host waits there for the step's kernels, and the GPU then
waits for the host to run the next step's Python (input preparation, the CUDA-graph replay's copies, the
logits processors, the stopping criteria) before it has work again: about 0.6 ms of a 4.9 ms step at 7B batch
1, a third of the 1B step (benchmarks/RESULTS.md, "The decode step alone").

:func:`overlapped_sample` takes the same steps in another order: once a step's tokens are chosen (on the
device), the next forward is launched, and only then does the host evaluate the stopping criteria, stream the
tokens and read the finished flag, while that forward runs. The tokens, the streamed pieces and the random
draws are ``_sample``'s (the same operations in the same order on the device; sampling of a step comes after
the host has seen the previous one). The cost: when every row ends before the length limit (an eos, a stop
string), one forward has run whose logits are never read, and it has advanced the cache. The loop therefore
runs only where the cache is not handed back (no ``return_dict_in_generate``, no cache passed in) and not under
``synced_gpus`` or assisted decoding (:func:`overlap_applies`); ``_sample`` runs elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig
from transformers.generation import LogitsProcessorList, StoppingCriteriaList

# The names a cache travels under in generate's model kwargs (transformers 5.24 renamed past_key_values).
_CACHE_KEYS = ("past_key_values", "cache")


def _cache_from_caller(model_kwargs: dict[str, Any]) -> bool:
    """Whether generate() was given a cache (it marks those ``_is_user_defined``, as _sample checks; the one
    it makes itself is not)."""
    return any(getattr(model_kwargs.get(key), "_is_user_defined", False) for key in _CACHE_KEYS)


def overlap_applies(generation_config: GenerationConfig, synced_gpus: bool, model_kwargs: dict[str, Any]) -> bool:
    """Whether :func:`overlapped_sample` may run this call: nothing hands the cache back and no other process
    or assistant depends on the step count."""
    return not (
        generation_config.return_dict_in_generate
        or synced_gpus
        or generation_config.is_assistant
        or _cache_from_caller(model_kwargs)
    )


def overlapped_sample(
    model: Any,
    input_ids: Tensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    streamer: Any = None,
    **model_kwargs: Any,
) -> Tensor:
    """``GenerationMixin._sample`` for a decoder-only model, returning the sequences, with each step's forward
    launched before the host reads the previous step's tokens and stop flag."""
    pad_token_id = generation_config._pad_token_tensor
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    max_length = stopping_criteria.max_length
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    while True:
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
        del outputs  # the prefill's logits can be large
        scores = logits_processor(input_ids, logits)
        if generation_config.do_sample:
            tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if has_eos_stopping_criteria:  # finished rows continue with padding, as in _sample
            tokens = tokens * unfinished + pad_token_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        at_limit = max_length is not None and input_ids.shape[1] >= max_length
        if not at_limit:
            # The next forward is queued behind this step's tokens before the host waits for them below.
            inputs = model.prepare_inputs_for_generation(
                input_ids, next_sequence_length=1 if model_kwargs["use_cache"] else None, **model_kwargs
            )
            outputs = model(**inputs, return_dict=True)
        unfinished = unfinished & ~stopping_criteria(input_ids, None)
        if streamer is not None:
            streamer.put(tokens.cpu())
        if at_limit or not bool(unfinished.max()):
            break
    if streamer is not None:
        streamer.end()
    return input_ids


__all__ = ["overlap_applies", "overlapped_sample"]
