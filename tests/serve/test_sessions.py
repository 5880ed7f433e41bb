"""serve/sessions.py: a stored state is handed out only to a prompt that continues it, and memory stays bounded
(least recently used: device tier → host tier → dropped)."""

from __future__ import annotations

import pytest
import torch

from tnlora.serve.sessions import SessionStore


def states(value: float) -> list[torch.Tensor]:
    return [torch.full((2, 4, 3), value), torch.full((2, 4, 3), -value)]


def test_take_returns_the_session_only_to_a_prompt_that_continues_it() -> None:
    store = SessionStore(torch.device("cpu"), 2, 2)
    store.put("a", [1, 2, 3], states(1.0))
    assert store.take("a", [1, 2]) is None  # shorter: not a continuation
    assert "a" not in store  # a stale session is dropped, not kept beside the new reply's
    store.put("a", [1, 2, 3], states(1.0))
    assert store.take("a", [1, 2, 3]) is None  # nothing new to prefill
    store.put("a", [1, 2, 3], states(1.0))
    assert store.take("a", [1, 9, 3, 4]) is None  # another conversation under the id
    store.put("a", [1, 2, 3], states(1.0))
    session = store.take("a", [1, 2, 3, 4, 5])
    assert session is not None and session.ids == [1, 2, 3] and torch.equal(session.states[1], states(1.0)[1])
    assert "a" not in store  # taken: the reply stores its successor
    assert store.take("unknown", [1, 2]) is None
    assert store.counts()["hits"] == 1 and store.counts()["misses"] == 4


def test_least_recently_used_moves_to_the_host_tier_then_is_dropped() -> None:
    store = SessionStore(torch.device("cpu"), 2, 1)
    for i, name in enumerate("abc"):
        store.put(name, [i + 1, 7], states(float(i)))
    counts = store.counts()
    assert counts["on_device"] == 2 and counts["on_host"] == 1 and counts["evicted_to_host"] == 1
    assert store.take("a", [1, 7, 8]) is not None  # the oldest, from the host tier, still continues
    store.put("a", [1, 7, 8], states(5.0))  # now the newest: "b" goes to the host tier
    store.put("d", [4, 7], states(6.0))  # "c" to the host tier, "b" dropped (host tier holds one)
    assert "b" not in store and {"a", "c", "d"} <= {n for n in "abcd" if n in store}
    assert len(store) == 3 and store.counts()["dropped"] == 1


def test_on_the_cpu_the_host_tier_keeps_the_same_tensors() -> None:
    store = SessionStore(torch.device("cpu"), 1, 1)
    kept = states(3.0)
    store.put("a", [1], kept)
    store.put("b", [2], states(4.0))
    assert store.counts()["on_host"] == 1
    session = store.take("a", [1, 2])
    assert session is not None and session.states[0] is kept[0]


def test_zero_capacity_stores_nothing() -> None:
    store = SessionStore(torch.device("cpu"), 0, 0)
    store.put("a", [1, 2], states(1.0))
    assert len(store) == 0 and not store.enabled
    with pytest.raises(ValueError):
        SessionStore(torch.device("cpu"), -1, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host tier)")
def test_on_a_gpu_the_host_tier_is_pinned_host_memory() -> None:
    store = SessionStore(torch.device("cuda"), 1, 1)
    store.put("a", [1], [s.cuda() for s in states(1.0)])
    store.put("b", [2], [s.cuda() for s in states(2.0)])
    session = store.take("a", [1, 2])
    assert session is not None and session.states[0].device.type == "cpu" and session.states[0].is_pinned()
    assert torch.equal(session.states[0], states(1.0)[0])
