"""serve/sessions.py: a stored checkpoint is handed out only to a prompt that continues it (the longest one that
does), and memory stays bounded (least recently used: device tier → host tier → dropped)."""

from __future__ import annotations

import pytest
import torch

from tnlora.serve.sessions import Checkpoint, SessionStore


def states(value: float) -> list[torch.Tensor]:
    return [torch.full((2, 4, 3), value), torch.full((2, 4, 3), -value)]


def one(ids: list[int], value: float = 1.0) -> list[Checkpoint]:
    return [Checkpoint(ids, states(value))]


def test_take_returns_a_checkpoint_only_to_a_prompt_that_continues_it() -> None:
    store = SessionStore(torch.device("cpu"), 2, 2)
    store.put("a", one([1, 2, 3]))
    assert store.take("a", [1, 2]) is None  # shorter: not a continuation
    assert "a" not in store  # a stale session is dropped, not kept beside the new reply's
    store.put("a", one([1, 2, 3]))
    assert store.take("a", [1, 2, 3]) is None  # nothing new to prefill
    store.put("a", one([1, 2, 3]))
    assert store.take("a", [1, 9, 3, 4]) is None  # another conversation under the id
    store.put("a", one([1, 2, 3]))
    checkpoint = store.take("a", [1, 2, 3, 4, 5])
    assert checkpoint is not None and checkpoint.ids == [1, 2, 3]
    assert torch.equal(checkpoint.states[1], states(1.0)[1])
    assert "a" not in store  # taken: the reply stores its successor
    assert store.take("unknown", [1, 2]) is None
    assert store.counts()["hits"] == 1 and store.counts()["misses"] == 4


def test_the_longest_continued_checkpoint_is_taken() -> None:
    store = SessionStore(torch.device("cpu"), 2, 2)
    after_reply, after_prompt = Checkpoint([1, 2, 3, 7, 8], states(2.0)), Checkpoint([1, 2, 3], states(1.0))
    store.put("a", [after_reply, after_prompt])
    assert store.take("a", [1, 2, 3, 7, 8, 9]) is after_reply
    store.put("a", [after_reply, after_prompt])
    # The reply came back tokenized differently: the checkpoint after the prompt still serves.
    assert store.take("a", [1, 2, 3, 7, 5, 8, 9]) is after_prompt


def test_least_recently_used_moves_to_the_host_tier_then_is_dropped() -> None:
    store = SessionStore(torch.device("cpu"), 2, 1)
    for i, name in enumerate("abc"):
        store.put(name, one([i + 1, 7], float(i)))
    counts = store.counts()
    assert counts["on_device"] == 2 and counts["on_host"] == 1 and counts["evicted_to_host"] == 1
    assert store.take("a", [1, 7, 8]) is not None  # the oldest, from the host tier, still continues
    store.put("a", one([1, 7, 8], 5.0))  # now the newest: "b" goes to the host tier
    store.put("d", one([4, 7], 6.0))  # "c" to the host tier, "b" dropped (host tier holds one)
    assert "b" not in store and all(n in store for n in "acd")
    assert len(store) == 3 and store.counts()["dropped"] == 1


def test_on_the_cpu_the_host_tier_keeps_the_same_tensors() -> None:
    store = SessionStore(torch.device("cpu"), 1, 1)
    kept = one([1])
    store.put("a", kept)
    store.put("b", one([2], 4.0))
    assert store.counts()["on_host"] == 1
    checkpoint = store.take("a", [1, 2])
    assert checkpoint is not None and checkpoint.states[0] is kept[0].states[0]


def test_zero_capacity_stores_nothing() -> None:
    store = SessionStore(torch.device("cpu"), 0, 0)
    store.put("a", one([1, 2]))
    assert len(store) == 0 and not store.enabled
    with pytest.raises(ValueError):
        SessionStore(torch.device("cpu"), -1, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host tier)")
def test_on_a_gpu_the_host_tier_is_pinned_host_memory() -> None:
    store = SessionStore(torch.device("cuda"), 1, 1)
    store.put("a", [Checkpoint([1], [s.cuda() for s in states(1.0)])])
    store.put("b", [Checkpoint([2], [s.cuda() for s in states(2.0)])])
    checkpoint = store.take("a", [1, 2])
    assert checkpoint is not None and checkpoint.states[0].device.type == "cpu" and checkpoint.states[0].is_pinned()
    assert torch.equal(checkpoint.states[0], states(1.0)[0])
