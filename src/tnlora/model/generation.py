"""Greedy and multinomial generation that keeps the GPU fed between decode steps.

transformers' loop (``GenerationMixin._sample``) ends every step by reading on the host whether every row has
finished (``unfinished_sequences.max() == 0``). The host waits there for the step's kernels, and the GPU then
waits for the host to run the next step's Python (input preparation, the CUDA-graph replay's copies, the
logits processors, the stopping criteria) before it has work again.

:func:`overlapped_sample` takes the same steps in another order: once a step's tokens are chosen and the
device-side stopping criteria (eos, length) applied, the row flags and tokens go to the host by one
asynchronous copy, the next forward is launched, and only then does the host wait for that copy, apply the
host-side criteria (:class:`HostStoppingCriteria`), stream the tokens and decide, while the forward runs.
The tokens, the streamed pieces and the random draws are ``_sample``'s (the same operations in the same order
on the device; sampling of a step comes after the host has seen the previous one). On an H200 the decode step
went from 4.56 to 4.33 ms at 7B batch 1 and from 1.34 to 1.16 ms at 1B (benchmarks/RESULTS.md, "Decoding").
The cost: when every row ends before the length limit (an eos, a stop string), one forward has run whose
logits are never read, and it has advanced the cache. The loop therefore runs only where the cache is not
handed back (no ``return_dict_in_generate``, no cache passed in) and not under ``synced_gpus`` or assisted
decoding (:func:`overlap_applies`); ``_sample`` runs elsewhere.

Greedy decoding whose token choice and stopping a captured step can run (:func:`greedy_rule`: no logits
processor but the minimum-length ones, stopping by length, eos and :class:`HostStoppingCriteria`) goes further
where the model's step decoder offers it (``greedy_steps``, :mod:`tnlora.infer.decode_graph`): after the first
token, each step is one replay that runs the forward, chooses the token, applies eos and feeds the token to the
next step on the device; the host only launches it and reads the tokens one step behind. The tokens are the
ones the loop above chooses (the same operations on the same logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig
from transformers.generation import (
    EosTokenCriteria,
    LogitsProcessorList,
    MaxLengthCriteria,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

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


class HostStoppingCriteria(StoppingCriteria):
    """A stopping criterion that decides from the generated tokens on the host (e.g. by decoding text).

    Under :func:`overlapped_sample` it reads the tokens the loop brings to the host anyway, after the next
    forward has been launched, so it adds no device wait; called as a plain criterion (transformers' loop) it
    copies them itself."""

    def __init__(self, prompt_length: int) -> None:
        self.prompt_length = prompt_length

    def done_on_host(self, generated: Sequence[Sequence[int]]) -> list[bool]:
        """Per row: whether it is done, given its tokens after the prompt so far."""
        raise NotImplementedError

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        done = self.done_on_host(input_ids[:, self.prompt_length :].tolist())
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class GreedyRule:
    """What a greedy generate() call does after each forward, in the form a captured step runs it: the scores
    of ``eos`` set to -inf while the sequence is shorter than ``ban_below`` (the minimum-length processors),
    the argmax, and with ``stop_at_eos`` (EosTokenCriteria) finished rows continued with ``pad`` and a row
    finished once its token is in ``eos``."""

    eos: tuple[int, ...]
    pad: int
    ban_below: int
    stop_at_eos: bool


class GreedySteps(Protocol):
    """Greedy steps run on the device (a step decoder's ``greedy_steps``): ``step`` launches one (forward, token
    choice, stopping, the token fed to the next step) and queues its row flags and tokens to the host;
    ``receive`` returns the oldest step's not yet read, waiting for that step only; ``finish`` marks rows
    finished for the steps launched after it (rows a host-side criterion ended); ``close`` ends the steps,
    leaving the cache as the last step left it (whatever the steps held back written into it)."""

    def step(self) -> None: ...

    def receive(self) -> tuple[list[int], list[int]]: ...

    def finish(self, rows: list[int]) -> None: ...

    def close(self) -> None: ...


def _ids(tokens: Any) -> tuple[int, ...]:
    """Token ids (an int, a list or a tensor) as a sorted tuple."""
    if isinstance(tokens, Tensor):
        tokens = tokens.tolist()
    return tuple(sorted({int(t) for t in ([tokens] if isinstance(tokens, int) else tokens)}))


def greedy_rule(
    generation_config: GenerationConfig, logits_processor: LogitsProcessorList, stopping_criteria: StoppingCriteriaList
) -> GreedyRule | None:
    """The rule of this call when a captured step can choose its tokens, else None: greedy; processors only
    ``MinLengthLogitsProcessor`` / ``MinNewTokensLengthLogitsProcessor`` over the criteria's eos ids; criteria
    only max length (checked on the host), eos and :class:`HostStoppingCriteria`."""
    if generation_config.do_sample:
        return None
    eos: tuple[int, ...] | None = None
    for criterion in stopping_criteria:
        if type(criterion) is EosTokenCriteria:
            if eos is not None:
                return None
            eos = _ids(criterion.eos_token_id)
        elif not isinstance(criterion, HostStoppingCriteria) and type(criterion) is not MaxLengthCriteria:
            return None
    ban_below = 0
    for processor in logits_processor:
        if type(processor) is MinLengthLogitsProcessor:
            below = processor.min_length
        elif type(processor) is MinNewTokensLengthLogitsProcessor:
            below = processor.prompt_length_to_skip + processor.min_new_tokens
        else:
            return None
        if eos is None or _ids(processor.eos_token_id) != eos:
            return None
        ban_below = max(ban_below, below)
    if eos is None:
        return GreedyRule((), 0, 0, stop_at_eos=False)
    pad = generation_config._pad_token_tensor
    if pad is None:
        return None
    return GreedyRule(eos, int(pad), ban_below, stop_at_eos=True)


class _ToHost:
    """Each step's row flags and tokens on their way to the host: one asynchronous copy into pinned memory and
    an event right behind it, so that reading them waits for that copy only, not for the forward queued
    after it (a plain ``.tolist()`` would wait for the whole stream)."""

    def __init__(self, batch: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.buffer = torch.empty((2, batch), dtype=torch.long, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending: Tensor | None = None

    def send(self, unfinished: Tensor, tokens: Tensor) -> None:
        self.pending = torch.stack([unfinished, tokens])
        if self.cuda:
            self.buffer.copy_(self.pending, non_blocking=True)
            self.event.record()

    def receive(self) -> tuple[list[int], list[int]]:
        if self.cuda:
            self.event.synchronize()
            rows = self.buffer.tolist()
        else:
            rows = self.pending.tolist()
        return rows[0], rows[1]


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
    launched before the host reads the previous step's tokens and stop flags.

    Per step, in device order: logits processors, token choice, the device-side stopping criteria (eos, length),
    the copy of the row flags and tokens to the host, the next forward. Then the host reads the copy (the
    forward still running), applies :class:`HostStoppingCriteria` to the tokens, streams them, and decides
    whether to go on. Criteria of other kinds run where _sample runs them (before the next forward; one that
    reads device tensors on the host then waits for the step, as it would in _sample)."""
    pad_token_id = generation_config._pad_token_tensor
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    on_device = StoppingCriteriaList([c for c in stopping_criteria if not isinstance(c, HostStoppingCriteria)])
    on_host = [c for c in stopping_criteria if isinstance(c, HostStoppingCriteria)]
    max_length = stopping_criteria.max_length
    batch = input_ids.shape[0]
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
    to_host = _ToHost(batch, input_ids.device)
    generated: list[list[int]] = [[] for _ in range(batch)]
    rule = greedy_rule(generation_config, logits_processor, stopping_criteria)
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
        if len(on_device):
            unfinished = unfinished & ~on_device(input_ids, None)
        to_host.send(unfinished, tokens)
        at_limit = max_length is not None and input_ids.shape[1] >= max_length
        if not at_limit and rule is not None:  # the first token (rule is None after it)
            steps = _greedy_steps(model, rule, input_ids, tokens, unfinished, model_kwargs)
            if steps is not None:
                return _device_loop(steps, rule, input_ids, to_host, on_host, streamer, max_length)
            rule = None  # none offered: this loop for the rest of the call
        if not at_limit:
            # Queued behind the copy above: the host reads the copy below while this forward runs.
            inputs = model.prepare_inputs_for_generation(
                input_ids, next_sequence_length=1 if model_kwargs["use_cache"] else None, **model_kwargs
            )
            outputs = model(**inputs, return_dict=True)
        alive, chosen = to_host.receive()
        done = _keep(generated, chosen, on_host, streamer)
        if any(done):
            alive = [a and not d for a, d in zip(alive, done)]
            unfinished = unfinished & ~row_flags(done, unfinished.device)
        if at_limit or not any(alive):
            break
    if streamer is not None:
        streamer.end()
    return input_ids


def row_flags(flags: list[bool], device: torch.device) -> Tensor:
    """Per-row flags decided on the host, as a bool tensor on ``device``: from pinned memory on a GPU, so that the
    copy is queued behind the running step instead of waiting for it."""
    host = torch.tensor(flags, dtype=torch.bool)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _keep(
    generated: list[list[int]], chosen: list[int], on_host: list[HostStoppingCriteria], streamer: Any
) -> list[bool]:
    """Append a step's ``chosen`` tokens to each row of ``generated`` and stream them; the host-side criteria's
    verdict per row on them (all False when there are none)."""
    for row, token in zip(generated, chosen):
        row.append(token)
    if streamer is not None:
        streamer.put(torch.tensor(chosen))
    if not on_host:
        return [False] * len(generated)
    return [any(flags) for flags in zip(*(c.done_on_host(generated) for c in on_host))]


def _greedy_steps(
    model: Any, rule: GreedyRule, input_ids: Tensor, tokens: Tensor, unfinished: Tensor, model_kwargs: dict[str, Any]
) -> GreedySteps | None:
    """The device loop's steps from the model's step decoder, starting after ``tokens`` (the last chosen), or
    None where it offers none."""
    offer = getattr(getattr(model, "step_decoder", None), "greedy_steps", None)
    cache = next((model_kwargs[key] for key in _CACHE_KEYS if model_kwargs.get(key) is not None), None)
    if offer is None or cache is None or not model_kwargs.get("use_cache", True):
        return None
    return offer(model, cache, rule, tokens, unfinished, input_ids.shape[1])


def _device_loop(
    steps: GreedySteps,
    rule: GreedyRule,
    input_ids: Tensor,
    first: _ToHost,
    on_host: list[HostStoppingCriteria],
    streamer: Any,
    max_length: int | None,
) -> Tensor:
    """The rest of :func:`overlapped_sample` after its first token on device steps: launch the next step, then
    read the one before (``first``: the copy of the first token, still in flight), as the loop there does.
    Returns the sequences: ``input_ids`` (the prompt and the first token) and the tokens read after it.

    A row a host-side criterion ends is finished on the device from the next step launched, one step later than
    in the loop above (the step after the one read is already running); the token that step chose for the row
    is replaced here by the padding the loop above would have chosen."""
    length = input_ids.shape[1]
    read = first.receive
    generated: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    ended = [False] * len(generated)  # rows a host-side criterion ended
    try:
        while True:
            at_limit = max_length is not None and length >= max_length
            if not at_limit:
                steps.step()
                length += 1
            alive, chosen = read()
            read = steps.receive
            if rule.stop_at_eos:
                chosen = [rule.pad if end else token for token, end in zip(chosen, ended)]
            done = _keep(generated, chosen, on_host, streamer)
            new = [i for i, (now, before) in enumerate(zip(done, ended)) if now and not before]
            for i in new:
                ended[i] = True
            if new and rule.stop_at_eos:  # without eos the loop above pads no row either
                steps.finish(new)
            alive = [a and not end for a, end in zip(alive, ended)]
            if at_limit or not any(alive):
                break
    finally:
        steps.close()  # the cache whole however the loop ends (a streamer's exception included)
    if streamer is not None:
        streamer.end()
    new_tokens = torch.tensor([row[1:] for row in generated], dtype=input_ids.dtype)  # the first is in input_ids
    return torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=-1)


__all__ = [
    "GreedyRule",
    "GreedySteps",
    "HostStoppingCriteria",
    "greedy_rule",
    "overlap_applies",
    "overlapped_sample",
    "row_flags",
]
