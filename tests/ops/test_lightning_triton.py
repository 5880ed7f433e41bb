"""The one-launch lightning attention forward (``impl="triton"``, :mod:`tnlora.ops.lightning_triton`) against the
recurrence in fp32 and fp64, where the kernel runs (CUDA, or the CPU interpreter: ``TRITON_INTERPRET=1
PYTHONPATH=<dir holding triton> pytest -q tests/ops/test_lightning_triton.py``); bf16 against fla and the model's
prefill on CUDA; the choice of the forward-only implementation everywhere."""

from __future__ import annotations

import typing

import pytest
import torch
from kernel_device import DEVICE, INTERPRET, needs_kernel

from tnlora.choices import LIGHTNING_IMPLS
from tnlora.model import TransnormerConfig, TransnormerForCausalLM
from tnlora.ops import lightning
from tnlora.ops.lightning import lightning_attention
from tnlora.ops.packing import PackedRows, ScanChunks, ScanSegments
from tnlora.ops.select import kernels_for, scans_train_on, triton_available

DECAY = torch.tensor([-0.02, -0.7, -2.5])  # slow, fast and near-zero λ: chunk-boundary decays of 1 … e^-160


def _inputs(batch: int, length: int, heads: int, key_dim: int, value_dim: int, seed: int, dtype=torch.float32):
    """q, k, v as views of one projection output [B, T, (2K + V) · H] (the model's strides), SiLU'd q and k."""
    gen = torch.Generator().manual_seed(seed)
    width = heads * (2 * key_dim + value_dim)
    qkv = torch.randn(batch, length, width, generator=gen).to(DEVICE)
    q, k, v = qkv.split([heads * key_dim, heads * key_dim, heads * value_dim], dim=-1)
    q = torch.nn.functional.silu(q).reshape(batch, length, heads, key_dim)
    k = torch.nn.functional.silu(k).reshape(batch, length, heads, key_dim)
    v = v.reshape(batch, length, heads, value_dim)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _reference(q, k, v, decay, **kwargs):
    """The recurrence in fp64 on the inputs as given."""
    o, final = lightning_attention(
        q.double(), k.double(), v.double(), decay[: q.shape[2]].to(q.device), impl="recurrent",
        output_final_state=True, **kwargs,
    )  # fmt: skip
    return o, final


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err < tol, f"relative error {err:.2e} ≥ {tol:.0e}"


@pytest.fixture
def scans_for_packed_rows(monkeypatch) -> None:
    """Packed rows of short examples to the scans (the dispatcher takes them to the quadratic form by default:
    tests/ops/test_quadratic_triton.py)."""
    from tnlora.ops import quadratic_triton

    monkeypatch.setattr(quadratic_triton, "QUADRATIC_MAX_MEAN_TOKENS", 0)


@needs_kernel
@pytest.mark.parametrize(
    ("batch", "length", "heads", "key_dim", "value_dim", "with_state"),
    [
        (2, 150, 3, 32, 48, True),  # three chunks, the last partial; V not a multiple of the V block
        (1, 64, 2, 16, 16, False),  # exactly one chunk
        (3, 5, 1, 160, 32, True),  # a short prompt; q/k wider than 128 (LRPE's layer doubles them)
    ],
)
def test_forward_matches_the_recurrence_in_fp32(batch, length, heads, key_dim, value_dim, with_state) -> None:
    q, k, v = _inputs(batch, length, heads, key_dim, value_dim, seed=length)
    state = torch.randn(batch, heads, key_dim, value_dim, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    state = state if with_state else None
    o, final = lightning_attention(
        q, k, v, DECAY[:heads].to(DEVICE), impl="triton", initial_state=state, output_final_state=True
    )
    want_o, want_final = _reference(q, k, v, DECAY, initial_state=state)
    assert o.dtype == torch.float32 and final.dtype == torch.float32
    assert o.shape == want_o.shape and final.shape == want_final.shape
    _close(o, want_o, 1e-5)
    _close(final, want_final, 1e-5)


@needs_kernel
def test_examples_given_by_cu_seqlens_start_from_their_own_states() -> None:
    """Examples of 70, 0, 1, 129 and 100 tokens in one row: none sees another's state or decay; the empty one
    passes its initial state through."""
    q, k, v = _inputs(1, 300, 2, 32, 32, seed=3)
    cu = torch.tensor([0, 70, 70, 71, 200, 300], dtype=torch.int32, device=DEVICE)
    states = torch.randn(5, 2, 32, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    o, final = lightning_attention(
        q, k, v, DECAY[:2].to(DEVICE), impl="triton", cu_seqlens=cu, initial_state=states, output_final_state=True
    )
    want_o, want_final = _reference(q, k, v, DECAY, cu_seqlens=cu.long(), initial_state=states)
    _close(o, want_o, 1e-5)
    _close(final, want_final, 1e-5)
    assert torch.equal(final[1], states[1])


@needs_kernel
def test_packed_rows_keep_each_rows_state_and_boundaries() -> None:
    q, k, v = _inputs(2, 96, 2, 32, 32, seed=5)
    seq_ids = torch.tensor([[0] * 40 + [1] * 56, [2] * 10 + [3] * 86], device=DEVICE)
    state = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    rows = PackedRows.from_seq_ids(seq_ids)
    decay = DECAY[:2].to(DEVICE)
    o, final = lightning_attention(q, k, v, decay, impl="triton", rows=rows, initial_state=state, output_final_state=True)
    want_o, want_final = _reference(q, k, v, DECAY, seq_ids=seq_ids, initial_state=state)
    _close(o, want_o, 1e-5)
    _close(final, want_final, 1e-5)


@needs_kernel
def test_refuses_fp64_inputs_and_mixed_dtypes() -> None:
    q, k, v = _inputs(1, 8, 1, 16, 16, seed=7)
    with pytest.raises(ValueError, match="one fp32 or half dtype"):
        lightning_attention(q.double(), k.double(), v.double(), DECAY[:1].to(DEVICE), impl="triton")
    with pytest.raises(ValueError, match="one fp32 or half dtype"):
        lightning_attention(q, k, v.half(), DECAY[:1].to(DEVICE), impl="triton")


def _gradients(q, k, v, decay, impl, state=None, final_weight=None, **kwargs):
    """o, the final state and the gradients of Σ o·w + Σ final·final_weight w.r.t. q, k, v (and the state)."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    start = state.detach().requires_grad_() if state is not None else None
    o, final = lightning_attention(
        *leaves, decay, impl=impl, initial_state=start, output_final_state=final_weight is not None, **kwargs
    )
    weight = torch.randn(o.shape, generator=torch.Generator().manual_seed(11)).to(o)
    loss = (o * weight).sum()
    if final_weight is not None:
        loss = loss + (final * final_weight.to(final)).sum()
    grads = torch.autograd.grad(loss, leaves + ([start] if start is not None else []))
    return o, final, grads


def _use_launch(monkeypatch, launch: tuple[int, int, int, bool] | None) -> None:
    """The backward's launch (K block, V block, warps, dk and dv merged) at every width and lane count; None: the
    tree's (the tests' calls have few lanes: FEW_LANES_LAUNCH where a width's launch is merged)."""
    if launch is not None:
        from tnlora.ops import lightning_triton

        form = lightning_triton.GradLaunch(*launch)
        monkeypatch.setattr(lightning_triton, "GRAD_LAUNCHES", {128: form, 256: form})
        monkeypatch.setattr(lightning_triton, "MERGED_MIN_LANES", 0)


# The backward's launch forms: the tree's (at these tests' few lanes FEW_LANES_LAUNCH, dk and dv as two launches),
# merged, and 128-wide K blocks.
LAUNCHES = [None, (64, 32, 8, True), (128, 32, 8, False)]


@needs_kernel
def test_each_width_takes_the_launch_listed_for_it_or_the_next_wider() -> None:
    from tnlora.ops.lightning_triton import GRAD_LAUNCHES, grad_launch

    assert grad_launch(128) == GRAD_LAUNCHES[128] and grad_launch(256) == GRAD_LAUNCHES[256]
    assert grad_launch(32) == grad_launch(100) == GRAD_LAUNCHES[128]  # narrower: the narrowest listed
    assert grad_launch(160) == GRAD_LAUNCHES[256]  # between: the next wider
    assert grad_launch(512) == GRAD_LAUNCHES[256]  # wider than all: the widest
    assert GRAD_LAUNCHES[128].merged and not GRAD_LAUNCHES[256].merged


@needs_kernel
def test_a_backward_walking_scan_chunks_takes_the_segmented_launches() -> None:
    from tnlora.ops.lightning_triton import SEGMENTED_LAUNCHES, grad_launch

    assert grad_launch(128, segmented=True) == SEGMENTED_LAUNCHES[128] != grad_launch(128)
    assert not SEGMENTED_LAUNCHES[128].merged  # the merged scan lost there on an H100
    assert grad_launch(160, 8, segmented=True) == SEGMENTED_LAUNCHES[256]


@needs_kernel
def test_few_lanes_take_two_launches_where_the_width_s_launch_is_merged() -> None:
    from tnlora.ops.lightning_triton import FEW_LANES_LAUNCH, GRAD_LAUNCHES, MERGED_MIN_LANES, grad_launch

    assert not FEW_LANES_LAUNCH.merged
    assert grad_launch(128, 32) == grad_launch(128, MERGED_MIN_LANES - 1) == FEW_LANES_LAUNCH
    assert grad_launch(128, MERGED_MIN_LANES) == grad_launch(128, None) == GRAD_LAUNCHES[128]
    assert grad_launch(256, 8) == GRAD_LAUNCHES[256]  # not merged: kept


@needs_kernel
def test_the_backward_is_told_the_lanes_of_its_call(monkeypatch, scans_for_packed_rows) -> None:
    """lanes = heads × tokens ÷ the longest example, from packed rows' host boundaries or the unpacked shape; None
    where only cu_seqlens (a device tensor) gives the examples."""
    from tnlora.ops import lightning_triton

    seen: list[int | None] = []
    real = lightning_triton.grad_launch

    def spy(key_dim: int, lanes: int | None = None, segmented: bool = False):
        seen.append(lanes)
        return real(key_dim, lanes, segmented)

    monkeypatch.setattr(lightning_triton, "grad_launch", spy)
    decay = DECAY[:2].to(DEVICE)
    q, k, v = _inputs(1, 128, 2, 16, 16, seed=21)
    one = torch.zeros(1, 128, dtype=torch.long, device=DEVICE)
    pairs = torch.arange(128, device=DEVICE).div(2, rounding_mode="floor")[None]
    _gradients(q, k, v, decay, "triton", rows=PackedRows.from_seq_ids(one))
    _gradients(q, k, v, decay, "triton", rows=PackedRows.from_seq_ids(pairs))
    _gradients(q, k, v, decay, "triton", cu_seqlens=torch.tensor([0, 64, 128], device=DEVICE))
    q, k, v = _inputs(3, 40, 2, 16, 16, seed=22)
    _gradients(q, k, v, decay, "triton")
    assert seen == [2, 128, None, 6]


@needs_kernel
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize(
    ("batch", "length", "heads", "key_dim", "value_dim", "with_states"),
    [
        (2, 150, 3, 32, 48, False),  # three chunks, the last partial; V not a multiple of dv's block
        (1, 64, 2, 16, 16, True),  # exactly one chunk; the states' gradients in and out
        (2, 37, 1, 160, 40, True),  # q/k wider than one K block of dq / dk (LRPE's layer doubles them)
    ],
)
def test_gradients_match_the_recurrence_in_fp32(
    monkeypatch, batch, length, heads, key_dim, value_dim, with_states, launch
) -> None:
    """dq, dk, dv (and the initial state's gradient, with the final state's own gradient flowing back) against
    autograd through the fp64 recurrence, in each launch form of the backward."""
    _use_launch(monkeypatch, launch)
    q, k, v = _inputs(batch, length, heads, key_dim, value_dim, seed=length + 1)
    gen = torch.Generator().manual_seed(2)
    state = torch.randn(batch, heads, key_dim, value_dim, generator=gen).to(DEVICE) if with_states else None
    final_weight = torch.randn(batch, heads, key_dim, value_dim, generator=gen).to(DEVICE) if with_states else None
    decay = DECAY[:heads].to(DEVICE)
    o, final, grads = _gradients(q, k, v, decay, "triton", state, final_weight)
    want_o, want_final, want = _gradients(
        q.double(), k.double(), v.double(), decay, "recurrent",
        state.double() if state is not None else None, final_weight,
    )  # fmt: skip
    assert len(grads) == len(want) == (4 if with_states else 3)
    _close(o, want_o, 1e-5)
    for got, expected in zip(grads, want, strict=True):
        assert got.shape == expected.shape
        _close(got, expected, 1e-5)
    if with_states:
        _close(final, want_final, 1e-5)


@needs_kernel
@pytest.mark.parametrize("merged", [False, True])
def test_gradients_of_examples_given_by_cu_seqlens_with_an_empty_one(monkeypatch, merged: bool) -> None:
    """Examples of 30, 0 and 65 tokens with their own states: the empty one's initial-state gradient is its final
    state's own gradient passed through; the others' equal the recurrence's. ``merged``: dk and dv from one reverse
    scan holding the whole state gradient instead of two."""
    _use_launch(monkeypatch, (64, 32, 4, merged))
    q, k, v = _inputs(1, 95, 2, 32, 24, seed=14)
    cu = torch.tensor([0, 30, 30, 95], device=DEVICE)
    gen = torch.Generator().manual_seed(15)
    state = torch.randn(3, 2, 32, 24, generator=gen).to(DEVICE)
    final_weight = torch.randn(3, 2, 32, 24, generator=gen).to(DEVICE)
    decay = DECAY[:2].to(DEVICE)
    _, _, grads = _gradients(q, k, v, decay, "triton", state, final_weight, cu_seqlens=cu)
    _, _, want = _gradients(
        q.double(), k.double(), v.double(), decay, "recurrent", state.double(), final_weight, cu_seqlens=cu
    )
    for got, expected in zip(grads, want, strict=True):
        _close(got, expected, 1e-5)
    torch.testing.assert_close(grads[3][1], final_weight[1])


@needs_kernel
def test_gradients_of_packed_rows_stay_within_each_example() -> None:
    """Packed rows (the model's training batches): examples of 40 / 56 and 10 / 86 / 0 tokens, each row's state
    entering its first example; the gradients equal the recurrence's, so none crosses a boundary."""
    q, k, v = _inputs(2, 96, 2, 32, 32, seed=12)
    seq_ids = torch.tensor([[0] * 40 + [1] * 56, [2] * 10 + [3] * 86], device=DEVICE)
    state = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    decay = DECAY[:2].to(DEVICE)
    _, _, grads = _gradients(q, k, v, decay, "triton", state, rows=PackedRows.from_seq_ids(seq_ids))
    _, _, want = _gradients(
        q.double(), k.double(), v.double(), decay, "recurrent", state.double(), seq_ids=seq_ids
    )
    for got, expected in zip(grads, want, strict=True):
        _close(got, expected, 1e-5)
    # q of the second row's first example only sees its own 10 tokens: its gradient is zero past them
    assert torch.count_nonzero(grads[0][1, 10:]) > 0 and torch.count_nonzero(grads[3]) > 0


def test_scan_segments_group_whole_examples_by_where_they_start() -> None:
    """Examples of 5, 0, 70 and 64 tokens and 1 token, segments of 64 tokens: the examples that start in one block
    of 64 tokens (0 and 5; 75; 139), a long one running past its block; each token's example start."""
    cu = torch.tensor([0, 5, 5, 75, 139, 140])
    segments = ScanSegments.build(cu, 64)
    assert segments.bounds.dtype == segments.starts.dtype == torch.int32
    assert segments.bounds.tolist() == [0, 75, 139, 140] and segments.count == 3
    assert segments.starts.tolist() == [0] * 5 + [5] * 70 + [75] * 64 + [139]
    assert ScanSegments.build(cu, 1).bounds.tolist() == [0, 5, 75, 139, 140]
    assert ScanSegments.build(cu, 1000).bounds.tolist() == [0, 140]
    assert ScanSegments.build(torch.tensor([0]), 64).count == 0
    with pytest.raises(ValueError, match="must be positive"):
        ScanSegments.build(cu, 0)


def test_packed_rows_keep_their_scan_segments() -> None:
    rows = PackedRows.from_seq_ids(torch.tensor([[0] * 40 + [1] * 30, [2] * 70]))
    segments = rows.scan_segments(64)
    assert rows.scan_segments(64) is segments and rows.scan_segments(32) is not segments
    assert segments.bounds.tolist() == [0, 70, 140] and rows.scan_segments(32).bounds.tolist() == [0, 40, 70, 140]


# Packed examples walked a segment at a time: lengths around the fp32 chunk (32 tokens), a 1-token example, one
# of several chunks, runs of short ones inside one chunk.
SEGMENTED_LENGTHS = (1, 31, 32, 33, 5, 64, 2, 97, 3, 3, 40, 1, 20)


@needs_kernel
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("segment_tokens", [1, 70, 1000])
@pytest.mark.parametrize("backward", ["examples", "chunks"])
def test_examples_walked_a_segment_at_a_time_match_the_recurrence(
    monkeypatch, launch, segment_tokens, backward
) -> None:
    """o of packed examples walked by segments in the forward (a program walking several examples chunk by chunk
    across their boundaries, the state passing only within an example; one example a segment, a few, all), and the
    gradients of that call, against autograd through the fp64 recurrence, in each launch form of the backward:
    one example a program, or the segments' examples one after another, each cut into chunks on its own."""
    from tnlora.ops.lightning_triton import chunk_tokens, triton_attention

    _use_launch(monkeypatch, launch)
    cu = torch.tensor([0, *torch.tensor(SEGMENTED_LENGTHS).cumsum(0).tolist()])
    q, k, v = _inputs(1, int(cu[-1]), 2, 32, 24, seed=31)
    decay = DECAY[:2].to(DEVICE)
    segments = ScanSegments.build(cu, segment_tokens).to(DEVICE)
    assert segments.count == {1: len(SEGMENTED_LENGTHS), 70: 5, 1000: 1}[segment_tokens]
    chunks = ScanChunks.build(cu, segment_tokens, chunk_tokens(q.dtype)).to(DEVICE) if backward == "chunks" else None
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o, final = triton_attention(
        *leaves, decay, cu.to(DEVICE), lanes=segments.count * 2, segments=segments, chunks=chunks
    )
    assert final is None
    weight = torch.randn(o.shape, generator=torch.Generator().manual_seed(11)).to(o)
    grads = torch.autograd.grad((o * weight).sum(), leaves)
    want_o, _, want = _gradients(q.double(), k.double(), v.double(), decay, "recurrent", cu_seqlens=cu.to(DEVICE))
    _close(o, want_o, 1e-5)
    for got, expected in zip(grads, want, strict=True):
        _close(got, expected, 1e-5)


def test_scan_chunks_cut_each_example_on_its_own() -> None:
    """Examples of 5, 0, 70 and 64 tokens and 1 token in chunks of 32: each example's chunks from its own start
    (70 tokens: 32, 32, 6), each with its example's end; segments of 64 tokens as :class:`ScanSegments` cuts them,
    as rows of the table."""
    cu = torch.tensor([0, 5, 5, 75, 139, 140])
    chunks = ScanChunks.build(cu, 64, 32)
    assert chunks.table.dtype == chunks.bounds.dtype == torch.int32 and chunks.chunk == 32
    assert chunks.table.tolist() == [[0, 5], [5, 75], [37, 75], [69, 75], [75, 139], [107, 139], [139, 140]]
    assert chunks.bounds.tolist() == [0, 4, 6, 7] and chunks.count == 3
    assert ScanChunks.build(cu, 1, 32).bounds.tolist() == [0, 1, 4, 6, 7]
    assert ScanChunks.build(cu, 1000, 64).table.tolist() == [[0, 5], [5, 75], [69, 75], [75, 139], [139, 140]]
    empty = ScanChunks.build(torch.tensor([0]), 64, 32)
    assert empty.count == 0 and empty.table.shape == (0, 2)
    with pytest.raises(ValueError, match="must be positive"):
        ScanChunks.build(cu, 64, 0)
    rows = PackedRows.from_seq_ids(torch.tensor([[0] * 40 + [1] * 30, [2] * 70]))
    assert rows.scan_chunks(64, 32) is rows.scan_chunks(64, 32) and rows.scan_chunks(64, 64) is not None
    assert rows.scan_chunks(64, 32).bounds.tolist() == [0, 3, 6]  # 40 + 30 tokens: 2 + 1 chunks; 70: 3


def _record_argument(monkeypatch, name: str, position: int, keyword: str) -> tuple[list[object], typing.Callable]:
    """``lightning_triton.<name>`` wrapped so that each call's argument ``keyword`` (or its ``position``-th) is
    recorded: (the arguments seen, the real function)."""
    from tnlora.ops import lightning_triton

    seen: list[object] = []
    real = getattr(lightning_triton, name)

    def spy(*args, **kwargs):
        seen.append(args[position] if len(args) > position else kwargs.get(keyword))
        return real(*args, **kwargs)

    monkeypatch.setattr(lightning_triton, name, spy)
    return seen, real


@needs_kernel
def test_the_dispatcher_walks_packed_rows_without_states_by_segments(monkeypatch, scans_for_packed_rows) -> None:
    """Packed rows without states take the rows' scan segments; with an initial state or a final state returned,
    the examples one a program."""
    from tnlora.ops import lightning_triton

    seen, real = _record_argument(monkeypatch, "triton_forward", 7, "segments")
    q, k, v = _inputs(2, 70, 2, 16, 16, seed=32)
    rows = PackedRows.from_seq_ids(torch.tensor([[0] * 20 + [1] * 50, [2] * 3 + [3] * 67], device=DEVICE))
    decay = DECAY[:2].to(DEVICE)
    with torch.no_grad():
        o, _ = lightning_attention(q, k, v, decay, rows=rows, impl="triton")
        lightning_attention(q, k, v, decay, rows=rows, impl="triton", output_final_state=True)
    assert seen[0] is rows.scan_segments(lightning_triton.SEGMENT_TOKENS)
    assert seen[1] is None
    want, _ = lightning_attention(q.double(), k.double(), v.double(), decay, rows=rows, impl="recurrent")
    _close(o, want, 1e-5)
    with pytest.raises(ValueError, match="no initial state"):
        real(q[:1], k[:1], v[:1], decay, None, None, True, seen[0])


@needs_kernel
def test_by_default_the_backward_walks_one_example_a_program(monkeypatch, scans_for_packed_rows) -> None:
    """``BACKWARD_SEGMENT_TOKENS`` is 0 (the walk by chunks lost its one training pair): training on packed rows
    without states passes no chunks, and the forward still walks the rows' segments."""
    from tnlora.ops import lightning_triton

    assert lightning_triton.BACKWARD_SEGMENT_TOKENS == 0
    chunks, _ = _record_argument(monkeypatch, "triton_attention", 9, "chunks")
    segments, _ = _record_argument(monkeypatch, "triton_attention", 8, "segments")
    q, k, v = _inputs(1, 70, 2, 16, 16, seed=34)
    rows = PackedRows.from_seq_ids(torch.tensor([[0] * 20 + [1] * 50], device=DEVICE))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    lightning_attention(*leaves, DECAY[:2].to(DEVICE), rows=rows, impl="triton")
    assert chunks == [None] and segments[0] is rows.scan_segments(lightning_triton.SEGMENT_TOKENS)


@needs_kernel
def test_the_dispatcher_walks_packed_rows_without_states_by_chunks_in_the_backward(
    monkeypatch, scans_for_packed_rows
) -> None:
    """Packed rows without states that train take the rows' scan chunks for the backward (of the dtype's chunk);
    with an initial state, or without gradients, none; the gradients through the chunks equal the recurrence's."""
    from tnlora.ops import lightning_triton

    seen, _ = _record_argument(monkeypatch, "triton_attention", 9, "chunks")
    monkeypatch.setattr(lightning_triton, "BACKWARD_SEGMENT_TOKENS", 64)
    q, k, v = _inputs(2, 70, 2, 16, 16, seed=33)
    rows = PackedRows.from_seq_ids(torch.tensor([[0] * 20 + [1] * 50, [2] * 3 + [3] * 67], device=DEVICE))
    decay = DECAY[:2].to(DEVICE)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o, _ = lightning_attention(*leaves, decay, rows=rows, impl="triton")
    state = torch.zeros(2, 2, 16, 16, device=DEVICE, requires_grad=True)
    lightning_attention(*leaves, decay, rows=rows, impl="triton", initial_state=state)
    assert seen[0] is rows.scan_chunks(64, lightning_triton.chunk_tokens(q.dtype)) and seen[0].count == 2
    assert seen[1] is None
    weight = torch.randn(o.shape, generator=torch.Generator().manual_seed(11)).to(o)  # _gradients' weight
    grads = torch.autograd.grad((o * weight).sum(), leaves)
    want_o, _, want = _gradients(q.double(), k.double(), v.double(), decay, "recurrent", seq_ids=rows.seq_ids)
    _close(o, want_o, 1e-5)
    for got, expected in zip(grads, want, strict=True):
        _close(got, expected, 1e-5)
    with pytest.raises(ValueError, match="no initial state"):
        lightning_triton.triton_backward(q[:1], k[:1], v[:1], decay, v[:1], initial_state=state[:1], chunks=seen[0])
    with pytest.raises(ValueError, match="chunks of"):
        lightning_triton.triton_backward(
            q[:1], k[:1], v[:1], decay, v[:1], chunks=ScanChunks.build(rows.cu_seqlens_cpu, 64, 7).to(DEVICE)
        )


TINY = {
    "decoder_embed_dim": 64,
    "hidden_dim": 64,
    "decoder_layers": 2,
    "decoder_attention_heads": 2,
    "glu_dim": 128,
    "vocab_size": 300,
    "linear_use_lrpe_list": [1, 0],
    "lrpe_angle_dtype": "float32",
}


@needs_kernel
def test_the_models_eval_forward_runs_the_kernel_and_matches_the_chunked_path() -> None:
    torch.manual_seed(0)
    model = TransnormerForCausalLM(TransnormerConfig(**TINY, lightning_impl="triton")).to(DEVICE).eval()
    reference = TransnormerForCausalLM(TransnormerConfig(**TINY, lightning_impl="chunked")).to(DEVICE).eval()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(3, 300, (2, 70), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, use_cache=True)
        want = reference(input_ids=ids, attention_mask=mask, use_cache=True)
    _close(got.logits, want.logits, 1e-5)
    for layer in range(2):
        _close(got.past_key_values.get_state(layer), want.past_key_values.get_state(layer), 1e-5)


@needs_kernel
def test_a_model_trains_through_the_kernels_as_through_the_chunked_path(scans_for_packed_rows) -> None:
    """One training forward and backward of a tiny model (LRPE in its first layer, packed rows) with
    ``lightning_impl="triton"``: the loss and every parameter's gradient equal the chunked path's in fp32."""
    assert_trains_as_chunked([[0] * 30 + [1] * 60, [2] * 90])


def assert_trains_as_chunked(seq_ids: list[list[int]]) -> None:
    """A tiny model's training forward and backward on packed rows ``seq_ids`` (2 rows of 90 tokens) with
    ``lightning_impl="triton"``: the loss and every parameter's gradient equal the chunked path's in fp32."""
    torch.manual_seed(0)
    model = TransnormerForCausalLM(TransnormerConfig(**TINY, lightning_impl="triton")).to(DEVICE).train()
    reference = TransnormerForCausalLM(TransnormerConfig(**TINY, lightning_impl="chunked")).to(DEVICE).train()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(3, 300, (2, 90), device=DEVICE)
    seq_ids = torch.tensor(seq_ids, device=DEVICE)
    losses = []
    for net in (model, reference):
        out = net(input_ids=ids, labels=ids, seq_ids=seq_ids)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert got.grad is not None, name
        _close(got.grad, want.grad, 1e-4)


def test_the_forward_only_kernel_is_chosen_for_eval_forwards_without_gradients() -> None:
    model = TransnormerForCausalLM(TransnormerConfig(**TINY))
    mixer = model.model.layers[0].token_mixer
    mixer.impl, mixer.forward_impl, mixer.step_impl = "fla", "triton", "recurrent"
    model.eval()
    with torch.no_grad():
        assert mixer.attention_impl(64) == "triton"
        assert mixer.attention_impl(1) == "recurrent"
        assert mixer.attention_impl(1, packed=True) == "triton"
    assert mixer.attention_impl(64) == "fla"  # eval mode with gradients
    model.train()
    with torch.no_grad():
        # a checkpointed layer's no-grad forward runs what its recompute will
        assert mixer.attention_impl(64) == "fla"


def test_a_training_call_of_few_lanes_takes_the_few_lanes_kernel(monkeypatch) -> None:
    """Lanes = heads × tokens ÷ the longest example: a training call below ``SCAN_MIN_LANES`` runs
    ``few_lanes_impl`` (one long example at few heads), others ``impl``; forwards without gradients keep theirs."""
    from tnlora.model import modeling
    from tnlora.ops.select import SCAN_MIN_LANES, scan_lanes

    assert scan_lanes(32, 131_072, 131_072) == SCAN_MIN_LANES  # 7B's 32 heads, one row: the scans
    assert scan_lanes(16, 131_072, 131_072) < SCAN_MIN_LANES  # 1B's 16 heads: fla
    assert scan_lanes(16, 32_768, 1_024) >= SCAN_MIN_LANES  # packed 1,024-token examples
    model = TransnormerForCausalLM(TransnormerConfig(**TINY))  # 2 heads a layer
    mixers = [layer.token_mixer for layer in model.model.layers]
    calls: list[str] = []

    def spy(*args, impl: str, **kwargs):
        calls.append(impl)
        return lightning_attention(*args, impl="chunked" if impl == "many" else impl, **kwargs)

    monkeypatch.setattr(modeling, "lightning_attention", spy)
    for mixer in mixers:
        mixer.impl, mixer.few_lanes_impl = "many", "recurrent"
    ids = torch.randint(0, TINY["vocab_size"], (1, 64))
    model.train()
    model(input_ids=ids)  # one row of one example: 2 lanes
    assert calls == ["recurrent"] * len(mixers)
    calls.clear()
    # 32 examples of 2 tokens: 2 × 64 ÷ 2 = 64 lanes
    model(input_ids=ids, seq_ids=torch.arange(64).div(2, rounding_mode="floor")[None])
    assert calls == ["many"] * len(mixers)
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert calls == [mixers[0].forward_impl] * len(mixers)
    calls.clear()
    q = torch.zeros(1, 64, 2, 8)
    with torch.no_grad():  # a forward-only call runs forward_impl: nothing to count
        assert mixers[0].lanes(q, None) is None
    assert mixers[0].lanes(q, None) == mixers[0].num_heads  # eval mode with gradients trains: counted
    for mixer in mixers:  # the same kernel either way: nothing to count
        mixer.few_lanes_impl = "many"
        assert mixer.lanes(q, None) is None


def test_packed_rows_know_their_longest_example_on_the_host() -> None:
    rows = PackedRows.from_seq_ids(torch.tensor([[0, 0, 0, 1, 1], [2, 3, 3, 3, 3]]))
    assert rows.longest_example == 4
    assert PackedRows.from_cu_seqlens(torch.tensor([0, 3, 3, 10]), 10).longest_example == 7


def test_the_attention_s_type_names_every_choice() -> None:
    # the config, the CLI and ops.select take their choices from tnlora.choices; the dispatcher's type must match
    assert set(typing.get_args(lightning.Impl)) == set(LIGHTNING_IMPLS)


def test_kernel_selection_per_device() -> None:
    cpu = kernels_for(TransnormerConfig(), "cpu")
    assert (cpu.attention, cpu.attention_forward) == ("chunked", "chunked")
    assert kernels_for(TransnormerConfig(lightning_impl="triton"), "cpu").attention_forward == "triton"
    assert kernels_for(TransnormerConfig(lightning_impl="fla"), "cuda").attention_forward == "fla"
    expected = "triton" if triton_available() else kernels_for(TransnormerConfig(), "cuda").attention
    assert kernels_for(TransnormerConfig(), "cuda").attention_forward == expected


@pytest.mark.parametrize(
    ("has_triton", "has_fla", "hopper", "expected"),
    [
        (True, True, True, "triton"),
        (True, False, True, "triton"),
        (True, True, False, "fla"),
        (True, False, False, "chunked"),
        (False, True, True, "fla"),
        (False, False, True, "chunked"),
    ],
)
def test_auto_trains_with_the_scans_on_hopper_cards(monkeypatch, has_triton, has_fla, hopper, expected) -> None:
    """``lightning_impl: auto`` on CUDA: training's attention is the Triton scans on the cards they were measured
    and tested on (Hopper) when triton imports, else fla's chunk kernels when fla-core imports, else the chunked
    path; prefill and evaluation take the Triton forward on any CUDA card; the CPU always the chunked path."""
    from tnlora.ops import select

    monkeypatch.setattr(select, "triton_available", lambda: has_triton)
    monkeypatch.setattr(select, "fla_available", lambda: has_fla)
    monkeypatch.setattr(select, "scans_train_on", lambda device: hopper)
    kernels = kernels_for(TransnormerConfig(), "cuda")
    assert kernels.attention == expected
    # one long example at few heads: fla where it imports
    assert kernels.attention_few_lanes == ("fla" if expected == "triton" and has_fla else expected)
    assert kernels_for(TransnormerConfig(lightning_impl="triton"), "cuda").attention_few_lanes == "triton"
    assert kernels.attention_forward == ("triton" if has_triton else expected)
    assert kernels_for(TransnormerConfig(), "cpu").attention == "chunked"
    assert kernels_for(TransnormerConfig(lightning_impl="fla"), "cuda").attention == "fla"  # a choice is kept


def test_the_scans_train_by_default_only_on_cuda_cards() -> None:
    assert not scans_train_on("cpu")
    if not torch.cuda.is_available():
        assert not scans_train_on("cuda")  # no card: nothing asked of CUDA
    else:
        assert scans_train_on("cuda") == (torch.cuda.get_device_capability()[0] == 9)


GPU = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device")


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize(("length", "key_dim"), [(64, 128), (1000, 128), (64, 256), (4096, 256)])
def test_bf16_forward_against_fla_and_the_fp32_recurrence(length: int, key_dim: int) -> None:
    """The model's widths (K 128, and 256 in LRPE's layer; 32 heads), prompt-sized and long rows: the kernel is
    as close to the fp32 chunked result as fla is."""
    pytest.importorskip("fla.ops.simple_gla", reason="needs fla-core (pip install 'tnlora[gpu]')")
    q, k, v = _inputs(1, length, 32, key_dim, 128, seed=length, dtype=torch.bfloat16)
    decay = torch.linspace(-0.001, -1.0, 32, device=DEVICE)
    state = torch.randn(1, 32, key_dim, 128, device=DEVICE) * 0.1
    with torch.no_grad():
        o, final = lightning_attention(q, k, v, decay, impl="triton", initial_state=state, output_final_state=True)
        fla_o, fla_final = lightning_attention(q, k, v, decay, impl="fla", initial_state=state, output_final_state=True)
        ref_o, ref_final = lightning_attention(
            q.float(), k.float(), v.float(), decay, impl="chunked", initial_state=state, output_final_state=True
        )
    fla_err = ((fla_o.float() - ref_o).norm() / ref_o.norm()).item()
    _close(o, ref_o, max(1e-2, 1.5 * fla_err))
    _close(final, ref_final, max(1e-2, 1.5 * ((fla_final - ref_final).norm() / ref_final.norm()).item()))


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("lengths", "key_dim"),
    [((97, 230, 64, 1, 150, 482), 128), ((97, 230, 64, 1, 150, 482), 256), ((2048, 1000), 128)],
)
@pytest.mark.parametrize("form", ["cu_seqlens", "rows", "rows, merged launch"])
def test_bf16_gradients_against_fla_and_fp32(
    monkeypatch, scans_for_packed_rows, lengths: tuple[int, ...], key_dim: int, form: str
) -> None:
    """Packed examples at the model's widths (32 heads): the bf16 kernels' dq, dk, dv are as close to the fp32
    chunked path's as fla's are. Given as bare ``cu_seqlens`` the scans run the width's launch (merged at 128), one
    example a program; given as ``PackedRows`` the forward walks the rows' segments and the backward their chunks
    (``BACKWARD_SEGMENT_TOKENS`` 512) with ``SEGMENTED_LAUNCHES`` (dq, dk, dv apart), or with the width's launches
    (dk and dv merged at 128, which the segmented walk can take too)."""
    pytest.importorskip("fla.ops.simple_gla", reason="needs fla-core (pip install 'tnlora[gpu]')")
    from tnlora.ops import lightning_triton

    if form == "rows, merged launch":
        monkeypatch.setattr(lightning_triton, "SEGMENTED_LAUNCHES", dict(lightning_triton.GRAD_LAUNCHES))
        monkeypatch.setattr(lightning_triton, "MERGED_MIN_LANES", 0)  # these calls' few lanes would not merge
    # segments of 512 tokens: several examples a walk here (the first six examples: two segments), whatever the default
    monkeypatch.setattr(lightning_triton, "BACKWARD_SEGMENT_TOKENS", 512)
    total = sum(lengths)
    q, k, v = _inputs(1, total, 32, key_dim, 128, seed=total, dtype=torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    decay = torch.linspace(-0.001, -1.0, 32, device=DEVICE)
    boundaries = {"rows": PackedRows.from_cu_seqlens(cu, total)} if form != "cu_seqlens" else {"cu_seqlens": cu}
    _, _, got = _gradients(q, k, v, decay, "triton", **boundaries)
    _, _, fla = _gradients(q, k, v, decay, "fla", cu_seqlens=cu)
    _, _, want = _gradients(q.float(), k.float(), v.float(), decay, "chunked", cu_seqlens=cu)
    for name, mine, theirs, exact in zip("qkv", got, fla, want, strict=True):
        fla_err = ((theirs.float() - exact).norm() / exact.norm()).item()
        err = ((mine.float() - exact).norm() / exact.norm()).item()
        assert err < max(1e-2, 1.5 * fla_err), f"d{name}: {err:.2e} against fla's {fla_err:.2e}"
