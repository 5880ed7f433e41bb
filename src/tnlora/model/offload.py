"""Offloaded checkpointing: each checkpointed layer's saved inputs wait in pinned CPU memory for the backward.

Non-reentrant checkpointing saves a layer's inputs (``save_for_backward``) outside its own saved-tensor hooks and
everything inside the layer under them, so hooks around the checkpoint call see exactly the inputs: the hidden
states [B, T, D] (and small masks, which stay where they are). ``torch.autograd.graph.save_on_cpu`` would move
them with a synchronous copy on the compute stream in the forward and bring them back on it when the recompute
asks, so both copies add to the step (1.2 s of an 11.1 s 7B step at 131,072 tokens). Here both run on a side
stream: the forward's copy to the host overlaps the next layers, and the backward, when it recomputes one
layer, already fetches the inputs of the layer it recomputes next. At most two layers' inputs are then on the
GPU at once (``train.memory.OFFLOADED_INPUTS_IN_FLIGHT``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Saved tensors smaller than this stay on the GPU: a copy of a mask costs more in launches than it frees.
MIN_OFFLOAD_BYTES = 1 << 20


class _Offloaded:
    """One saved tensor in pinned host memory, and its GPU copy once fetched (ready when ``ready`` has fired)."""

    __slots__ = ("__weakref__", "device", "fetched", "group", "host", "ready")

    def __init__(self, host: Tensor, device: torch.device, group: int) -> None:
        self.host, self.device, self.group = host, device, group
        self.fetched: Tensor | None = None
        self.ready: torch.cuda.Event | None = None


class InputOffload:
    """Saved-tensor hooks for the checkpointed layers of one model, and the side stream their copies run on.

    Each :meth:`checkpoint` call is one group (one layer); the backward visits the groups in reverse, so
    unpacking group g starts the copy of group g − 1 to the GPU."""

    def __init__(self, min_bytes: int = MIN_OFFLOAD_BYTES) -> None:
        self.min_bytes = min_bytes
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.groups: dict[int, list[weakref.ref[_Offloaded]]] = {}
        self.group = 0
        self.fetches = 0  # copies to the GPU started (prefetched or asked for)

    def checkpoint(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``torch.utils.checkpoint.checkpoint(function, *args, **kwargs)`` with its saved inputs offloaded."""
        self.group += 1
        # Groups whose tensors autograd has freed (their backward ran, or the graph was dropped) are forgotten.
        self.groups = {g: refs for g, refs in self.groups.items() if any(r() is not None for r in refs)}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(function, *args, **kwargs)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def _pack(self, tensor: Tensor) -> Tensor | _Offloaded:
        if not tensor.is_cuda or tensor.numel() * tensor.element_size() < self.min_bytes:
            return tensor
        stream = self._stream(tensor.device)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is written by then
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
        # The caller may free the tensor at once: its memory is not handed out again before the copy has read it.
        tensor.record_stream(stream)
        entry = _Offloaded(host, tensor.device, self.group)
        self.groups.setdefault(self.group, []).append(weakref.ref(entry))
        return entry

    def _fetch(self, entry: _Offloaded) -> None:
        """Start the entry's copy back to the GPU on the side stream (after its copy to the host there)."""
        if entry.fetched is not None:
            return
        current, stream = torch.cuda.current_stream(entry.device), self._stream(entry.device)
        tensor = torch.empty(entry.host.shape, dtype=entry.host.dtype, device=entry.device)
        stream.wait_stream(current)  # the block's earlier use on the compute stream is over
        with torch.cuda.stream(stream):
            tensor.copy_(entry.host, non_blocking=True)
            entry.ready = stream.record_event()
        tensor.record_stream(stream)
        entry.fetched = tensor
        self.fetches += 1

    def _unpack(self, packed: Tensor | _Offloaded) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        self._fetch(packed)
        for ref in self.groups.get(packed.group - 1, ()):  # the layer the backward recomputes next
            if (entry := ref()) is not None:
                self._fetch(entry)
        tensor, packed.fetched = packed.fetched, None  # a second unpack fetches again
        assert tensor is not None and packed.ready is not None
        torch.cuda.current_stream(packed.device).wait_event(packed.ready)
        return tensor


def offloaded_checkpoint(offload: InputOffload, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The checkpoint function installed on each layer (bound to the model's :class:`InputOffload`)."""
    return offload.checkpoint(function, *args, **kwargs)
