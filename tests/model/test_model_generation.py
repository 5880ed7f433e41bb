"""Generation through transformers' GenerationMixin with the recurrent-state cache (modeling + cache)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
import torch
from transformers import GenerationMixin, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from tnl_helpers import build_model, left_padded, random_ids
from tnlora.model import TransnormerCache
from tnlora.model.generation import HostStoppingCriteria
from tnlora.model.modeling import CACHE_FIELD


def _greedy_by_recompute(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with a full forward over the whole sequence at every step (no cache)."""
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_cached_greedy_equals_full_recompute() -> None:
    model = build_model()
    prompt = random_ids(2, 12)
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, use_cache=False)
    manual = _greedy_by_recompute(model, prompt, 12)
    assert torch.equal(cached, manual) and torch.equal(uncached, manual)
    assert len(set(cached[:, 12:].flatten().tolist())) >= 4  # a non-degenerate continuation


def test_incremental_logits_equal_full_forward() -> None:
    model = build_model()
    ids = random_ids(2, 30)
    full = model(ids).logits
    cache = TransnormerCache(model.config)
    pieces = [model(ids[:, :10], past_key_values=cache).logits]
    for t in range(10, 20):  # one token at a time (recurrent step)
        pieces.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    pieces.append(model(ids[:, 20:], past_key_values=cache).logits)  # several new tokens at once
    assert cache.get_seq_length() == 30
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-10)


def test_left_padded_batch_generation_equals_each_row_alone() -> None:
    model = build_model()
    rows = [random_ids(1, 15, seed=1)[0], random_ids(1, 6, seed=2)[0], random_ids(1, 11, seed=3)[0]]
    ids, mask = left_padded(rows)
    batch = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    for i, row in enumerate(rows):
        alone = model.generate(
            row[None],
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        assert torch.equal(batch.sequences[i, ids.shape[1] :], alone.sequences[0, len(row) :])
        for step_batch, step_alone in zip(batch.logits, alone.logits):
            assert torch.allclose(step_batch[i], step_alone[0], atol=1e-10)


def test_beam_search_scores_equal_recomputed_log_probs() -> None:
    model = build_model()
    prompt = random_ids(1, 9)
    out = model.generate(
        prompt,
        num_beams=4,
        num_return_sequences=4,
        max_new_tokens=6,
        do_sample=False,
        length_penalty=0.0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert isinstance(out.past_key_values, TransnormerCache)
    assert len({tuple(s.tolist()) for s in out.sequences}) == 4
    eos = model.generation_config.eos_token_id
    for sequence, score in zip(out.sequences, out.sequences_scores):
        generated = sequence[9:].tolist()
        if eos in generated:  # a finished beam is padded after its EOS
            generated = generated[: generated.index(eos) + 1]
        tokens = torch.tensor(prompt[0].tolist() + generated)[None]
        log_probs = torch.log_softmax(model(tokens, use_cache=False).logits[0].double(), dim=-1)
        recomputed = sum(log_probs[8 + i, tok] for i, tok in enumerate(generated))
        assert abs(score.item() - recomputed.item()) < 1e-4


def test_sampling_is_reproducible_and_the_cache_changes_nothing() -> None:
    model = build_model()
    prompt = random_ids(2, 7)
    runs = []
    for use_cache in (True, True, False):
        torch.manual_seed(123)
        runs.append(
            model.generate(
                prompt,
                do_sample=True,
                top_k=40,
                temperature=0.9,
                max_new_tokens=10,
                eos_token_id=None,
                use_cache=use_cache,
            )
        )
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert runs[0].shape == (2, 17) and int(runs[0].max()) < 384


class _LetterTokenizer:
    """The part of a tokenizer a streamer uses: decode ids to one letter each."""

    def decode(self, ids: list[int] | torch.Tensor, **kwargs: object) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


def test_text_iterator_streamer_yields_the_generated_text() -> None:
    model = build_model()
    prompt = random_ids(1, 5)
    tokenizer = _LetterTokenizer()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    result: dict[str, torch.Tensor] = {}
    kwargs = {"max_new_tokens": 9, "do_sample": False, "eos_token_id": None, "streamer": streamer}
    thread = threading.Thread(target=lambda: result.update(out=model.generate(prompt, **kwargs)))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == tokenizer.decode(result["out"][0, 5:])
    assert len(text) == 9


def test_prepare_inputs_feeds_only_tokens_the_cache_has_not_seen() -> None:
    model = build_model()
    ids = random_ids(1, 12)
    cache = TransnormerCache(model.config)
    model(ids[:, :10], past_key_values=cache)
    inputs = model.prepare_inputs_for_generation(ids, past_key_values=cache, use_cache=True)
    assert torch.equal(inputs["input_ids"], ids[:, 10:])
    assert inputs[CACHE_FIELD] is cache  # the name the installed transformers uses
    fresh = model.prepare_inputs_for_generation(ids, past_key_values=TransnormerCache(model.config))
    assert torch.equal(fresh["input_ids"], ids)


def test_repeated_generate_calls_give_identical_tokens() -> None:
    # The official code kept LRPE offsets in the modules, so every generate() after the first drifted.
    model = build_model()
    prompt = random_ids(1, 10)
    first = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    model.generate(random_ids(1, 33, seed=5), max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None), first)


def test_generate_from_inputs_embeds_matches_input_ids() -> None:
    model = build_model()
    prompt = random_ids(1, 8)
    from_ids = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
    embeds = model.get_input_embeddings()(prompt)
    from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(from_embeds[0, -6:], from_ids[0, 8:])


def test_generate_keeps_fp32_states_of_the_documented_shapes() -> None:
    model = build_model(torch.bfloat16)
    out = model.generate(random_ids(3, 5), max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, TransnormerCache)
    assert cache.get_state(0).shape == (3, 2, 64, 32)  # layer 0: LRPE doubles q/k to 2·hd
    assert cache.get_state(1).shape == (3, 2, 32, 32)
    assert all(cache.get_state(i).dtype == torch.float32 for i in range(2))


def test_generate_continues_from_a_returned_cache() -> None:
    # A chat turn can resume from the state of the previous one instead of re-reading the history.
    model = build_model()
    kwargs = {"max_new_tokens": 4, "do_sample": False, "eos_token_id": None}
    first = model.generate(random_ids(1, 10), return_dict_in_generate=True, **kwargs)
    assert first.past_key_values.get_seq_length() == 13  # the last sampled token is not fed yet
    follow = torch.cat([first.sequences, random_ids(1, 5, seed=9)], dim=1)
    resumed = model.generate(follow, past_key_values=first.past_key_values, **kwargs)
    assert torch.equal(resumed, model.generate(follow, **kwargs))


# ---------------------------------------------------------------------------------------------------------------
# The overlapped loop (tnlora.model.generation) against transformers' own (GenerationMixin._sample, run through
# generate's custom_generate hook).


def _both_loops(model: torch.nn.Module, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's generate, transformers' _sample loop) from the same RNG state; the RNG states after both
    must agree too (the overlapped loop draws nothing more)."""
    torch.manual_seed(7)
    ours = model.generate(*args, **kwargs)
    after_ours = torch.get_rng_state()
    torch.manual_seed(7)
    theirs = model.generate(*args, custom_generate=GenerationMixin._sample, **kwargs)
    assert torch.equal(after_ours, torch.get_rng_state())
    return ours, theirs


def _eos_mid_reply(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> int:
    """A token that decoding row 0 with ``kwargs`` (seed 7) produces at its third step, with no eos: taken as
    the eos, it ends that row early (the steps before it do not depend on the eos id)."""
    torch.manual_seed(7)
    free = model.generate(ids, **{**kwargs, "max_new_tokens": 3, "eos_token_id": None})
    return int(free[0, -1])


@pytest.mark.parametrize("do_sample", [False, True])
def test_overlapped_loop_equals_transformers_loop(do_sample: bool) -> None:
    model = build_model()
    rows = [random_ids(1, 9, seed=1)[0], random_ids(1, 4, seed=2)[0], random_ids(1, 12, seed=3)[0]]
    ids, mask = left_padded(rows)
    kwargs = {
        "attention_mask": mask, "max_new_tokens": 10, "do_sample": do_sample, "repetition_penalty": 1.3,
        "pad_token_id": 0,
    }
    if do_sample:
        kwargs.update(temperature=0.9, top_k=40, top_p=0.95)
    eos = _eos_mid_reply(model, ids, **kwargs)
    ours, theirs = _both_loops(model, ids, eos_token_id=eos, **kwargs)
    assert torch.equal(ours, theirs)
    assert eos in ours[0, ids.shape[1] :].tolist()  # the eos path ran (the row then continues with padding)


def test_overlapped_loop_stops_at_an_eos_of_every_row_and_at_the_length_limit() -> None:
    model = build_model()
    ids = random_ids(1, 6, seed=4)
    eos = _eos_mid_reply(model, ids, do_sample=False)
    ended, reference = _both_loops(model, ids, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    assert torch.equal(ended, reference) and ended.shape[1] < 6 + 12 and int(ended[0, -1]) == eos
    one, one_reference = _both_loops(model, ids, max_new_tokens=1, do_sample=False, eos_token_id=None)
    assert torch.equal(one, one_reference) and one.shape == (1, 7)


class _Forwards:
    """Counts the model's forward calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, *_: object) -> None:
        self.count += 1


class _Recorder(StoppingCriteria):
    """A device-side criterion (never stops) noting how many forwards had run at each of its calls."""

    def __init__(self, forwards: _Forwards) -> None:
        self.forwards = forwards
        self.seen: list[int] = []

    def __call__(self, input_ids: torch.Tensor, scores: object, **kwargs: object) -> torch.Tensor:
        self.seen.append(self.forwards.count)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _HostRecorder(HostStoppingCriteria):
    """A host-side criterion stopping every row at its ``stop_at``-th token, noting the forwards run before."""

    def __init__(self, forwards: _Forwards, prompt_length: int, stop_at: int = 99) -> None:
        super().__init__(prompt_length)
        self.forwards, self.stop_at = forwards, stop_at
        self.seen: list[int] = []

    def done_on_host(self, generated: Sequence[Sequence[int]]) -> list[bool]:
        self.seen.append(self.forwards.count)
        return [len(row) >= self.stop_at for row in generated]


class _StreamRecorder(BaseStreamer):
    """Records each put (and the forwards run before it) and the end."""

    def __init__(self, forwards: _Forwards | None = None) -> None:
        self.forwards = forwards
        self.puts: list[list[int]] = []
        self.seen: list[int] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.flatten().tolist())
        self.seen.append(self.forwards.count if self.forwards else 0)

    def end(self) -> None:
        self.ended += 1


def test_the_next_forward_is_launched_before_the_host_reads_a_step() -> None:
    # What removes the host wait: the host reads step n's tokens (streamer, host-side criteria) while forward
    # n + 1 is queued; transformers' loop reads them with only forward n run. Device-side criteria are queued
    # before the forward in both. At the length limit no forward is launched.
    model = build_model()
    forwards = _Forwards(model)
    device_side, host_side, stream = _Recorder(forwards), _HostRecorder(forwards, 5), _StreamRecorder(forwards)
    model.generate(random_ids(1, 5), max_new_tokens=4, do_sample=False, eos_token_id=None, streamer=stream,
                   stopping_criteria=StoppingCriteriaList([device_side, host_side]))
    assert device_side.seen == [1, 2, 3, 4]
    assert host_side.seen == [2, 3, 4, 4] and stream.seen == [0, 2, 3, 4, 4]  # the prompt is put before the prefill
    forwards.count = 0
    host_side.seen, stream.seen = [], []
    model.generate(random_ids(1, 5), max_new_tokens=4, do_sample=False, eos_token_id=None, streamer=stream,
                   stopping_criteria=StoppingCriteriaList([host_side]), custom_generate=GenerationMixin._sample)
    assert host_side.seen == [1, 2, 3, 4]


def test_host_side_criteria_stop_rows_as_in_transformers_loop() -> None:
    model = build_model()
    forwards = _Forwards(model)
    ids, mask = left_padded([random_ids(1, 9, seed=1)[0], random_ids(1, 5, seed=2)[0]])
    kwargs = {"attention_mask": mask, "max_new_tokens": 10, "do_sample": False, "eos_token_id": 5, "pad_token_id": 0}
    ended = model.generate(ids, stopping_criteria=StoppingCriteriaList([_HostRecorder(forwards, 9, stop_at=3)]),
                           **kwargs)
    reference = model.generate(ids, stopping_criteria=StoppingCriteriaList([_HostRecorder(forwards, 9, stop_at=3)]),
                               custom_generate=GenerationMixin._sample, **kwargs)
    assert torch.equal(ended, reference) and ended.shape == (2, 9 + 3)


def test_overlapped_loop_streams_every_token_once_and_ends_the_stream() -> None:
    model = build_model()
    prompt = random_ids(1, 5)
    streamer = _StreamRecorder()
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, streamer=streamer)
    assert streamer.puts[0] == prompt[0].tolist()  # generate() puts the prompt, the loop one token a step
    assert [p for put in streamer.puts[1:] for p in put] == out[0, 5:].tolist()
    assert len(streamer.puts) == 7 and streamer.ended == 1


def test_cache_handed_back_runs_transformers_loop() -> None:
    # The overlapped loop's extra forward would leave a returned cache one token on: those calls run _sample.
    model = build_model()
    forwards = _Forwards(model)
    host_side = _HostRecorder(forwards, 5)
    out = model.generate(random_ids(1, 5), max_new_tokens=3, do_sample=False, eos_token_id=None,
                         return_dict_in_generate=True, stopping_criteria=StoppingCriteriaList([host_side]))
    assert host_side.seen == [1, 2, 3] and out.past_key_values.get_seq_length() == 7
    forwards.count, host_side.seen = 0, []
    follow = torch.cat([out.sequences, random_ids(1, 2, seed=3)], dim=1)
    host_side.prompt_length = follow.shape[1]
    model.generate(follow, past_key_values=out.past_key_values, max_new_tokens=3, do_sample=False,
                   eos_token_id=None, stopping_criteria=StoppingCriteriaList([host_side]))
    assert host_side.seen == [1, 2, 3] and out.past_key_values.get_seq_length() == 8 + 2 + 2

