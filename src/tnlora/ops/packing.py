"""Packed-row boundaries: where each example of a packed batch starts, as one object passed to the attention.

A packed batch holds several examples per row; ``seq_ids`` [B, T] gives each token's example (a change of
value between neighbours starts a new example; ids may repeat across rows). The attention needs those
boundaries in three forms: per token (the chunked and recurrent paths mask by example start), as the rows laid
end to end (``cu_seqlens``, FlashAttention's convention, for fla's varlen kernels) and as a host copy of that
(fla plans its chunks on the host; reading the device copy back would stall the GPU). :class:`PackedRows`
holds all of them. The training collator builds it on the host, where the copy is free, and the data loader
moves it to the GPU with the batch (``to`` / ``pin_memory``); the model builds one per forward when it is
only given ``seq_ids`` (costing a host read on a GPU) and hands the same object to every layer.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor


def first_tokens(seq_ids: Tensor) -> Tensor:
    """Bool [B, T]: True where an example begins (every row start and every change of id)."""
    new = torch.ones_like(seq_ids, dtype=torch.bool)
    new[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    return new


def cu_seqlens_of(new: Tensor) -> Tensor:
    """cu_seqlens [N+1] from the flat example-start flags ``new`` [B·T] (starts, then the total length)."""
    return F.pad(new.nonzero().squeeze(1), (0, 1), value=new.shape[0])


def segment_starts(seq_ids: Tensor | None, cu_seqlens: Tensor | None, length: int) -> Tensor | None:
    """Position where each token's example starts, [B, T] (None when every row is one example).

    Computed with tensor ops only, so it never waits for the device.
    """
    if seq_ids is not None:
        new = first_tokens(seq_ids)
    elif cu_seqlens is not None:
        # Size T + 1 so that an empty last example (start == T) has somewhere harmless to land.
        new = torch.zeros(length + 1, dtype=torch.bool, device=cu_seqlens.device)
        new[cu_seqlens[:-1]] = True
        new = new[:length].unsqueeze(0)
    else:
        return None
    positions = torch.arange(length, device=new.device)
    return torch.where(new, positions, 0).cummax(dim=1).values


def _to_device(x: Tensor, device: torch.device, non_blocking: bool = False) -> Tensor:
    """``x`` on ``device``; a host tensor goes to a GPU from pinned memory without waiting (a blocking copy from
    pageable memory syncs the stream)."""
    if device.type == "cuda" and x.device.type == "cpu":
        source = x if x.is_pinned() else x.pin_memory()
        return source.to(device, non_blocking=True)
    return x.to(device, non_blocking=non_blocking)


_Plan = TypeVar("_Plan", "ScanSegments", "ScanChunks", "ExampleSpans")


def _plan_to(plan: _Plan, device: torch.device | str) -> _Plan:
    """A scan plan (its tensors on one device) on ``device``: each tensor moved by :func:`_to_device`, the plan
    itself where it is there already."""
    device = torch.device(device)
    fields = ((f.name, getattr(plan, f.name)) for f in dataclasses.fields(plan))
    tensors = {name: value for name, value in fields if isinstance(value, Tensor)}
    if all(value.device == device for value in tensors.values()):
        return plan
    return dataclasses.replace(plan, **{name: _to_device(value, device) for name, value in tensors.items()})


def _segment_openers(bounds: Tensor, segment_tokens: int) -> Tensor:
    """Indices of the examples bounded by ``bounds`` [N+1] (int64, host) that open a segment: the first non-empty
    example starting in each block of ``segment_tokens`` tokens that holds an example's start."""
    if segment_tokens < 1:
        raise ValueError(f"segment_tokens must be positive, got {segment_tokens}")
    examples = (bounds.diff() > 0).nonzero().squeeze(1)
    block = bounds[examples] // segment_tokens
    first = block.new_ones(min(1, block.shape[0]), dtype=torch.bool)
    return examples[torch.cat([first, block[1:] != block[:-1]])]


@dataclass(frozen=True)
class ScanSegments:
    """Packed examples grouped into segments of whole examples, for scans in which one program walks a segment's
    tokens chunk by chunk, the chunks running across the examples' boundaries and the state passing only within an
    example (:mod:`tnlora.ops.lightning_triton`): a few long walks a head instead of one or two chunks for each
    example of a ~100-token micro-batch, and no chunk rows past an example's end.

    Attributes:
        bounds: int32 [S+1], segment s is tokens ``bounds[s]`` to ``bounds[s+1]``.
        starts: int32 [T], where each token's example starts.
        count: S, on the host.
    """

    bounds: Tensor
    starts: Tensor
    count: int

    @classmethod
    def build(cls, cu_seqlens: Tensor, segment_tokens: int) -> ScanSegments:
        """The segments of the examples bounded by ``cu_seqlens`` [N+1] (a host tensor): each the examples that
        start in one block of ``segment_tokens`` tokens (so about that many tokens, or one longer example)."""
        bounds = cu_seqlens.to(device="cpu", dtype=torch.int64)
        lengths = bounds.diff()
        cuts = bounds[:-1][_segment_openers(bounds, segment_tokens)]
        edges = torch.cat([cuts, bounds[-1:]])
        starts = torch.repeat_interleave(bounds[:-1], lengths)
        return cls(edges.to(torch.int32), starts.to(torch.int32), cuts.shape[0])

    def to(self, device: torch.device | str) -> ScanSegments:
        """The segments on ``device``; host tensors go to a GPU from pinned memory without waiting for it."""
        return _plan_to(self, device)


@dataclass(frozen=True)
class ScanChunks:
    """Packed examples cut into chunks, each example on its own, and grouped into segments of whole examples, for
    scans in which one program walks a segment's chunks one after another and the state starts over at each
    example (the backward of :mod:`tnlora.ops.lightning_triton`): a few walks a head instead of one a ~100-token
    example, without the per-token masks of :class:`ScanSegments`' chunks across the examples' boundaries.

    Attributes:
        bounds: int32 [S+1], segment s is rows ``bounds[s]`` to ``bounds[s+1]`` of ``table``.
        table: int32 [C, 2], one row a chunk in token order: its first token and its example's end (the chunk's
            tokens are those from its start below both that end and start + ``chunk``).
        chunk: the tokens of a whole chunk.
        count: S, on the host.
    """

    bounds: Tensor
    table: Tensor
    chunk: int
    count: int

    @classmethod
    def build(cls, cu_seqlens: Tensor, segment_tokens: int, chunk: int) -> ScanChunks:
        """The chunks of ``chunk`` tokens (each example's last one short) of the examples bounded by ``cu_seqlens``
        [N+1] (a host tensor), in the segments :meth:`ScanSegments.build` makes of them."""
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        bounds = cu_seqlens.to(device="cpu", dtype=torch.int64)
        counts = (bounds.diff() + chunk - 1) // chunk  # chunks an example (none for an empty one)
        firsts = F.pad(counts.cumsum(0), (1, 0))  # each example's first chunk, then the total
        example = torch.repeat_interleave(torch.arange(counts.shape[0]), counts)
        within = torch.arange(int(firsts[-1])) - firsts[example]
        table = torch.stack([bounds[example] + within * chunk, bounds[example + 1]], dim=1)
        cuts = firsts[_segment_openers(bounds, segment_tokens)]
        edges = torch.cat([cuts, firsts[-1:]])
        return cls(edges.to(torch.int32), table.to(torch.int32), chunk, cuts.shape[0])

    def to(self, device: torch.device | str) -> ScanChunks:
        """The chunks on ``device``; host tensors go to a GPU from pinned memory without waiting for it."""
        return _plan_to(self, device)


@dataclass(frozen=True)
class ExampleSpans:
    """Each token's example as the span of tokens it covers, for kernels that take a block of tokens and the blocks
    its examples reach (:mod:`tnlora.ops.quadratic_triton`).

    Attributes:
        starts: int32 [T], where each token's example starts.
        ends: int32 [T], where it ends (one past its last token).
    """

    starts: Tensor
    ends: Tensor

    @classmethod
    def build(cls, cu_seqlens: Tensor) -> ExampleSpans:
        """The spans of the examples bounded by ``cu_seqlens`` [N+1] (a host tensor)."""
        bounds = cu_seqlens.to(device="cpu", dtype=torch.int64)
        lengths = bounds.diff()
        starts = torch.repeat_interleave(bounds[:-1], lengths)
        ends = torch.repeat_interleave(bounds[1:], lengths)
        return cls(starts.to(torch.int32), ends.to(torch.int32))

    def to(self, device: torch.device | str) -> ExampleSpans:
        """The spans on ``device``; host tensors go to a GPU from pinned memory without waiting for it."""
        return _plan_to(self, device)


@dataclass(frozen=True)
class PackedRows:
    """The example boundaries of a batch of packed rows.

    Attributes:
        seq_ids: [B, T] example id of each token (on the batch's device).
        cu_seqlens: [N+1] boundaries of the rows laid end to end (every row start and id change), same device.
        cu_seqlens_cpu: the same values on the host.
        row_first, row_last: [B] index (into the N examples) of each row's first and last example; a row's
            recurrent state enters its first example and leaves from its last.
    """

    seq_ids: Tensor
    cu_seqlens: Tensor
    cu_seqlens_cpu: Tensor
    row_first: Tensor
    row_last: Tensor

    @classmethod
    def from_seq_ids(cls, seq_ids: Tensor) -> PackedRows:
        """The boundaries of ``seq_ids``, computed where it lives (on a GPU the host copy is a device read)."""
        if seq_ids.dim() != 2:
            raise ValueError(f"seq_ids must be [B, T], got shape {tuple(seq_ids.shape)}")
        batch, length = seq_ids.shape
        new = first_tokens(seq_ids).reshape(-1)
        cu_seqlens = cu_seqlens_of(new)
        example = (new.cumsum(0) - 1).reshape(batch, length)
        return cls(seq_ids, cu_seqlens, cu_seqlens.cpu(), example[:, 0], example[:, -1])

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor, length: int) -> PackedRows:
        """One row (B = 1) of ``length`` tokens cut at ``cu_seqlens`` [N+1]."""
        positions = torch.arange(length, device=cu_seqlens.device)
        seq_ids = torch.searchsorted(cu_seqlens[1:], positions, right=True)[None]
        return cls.from_seq_ids(seq_ids)

    @property
    def device(self) -> torch.device:
        return self.seq_ids.device

    @functools.cached_property
    def longest_example(self) -> int:
        """The most tokens of one example, read from the host copy (no device access)."""
        return int(self.cu_seqlens_cpu.diff().max()) if self.num_examples > 0 else 0

    @functools.cached_property
    def mean_example_reach(self) -> float:
        """The length of a token's example, averaged over the tokens (Σ L² ÷ Σ L over the examples' lengths L),
        read from the host copy: what the quadratic form's work a token grows with."""
        lengths = self.cu_seqlens_cpu.diff().double()
        total = float(lengths.sum())
        return float((lengths * lengths).sum()) / total if total > 0 else 0.0

    @property
    def num_examples(self) -> int:
        """N, read from the host copy (no device access)."""
        return self.cu_seqlens_cpu.shape[0] - 1

    def scan_segments(self, segment_tokens: int) -> ScanSegments:
        """The examples laid end to end as :class:`ScanSegments` on the rows' device, built from the host copy
        once per ``segment_tokens`` and kept: every layer's forward (and a checkpointed layer's recompute) takes
        the same."""
        key = ("segments", segment_tokens)
        if key not in self._scans:
            self._scans[key] = ScanSegments.build(self.cu_seqlens_cpu, segment_tokens).to(self.device)
        return self._scans[key]

    def scan_chunks(self, segment_tokens: int, chunk: int) -> ScanChunks:
        """The examples laid end to end as :class:`ScanChunks` on the rows' device, built from the host copy once
        per (``segment_tokens``, ``chunk``) and kept: every layer's backward takes the same."""
        key = ("chunks", segment_tokens, chunk)
        if key not in self._scans:
            self._scans[key] = ScanChunks.build(self.cu_seqlens_cpu, segment_tokens, chunk).to(self.device)
        return self._scans[key]

    def example_spans(self) -> ExampleSpans:
        """The examples laid end to end as :class:`ExampleSpans` on the rows' device, built from the host copy once
        and kept for every layer."""
        key = ("spans",)
        if key not in self._scans:
            self._scans[key] = ExampleSpans.build(self.cu_seqlens_cpu).to(self.device)
        return self._scans[key]

    @functools.cached_property
    def _scans(self) -> dict[tuple, ScanSegments | ScanChunks | ExampleSpans]:
        return {}

    def starts(self) -> Tensor:
        """Position where each token's example starts, [B, T]."""
        return segment_starts(self.seq_ids, None, self.seq_ids.shape[1])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedRows:
        """The same boundaries on ``device`` (the host copy stays on the host). Called by the data loader's
        device placement (accelerate's ``send_to_device`` moves any object with a ``to`` method)."""
        device = torch.device(device)
        if device == self.device:
            return self

        def move(x: Tensor) -> Tensor:
            return _to_device(x, device, non_blocking)

        cu_seqlens = move(self.cu_seqlens_cpu) if self.cu_seqlens.device.type == "cpu" else self.cu_seqlens.to(device)
        return PackedRows(move(self.seq_ids), cu_seqlens, self.cu_seqlens_cpu, move(self.row_first), move(self.row_last))

    def pin_memory(self) -> PackedRows:
        """Pinned host copies (the data loader's ``pin_memory`` calls this on any object that has it)."""
        if self.device.type != "cpu":
            return self
        return PackedRows(
            self.seq_ids.pin_memory(),
            self.cu_seqlens.pin_memory(),
            self.cu_seqlens_cpu,
            self.row_first.pin_memory(),
            self.row_last.pin_memory(),
        )


def end_to_end(
    rows: PackedRows, q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """q, k, v [B, T, H, ·] laid end to end as one row [1, B·T, H, ·] (views where the strides allow), and the
    rows' states [B, H, K, V] placed at their first examples of the N (zeros elsewhere): the form of varlen
    kernels, which :func:`per_row` undoes."""
    batch, length, heads = q.shape[:3]
    if initial_state is not None:
        zeros = initial_state.new_zeros(rows.num_examples, *initial_state.shape[1:])
        initial_state = zeros.index_copy(0, rows.row_first, initial_state)
    flat = (x.reshape(1, batch * length, heads, x.shape[-1]) for x in (q, k, v))
    return *flat, initial_state


def per_row(rows: PackedRows, o: Tensor, final: Tensor | None, batch: int) -> tuple[Tensor, Tensor | None]:
    """A varlen kernel's output [1, B·T, H, V] back as [B, T, H, V], and each row's last example's state."""
    return o.reshape(batch, -1, *o.shape[2:]), final[rows.row_last] if final is not None else None


__all__ = ["ExampleSpans", "PackedRows", "ScanChunks", "ScanSegments", "cu_seqlens_of", "end_to_end", "first_tokens", "per_row", "segment_starts"]
