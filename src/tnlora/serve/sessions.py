"""Conversation states kept between requests, so that the next turn of a chat prefills only its new tokens.

A recurrent model's whole memory of a conversation is one fixed-size state per layer. After a reply the engine
stores, under the request's session id, the token ids fed into those states so far and the states themselves;
the next request with that id whose prompt ids START WITH the stored ids continues from the stored states and
prefills only the rest. Anything else (another conversation under the id, an edited history, a dropped
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
class SessionState:
    """What a conversation has fed into the model: its token ids and the states after them."""

    ids: list[int]
    states: list[Tensor]  # one [H, K, V] per layer (the states' own dtype, fp32 or fp64)

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states)


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

    def take(self, session_id: str, prompt_ids: list[int]) -> SessionState | None:
        """The stored session if ``prompt_ids`` continue it (start with its ids and go further), removed from
        the store (the reply stores its successor); else None, and a stale session under the id is dropped."""
        session = self._on_device.pop(session_id, None)
        if session is None:
            session = self._on_host.pop(session_id, None)
        if session is None:
            self.misses += 1
            return None
        stored = len(session.ids)
        if stored < len(prompt_ids) and prompt_ids[:stored] == session.ids:
            self.hits += 1
            return session
        self.misses += 1
        return None

    def put(self, session_id: str, ids: list[int], states: list[Tensor]) -> None:
        """Store ``states`` (device tensors the caller no longer uses) as the newest session under the id."""
        if not self.enabled or not ids:
            return
        self._on_device.pop(session_id, None)
        self._on_host.pop(session_id, None)
        self._on_device[session_id] = SessionState(list(ids), states)
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
        host = []
        for state in session.states:
            pinned = torch.empty(state.shape, dtype=state.dtype, pin_memory=torch.cuda.is_available())
            pinned.copy_(state)
            host.append(pinned)
        return SessionState(session.ids, host)


__all__ = ["SessionState", "SessionStore"]
