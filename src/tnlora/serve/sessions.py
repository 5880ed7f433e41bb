"""Conversation states kept between requests, so that the next turn of a chat prefills only its new tokens.

A recurrent model's whole memory of a conversation is one fixed-size state per layer. After a reply the engine
stores, under the request's session id, the token ids fed into those states so far and the states themselves
(twice: after the reply, and after the prompt alone); the next request with that id whose prompt ids START
WITH stored ids continues from those states and prefills only the rest. Anything else (another conversation under the id, an edited history, a dropped
session) is a full prefill: answers never depend on what the store holds.

Memory is bounded by two least-recently-used tiers: ``device_capacity`` sessions on the model's device, then
``host_capacity`` more in host memory (pinned on a GPU machine, so that bringing one back is a fast copy);
past both, the least recently used session is dropped. On a CPU-only machine both tiers are host memory and a
move between them only relabels the session.

The store is not thread-safe: the engine's scheduler thread is its only user.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Checkpoint:
    """Token ids fed into the model and the states after them."""

    ids: list[int]
    states: list[Tensor]  # one [H, K, V] per layer (the states' own dtype, fp32 or fp64)


@dataclass
class SessionState:
    """A conversation's checkpoints, longest first: after the reply (the prompt and the reply's tokens but the
    last) and after the prompt alone. The second serves when the client sends the reply back in words that
    tokenize differently from the tokens generated (a tokenizer's non-canonical pieces): then the reply's
    re-encoding is prefilled with the new turn, and the answer is still the full prefill's."""

    checkpoints: list[Checkpoint]

    @property
    def ids(self) -> list[int]:
        return self.checkpoints[0].ids

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for c in self.checkpoints for s in c.states)


class SessionStore:
    """Session id → :class:`SessionState`, in two LRU tiers (device, then host), bounded in count."""

    def __init__(self, device: torch.device, device_capacity: int, host_capacity: int) -> None:
        if device_capacity < 0 or host_capacity < 0:
            raise ValueError("session capacities must be >= 0")
        self.device = device
        self.device_capacity = device_capacity
        self.host_capacity = host_capacity
        self._on_device: OrderedDict[str, SessionState] = OrderedDict()
        self._on_host: OrderedDict[str, SessionState] = OrderedDict()
        self.hits = 0  # requests that continued from a stored state
        self.misses = 0  # requests that named a session but needed a full prefill
        self.evicted = 0  # sessions moved from the device to the host tier
        self.dropped = 0  # sessions dropped for room

    @property
    def enabled(self) -> bool:
        return self.device_capacity + self.host_capacity > 0

    def counts(self) -> dict[str, int]:
        """Sessions per tier and the store's counters (for /health)."""
        return {
            "on_device": len(self._on_device),
            "on_host": len(self._on_host),
            "hits": self.hits,
            "misses": self.misses,
            "evicted_to_host": self.evicted,
            "dropped": self.dropped,
        }

    def __len__(self) -> int:
        return len(self._on_device) + len(self._on_host)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._on_device or session_id in self._on_host

    def take(self, session_id: str, prompt_ids: list[int]) -> Checkpoint | None:
        """The longest checkpoint of the stored session that ``prompt_ids`` continue (start with its ids and go
        further), the session removed from the store (the reply stores its successor); else None."""
        session = self._on_device.pop(session_id, None)
        if session is None:
            session = self._on_host.pop(session_id, None)
        for checkpoint in session.checkpoints if session is not None else ():
            stored = len(checkpoint.ids)
            if stored < len(prompt_ids) and prompt_ids[:stored] == checkpoint.ids:
                self.hits += 1
                return checkpoint
        self.misses += 1
        return None

    def put(self, session_id: str, checkpoints: list[Checkpoint]) -> None:
        """Store the checkpoints (device tensors the caller no longer uses), longest first, as the newest
        session under the id."""
        checkpoints = [c for c in checkpoints if c.ids]
        if not self.enabled or not checkpoints:
            return
        self._on_device.pop(session_id, None)
        self._on_host.pop(session_id, None)
        self._on_device[session_id] = SessionState(checkpoints)
        while len(self._on_device) > self.device_capacity:
            oldest, session = self._on_device.popitem(last=False)
            if self.host_capacity == 0:
                self.dropped += 1
                continue
            self._on_host[oldest] = self._to_host(session)
            self.evicted += 1
        while len(self._on_host) > self.host_capacity:
            self._on_host.popitem(last=False)
            self.dropped += 1

    def clear(self) -> None:
        self._on_device.clear()
        self._on_host.clear()

    def _to_host(self, session: SessionState) -> SessionState:
        """The session with its states in host memory: pinned copies on a GPU machine, unchanged on the CPU."""
        if self.device.type == "cpu":
            return session
        checkpoints = []
        for checkpoint in session.checkpoints:
            host = []
            for state in checkpoint.states:
                pinned = torch.empty(state.shape, dtype=state.dtype, pin_memory=torch.cuda.is_available())
                pinned.copy_(state)
                host.append(pinned)
            checkpoints.append(Checkpoint(checkpoint.ids, host))
        return SessionState(checkpoints)


__all__ = ["Checkpoint", "SessionState", "SessionStore"]
