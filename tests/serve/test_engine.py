"""serve/engine.py: the scheduler, slots, sampling and stops, on the tiny preset on the CPU (the static decode
step without a CUDA graph, the same buffers and code as the GPU path).

The reference is the model itself recomputing the whole sequence at every step in float64; the concurrency
properties are bitwise: a request's tokens alone and among others are the same list.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence

import pytest
import torch

from tnlora.model import load_model
from tnlora.model.loading import set_attention_impl
from tnlora.model.tokenizer import ByteTokenizer
from tnlora.serve.engine import Engine, EngineError, Event, Request, SamplingParams
from tnlora.serve.sessions import SessionStore

EOS = 2


def make_engine(dtype: torch.dtype = torch.float32, max_batch: int = 4, eos_ids: Sequence[int] = (EOS,),
                sessions: int = 0) -> Engine:  # fmt: skip
    model = load_model("tiny", dtype=dtype)
    store = SessionStore(torch.device("cpu"), sessions, sessions)
    return Engine(model, ByteTokenizer(), eos_ids=eos_ids, max_batch=max_batch, sessions=store).start()


class Waiter:
    """A sink that records a request's events and signals its end."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.finish_reason is not None:
            self.done.set()

    def wait(self) -> Event:
        assert self.done.wait(60), "the request did not finish"
        return self.events[-1]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)


def submit(engine: Engine, ids: list[int], params: SamplingParams, **kwargs) -> tuple[Request, Waiter]:
    waiter = Waiter()
    return engine.submit(ids, params, waiter, **kwargs), waiter


def run(engine: Engine, ids: list[int], params: SamplingParams, **kwargs) -> tuple[Request, Waiter]:
    request, waiter = submit(engine, ids, params, **kwargs)
    waiter.wait()
    return request, waiter


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 259) for _ in range(rng.randrange(1, 40))] for _ in range(count)]


@pytest.fixture(scope="module")
def engine() -> Engine:
    eng = make_engine(max_batch=4)
    yield eng
    eng.shutdown()


def test_greedy_tokens_equal_full_recompute_in_float64() -> None:
    engine = make_engine(torch.float64, max_batch=3, eos_ids=())
    try:
        model = engine.model
        for ids in prompts(3, seed=1):
            request, waiter = run(engine, ids, SamplingParams(max_tokens=12))
            want, seq = [], list(ids)
            with torch.no_grad():
                for _ in range(12):
                    # Over the tokenizer's vocabulary: the embedding's padding rows are never sampled.
                    token = int(model(torch.tensor([seq])).logits[0, -1, : len(ByteTokenizer())].argmax())
                    want.append(token)
                    seq.append(token)
            assert request.generated == want
            assert waiter.wait().finish_reason == "length"
    finally:
        engine.shutdown()


def test_greedy_output_is_the_same_alone_and_under_any_concurrency(engine: Engine) -> None:
    batch = prompts(10, seed=2)
    lengths = [5 + 3 * i for i in range(10)]
    alone = [run(engine, ids, SamplingParams(max_tokens=n))[0].generated for ids, n in zip(batch, lengths)]
    # All at once (more requests than slots: they queue, join and leave at different steps), in another order.
    order = list(range(10))
    random.Random(3).shuffle(order)
    together = {i: submit(engine, batch[i], SamplingParams(max_tokens=lengths[i])) for i in order}
    for i, (request, waiter) in together.items():
        waiter.wait()
        assert request.generated == alone[i], i
        assert len(request.generated) == lengths[i]
    assert engine.stats()["slots"]["active"] == 0


def test_seeded_sampling_is_reproducible_and_independent_of_concurrency(engine: Engine) -> None:
    ids = prompts(1, seed=4)[0]
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=7)
    first = run(engine, ids, params)[0].generated
    others = [submit(engine, p, SamplingParams(max_tokens=15, temperature=1.0)) for p in prompts(3, seed=5)]
    again, waiter = submit(engine, ids, params)
    waiter.wait()
    for _, w in others:
        w.wait()
    assert again.generated == first
    other_seed = run(engine, ids, SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=8))[0]
    assert other_seed.generated != first
    greedy = run(engine, ids, SamplingParams(max_tokens=20))[0].generated
    assert first != greedy  # the draws really sample


def test_top_p_near_zero_keeps_only_the_most_probable_token(engine: Engine) -> None:
    ids = prompts(1, seed=6)[0]
    greedy = run(engine, ids, SamplingParams(max_tokens=15))[0].generated
    nucleus = run(engine, ids, SamplingParams(max_tokens=15, temperature=1.5, top_p=1e-9, seed=1))[0].generated
    assert nucleus == greedy


def test_length_and_eos_finish_reasons_and_usage() -> None:
    probe = make_engine(eos_ids=())
    ids = prompts(1, seed=7)[0]
    try:
        tokens = run(probe, ids, SamplingParams(max_tokens=10))[0].generated
    finally:
        probe.shutdown()
    # An engine whose eos is the 4th greedy token stops there, with that token counted but not shown.
    eos = tokens[3]
    first = tokens.index(eos)
    engine = make_engine(eos_ids=(eos,))
    try:
        request, waiter = run(engine, ids, SamplingParams(max_tokens=10))
        last = waiter.wait()
        assert last.finish_reason == "stop"
        assert request.generated == tokens[: first + 1]
        assert last.usage.completion_tokens == first + 1 and last.usage.prompt_tokens == len(ids)
        assert waiter.text == ByteTokenizer().decode(tokens[:first], skip_special_tokens=True)
        request, waiter = run(engine, ids, SamplingParams(max_tokens=10, ignore_eos=True))
        assert waiter.wait().finish_reason == "length" and request.generated == tokens
    finally:
        engine.shutdown()


def test_a_stop_string_ends_the_reply_and_is_never_returned(engine: Engine) -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("Tell me a story about", add_special_tokens=False)
    full_request, full = run(engine, ids, SamplingParams(max_tokens=30, temperature=1.0, seed=3))
    text = full.text
    stop = text[10:13]
    assert len(stop) == 3 and text.index(stop) >= 1
    request, waiter = run(engine, ids, SamplingParams(max_tokens=30, temperature=1.0, seed=3, stop=(stop,)))
    last = waiter.wait()
    assert last.finish_reason == "stop"
    assert waiter.text == text[: text.index(stop)]
    assert stop not in waiter.text
    # The reply ends with the token that completed the stop string.
    assert request.generated == full_request.generated[: len(request.generated)]
    assert stop in tokenizer.decode(request.generated) and stop not in tokenizer.decode(request.generated[:-1])


def test_a_cancelled_request_leaves_its_slot_within_one_step(engine: Engine) -> None:
    request, _ = submit(engine, prompts(1, seed=8)[0], SamplingParams(max_tokens=100_000, ignore_eos=True))
    wait_until(lambda: len(request.generated) >= 5)
    request.cancel()
    at_cancel = len(request.generated)
    wait_until(lambda: request.done)
    # The scheduler checks the flag before taking each row's token: at most the step under way adds one.
    assert len(request.generated) <= at_cancel + 1
    assert engine.slots[request.slot] is None and engine.stats()["slots"]["active"] == 0


def test_a_failing_sink_or_prompt_does_not_stop_the_scheduler(engine: Engine) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("the consumer is gone")

    broken_request = engine.submit(prompts(1)[0], SamplingParams(max_tokens=50, ignore_eos=True), broken)
    # Token ids outside the vocabulary fail in the prefill: that request ends with an error event.
    _bad, waiter = submit(engine, [10_000], SamplingParams(max_tokens=5))
    last = waiter.wait()
    assert last.finish_reason == "error" and last.error
    ok, good = run(engine, prompts(1, seed=9)[0], SamplingParams(max_tokens=5))
    assert good.wait().finish_reason == "length" and len(ok.generated) == 5
    wait_until(lambda: broken_request.done)
    assert engine.running and engine.stats()["slots"]["active"] == 0


def test_prompts_read_in_one_round_each_get_their_slot_even_when_one_fails() -> None:
    """Requests admitted together are prefilled in one round; a failure sampling one's first token ends only
    that one, and the others decode exactly as they do alone."""
    engine = make_engine(max_batch=4)
    try:
        good = prompts(2, seed=3)
        alone = [run(engine, ids, SamplingParams(max_tokens=6, ignore_eos=True))[0].generated for ids in good]
        bad_prompt = [7, 7, 7]
        sample = engine._sample

        def failing(logits, request):
            if request.prompt_ids == bad_prompt:
                raise RuntimeError("sampling failed")
            return sample(logits, request)

        engine._sample = failing
        rounds = engine.stats()["prefill_rounds"]
        with engine._cond:  # the scheduler waits: all three land in one round
            waiters = [submit(engine, ids, SamplingParams(max_tokens=6, ignore_eos=True)) for ids in (good[0],
                       bad_prompt, good[1])]  # fmt: skip
        finals = [waiter.wait() for _, waiter in waiters]
        assert [f.finish_reason for f in finals] == ["length", "error", "length"]
        assert [waiters[0][0].generated, waiters[2][0].generated] == alone
        assert engine.stats()["prefill_rounds"] == rounds + 1
        assert engine.stats()["slots"]["active"] == 0
    finally:
        engine.shutdown()


def test_session_continues_from_the_stored_state_and_matches_a_full_prefill_in_float64() -> None:
    engine = make_engine(torch.float64, eos_ids=(), sessions=2)
    plain = make_engine(torch.float64, eos_ids=())
    try:
        turn1 = prompts(1, seed=10)[0]
        first, waiter = run(engine, turn1, SamplingParams(max_tokens=8), session_id="s")
        assert waiter.wait().usage.cached_tokens == 0
        fed = turn1 + first.generated  # the last token too: the step after the reply's end fed it
        assert engine.sessions.counts()["on_device"] == 1
        # The next turn repeats the conversation so far and adds new tokens: only those are prefilled.
        turn2 = [*turn1, *first.generated, 40, 41, 42]
        before = engine.stats()["prompt_tokens_prefilled"]
        second, waiter = run(engine, turn2, SamplingParams(max_tokens=8), session_id="s")
        assert waiter.wait().usage.cached_tokens == len(fed)
        assert engine.stats()["prompt_tokens_prefilled"] - before == len(turn2) - len(fed)
        assert second.generated == run(plain, turn2, SamplingParams(max_tokens=8))[0].generated
        # The reply sent back in other tokens: the checkpoint after the last prompt serves.
        turn3 = [*turn2, 50, *second.generated[1:], 43]
        third, waiter = run(engine, turn3, SamplingParams(max_tokens=8), session_id="s")
        assert waiter.wait().usage.cached_tokens == len(turn2)
        assert third.generated == run(plain, turn3, SamplingParams(max_tokens=8))[0].generated
        # Another conversation under the same id: a full prefill, and the same answer as without a session.
        other = prompts(1, seed=11)[0]
        third, waiter = run(engine, other, SamplingParams(max_tokens=8), session_id="s")
        assert waiter.wait().usage.cached_tokens == 0
        assert third.generated == run(plain, other, SamplingParams(max_tokens=8))[0].generated
        assert engine.sessions.hits == 2
    finally:
        engine.shutdown()
        plain.shutdown()


def test_cancelled_and_failed_requests_store_no_session() -> None:
    engine = make_engine(eos_ids=(), sessions=4)
    try:
        _bad, waiter = submit(engine, [10_000], SamplingParams(max_tokens=5), session_id="bad")
        waiter.wait()
        request, waiter = submit(engine, prompts(1)[0], SamplingParams(max_tokens=10_000), session_id="gone")
        wait_until(lambda: waiter.events)
        request.cancel()
        wait_until(lambda: request.done and engine.stats()["slots"]["active"] == 0)
        assert len(engine.sessions) == 0
    finally:
        engine.shutdown()


def test_submit_refuses_when_stopped_or_full_and_shutdown_ends_pending_requests() -> None:
    engine = make_engine(max_batch=1)
    engine.max_waiting = 2
    ids = prompts(1)[0]
    _running, first = submit(engine, ids, SamplingParams(max_tokens=100_000, ignore_eos=True))
    wait_until(lambda: first.events)
    waiting = [submit(engine, ids, SamplingParams(max_tokens=5)) for _ in range(2)]
    with pytest.raises(EngineError, match="too many requests waiting"):
        engine.submit(ids, SamplingParams(max_tokens=5), Waiter())
    engine.shutdown()
    assert first.wait().finish_reason == "error"
    assert all(w.wait().finish_reason == "error" for _, w in waiting)
    with pytest.raises(EngineError, match="not running"):
        engine.submit(ids, SamplingParams(max_tokens=5), Waiter())


@pytest.mark.parametrize(
    "kwargs", [{"max_tokens": 0}, {"max_tokens": 1, "temperature": -0.1}, {"max_tokens": 1, "top_p": 1.5},
               {"max_tokens": 1, "seed": 2**64}],
)
def test_sampling_params_refuse_bad_values(kwargs) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("steps", [-1, 1])
def test_engine_refuses_a_deferral_it_cannot_run(steps: int) -> None:
    with pytest.raises(ValueError, match="defer_steps must be 0"):
        Engine(load_model("tiny"), ByteTokenizer(), eos_ids=(EOS,), defer_steps=steps)


def test_deferral_stays_off_where_the_step_is_pytorch_s() -> None:
    # The CPU's decode kernel is the PyTorch step, which writes every step: asking changes nothing.
    engine = Engine(load_model("tiny"), ByteTokenizer(), eos_ids=(EOS,), defer_steps=4)
    assert engine.runner.kernel == "torch" and not engine.deferred


# ---------------------------------------------------------------------------------------------------------
# On a GPU: the slots are one CUDA-graph replay


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["torch", "auto"])
def test_cuda_graph_slots_are_concurrency_independent_and_match_the_eager_step(kernel: str) -> None:
    def cuda_engine(capture: bool) -> Engine:
        model = load_model("tiny", dtype=torch.float32, device="cuda")
        # The prefill on the chunked path: fla would first autotune its kernels for the tiny head shape (minutes,
        # and Triton's autotuner is not safe to run from two engines' threads at once).
        set_attention_impl(model, "chunked")
        model.config.decode_kernel = kernel
        store = SessionStore(torch.device("cuda"), 1, 1)
        return Engine(model, ByteTokenizer(), eos_ids=(), max_batch=4, sessions=store, capture=capture).start()

    graphs, eager = cuda_engine(True), cuda_engine(False)
    try:
        assert graphs.runner.graph is not None and eager.runner.graph is None
        batch = prompts(8, seed=12)
        alone = [run(graphs, ids, SamplingParams(max_tokens=6 + i))[0].generated for i, ids in enumerate(batch)]
        together = [submit(graphs, ids, SamplingParams(max_tokens=6 + i)) for i, ids in enumerate(batch)]
        for (request, waiter), want in zip(together, alone):
            waiter.wait()
            assert request.generated == want
        if graphs.runner.kernel == "torch":  # the torch step replays the eager step's operations exactly
            assert [run(eager, ids, SamplingParams(max_tokens=6 + i))[0].generated
                    for i, ids in enumerate(batch)] == alone  # fmt: skip
        # Sessions on the GPU, the least recent moved to pinned host memory and still continued from there.
        first, _ = run(graphs, batch[0], SamplingParams(max_tokens=5), session_id="a")
        run(graphs, batch[1], SamplingParams(max_tokens=5), session_id="b")
        assert graphs.sessions.counts()["on_host"] == 1
        follow = [*batch[0], *first.generated, 7, 8]
        request, waiter = run(graphs, follow, SamplingParams(max_tokens=5), session_id="a")
        assert waiter.wait().usage.cached_tokens == len(batch[0]) + len(first.generated)  # the reply was fed too
    finally:
        graphs.shutdown()
        eager.shutdown()


def test_a_request_cancelled_while_queued_leaves_the_queue() -> None:
    engine = make_engine(max_batch=1)
    try:
        busy, _ = submit(engine, prompts(1)[0], SamplingParams(max_tokens=100_000, ignore_eos=True))
        wait_until(lambda: busy.generated)
        queued, _ = submit(engine, prompts(1, seed=3)[0], SamplingParams(max_tokens=5))
        wait_until(lambda: engine.stats()["waiting"] == 1)
        queued.cancel()
        wait_until(lambda: engine.stats()["waiting"] == 0)
        assert queued.done and not queued.generated and engine.stats()["slots"]["active"] == 1
        busy.cancel()
        wait_until(lambda: busy.done)
    finally:
        engine.shutdown()
