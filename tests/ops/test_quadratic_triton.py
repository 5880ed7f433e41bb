"""The quadratic form in blocks (:mod:`tnlora.ops.quadratic_triton`): packed short examples' attention and its
gradients against the fp64 recurrence in fp32, where the kernels run (CUDA, or the CPU interpreter:
``TRITON_INTERPRET=1 PYTHONPATH=<dir holding triton> pytest -q tests/ops/test_quadratic_triton.py``); bf16 against
fla and the fp32 chunked path on CUDA; the dispatcher's choice between it and the scans everywhere."""

from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE, INTERPRET, needs_kernel
from test_lightning_triton import _close, _gradients, _inputs

from tnlora.ops.lightning import lightning_attention
from tnlora.ops.packing import ExampleSpans, PackedRows
from tnlora.ops.select import triton_available

DECAY = torch.tensor([-0.02, -0.7, -2.5])  # slow, fast and near-zero λ


def _rows(lengths: tuple[int, ...]) -> PackedRows:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    return PackedRows.from_cu_seqlens(cu, sum(lengths))


@pytest.fixture(autouse=True)
def quadratic_for_short_examples(monkeypatch) -> None:
    """The dispatcher takes these tests' packed examples (up to 200 tokens) to the quadratic form."""
    if not triton_available():  # the module imports triton; without it no test here runs a kernel
        return
    from tnlora.ops import quadratic_triton

    monkeypatch.setattr(quadratic_triton, "QUADRATIC_MAX_MEAN_TOKENS", 2048)


def test_example_spans_give_each_token_its_example_s_start_and_end() -> None:
    spans = ExampleSpans.build(torch.tensor([0, 3, 3, 4, 8]))  # an empty example in between
    assert spans.starts.tolist() == [0, 0, 0, 3, 4, 4, 4, 4]
    assert spans.ends.tolist() == [3, 3, 3, 4, 8, 8, 8, 8]
    assert spans.starts.dtype == spans.ends.dtype == torch.int32


def test_packed_rows_know_how_long_their_tokens_examples_are_on_average() -> None:
    rows = PackedRows.from_cu_seqlens(torch.tensor([0, 3, 3, 4, 8]), 8)  # 3, 0, 1 and 4 tokens
    assert rows.mean_example_reach == pytest.approx((9 + 1 + 16) / 8)


@pytest.mark.skipif(not triton_available(), reason="the dispatcher's rule reads quadratic_triton, which imports triton")
def test_by_default_huanhuan_sized_examples_take_the_quadratic_form_and_long_ones_the_scans(monkeypatch) -> None:
    from tnlora.ops import lightning, quadratic_triton

    monkeypatch.undo()  # the module's own default, not this file's fixture
    assert quadratic_triton.QUADRATIC_MAX_MEAN_TOKENS > 0
    assert lightning._quadratic_fits(PackedRows.from_cu_seqlens(torch.arange(0, 1025, 100).clamp(max=1024), 1024))
    assert not lightning._quadratic_fits(PackedRows.from_cu_seqlens(torch.tensor([0, 512, 1024]), 1024))


def test_packed_rows_keep_their_example_spans() -> None:
    rows = PackedRows.from_seq_ids(torch.tensor([[0, 0, 1], [1, 1, 1]]))
    spans = rows.example_spans()
    assert spans is rows.example_spans()
    assert spans.starts.tolist() == [0, 0, 2, 3, 3, 3] and spans.ends.tolist() == [2, 2, 3, 6, 6, 6]


@needs_kernel
@pytest.mark.parametrize(
    ("lengths", "heads", "key_dim", "value_dim"),
    [
        ((1, 5, 70, 97, 13, 40, 64, 2, 130), 3, 48, 40),  # examples across blocks; K, V not powers of two
        ((33, 1, 31), 2, 160, 24),  # q/k wider than dq's K block (LRPE's layer doubles them)
        ((200,), 1, 16, 16),  # one example of several blocks
    ],
)
def test_output_and_gradients_match_the_recurrence_in_fp32(lengths, heads, key_dim, value_dim) -> None:
    """Packed examples through the dispatcher (rows without states train in the quadratic form): o, dq, dk, dv
    against autograd through the fp64 recurrence."""
    rows = _rows(lengths)
    q, k, v = _inputs(1, sum(lengths), heads, key_dim, value_dim, seed=sum(lengths))
    decay = DECAY[:heads].to(DEVICE)
    o, _, grads = _gradients(q, k, v, decay, "triton", rows=rows)
    want_o, _, want = _gradients(q.double(), k.double(), v.double(), decay, "recurrent", rows=rows)
    assert o.dtype == torch.float32 and o.shape == want_o.shape
    _close(o, want_o, 1e-5)
    for got, expected in zip(grads, want, strict=True):
        assert got.shape == expected.shape
        _close(got, expected, 1e-5)


@needs_kernel
def test_narrower_output_columns_split_each_launch_over_more_programs(monkeypatch) -> None:
    """``BlockLaunch.columns`` below the width gives the same o and gradients: 16 of V 40 and K 48 (the forward
    and dq in three programs a block, the last partly masked; dk / dv in four, the last wholly masked)."""
    from tnlora.ops import quadratic_triton

    assert quadratic_triton.dkv_splits(64, 64, 16) == 4 and quadratic_triton.dkv_splits(256, 128, 128) == 2
    assert quadratic_triton.dkv_splits(128, 16, 32) == 1  # both keep 16 columns at least
    _launch_matches_the_recurrence(monkeypatch, quadratic_triton.BlockLaunch(32, 4, 2, columns=16), (1, 5, 70, 97, 13))


@needs_kernel
@pytest.mark.parametrize("block_and_step", [(64, 32), (32, 64), (64, 16)])
def test_blocks_walking_tiles_of_another_size_give_the_same_gradients(monkeypatch, block_and_step) -> None:
    """``BlockLaunch.step`` other than the block (a program's block taller or shorter than the tiles its loop
    walks; fp32 halves both) gives the same o and gradients: examples across blocks and tiles."""
    from tnlora.ops import quadratic_triton

    block, step = block_and_step
    launch = quadratic_triton.BlockLaunch(block, 4, 2, step=step)
    assert launch.walk == step and quadratic_triton.BlockLaunch(32, 4).walk == 32
    _launch_matches_the_recurrence(monkeypatch, launch, (1, 5, 70, 97, 13, 40))


def _launch_matches_the_recurrence(monkeypatch, launch, lengths: tuple[int, ...]) -> None:
    """With ``launch`` for all three kernels, o and dq, dk, dv of packed examples ``lengths`` (2 heads, K 48, V 40,
    fp32) within 1e-5 of autograd through the fp64 recurrence."""
    from tnlora.ops import quadratic_triton

    for name in ("FORWARD_LAUNCHES", "DQ_LAUNCHES", "DKV_LAUNCHES"):
        monkeypatch.setattr(quadratic_triton, name, {128: launch})
    rows = _rows(lengths)
    q, k, v = _inputs(1, sum(lengths), 2, 48, 40, seed=len(lengths))
    decay = DECAY[:2].to(DEVICE)
    o, _, grads = _gradients(q, k, v, decay, "triton", rows=rows)
    want_o, _, want = _gradients(q.double(), k.double(), v.double(), decay, "recurrent", rows=rows)
    _close(o, want_o, 1e-5)
    for got, expected in zip(grads, want, strict=True):
        _close(got, expected, 1e-5)


@needs_kernel
def test_two_packed_rows_keep_their_examples_apart() -> None:
    """Rows [20, 50] and [3, 67] tokens (a row's start always starts an example), B = 2 laid end to end."""
    q, k, v = _inputs(2, 70, 2, 16, 16, seed=5)
    rows = PackedRows.from_seq_ids(torch.tensor([[0] * 20 + [1] * 50, [1] * 3 + [2] * 67], device=DEVICE))
    decay = DECAY[:2].to(DEVICE)
    o, _, grads = _gradients(q, k, v, decay, "triton", rows=rows)
    want_o, _, want = _gradients(q.double(), k.double(), v.double(), decay, "recurrent", rows=rows)
    assert o.shape == (2, 70, 2, 16)
    _close(o, want_o, 1e-5)
    for got, expected in zip(grads, want, strict=True):
        _close(got, expected, 1e-5)


def _spy(monkeypatch, name: str) -> list[str]:
    """Record the calls of quadratic_triton's ``name`` (still run)."""
    from tnlora.ops import quadratic_triton

    calls: list[str] = []
    real = getattr(quadratic_triton, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(quadratic_triton, name, spy)
    return calls


@needs_kernel
def test_the_dispatcher_takes_the_quadratic_form_for_short_packed_examples_without_states(monkeypatch) -> None:
    """Training and forward-only calls on packed rows of short examples run it; an initial state, a final state
    asked for, examples longer on average than QUADRATIC_MAX_MEAN_TOKENS (30 and 60 tokens: 50 a token), or no
    packed rows send the call to the scans."""
    from tnlora.ops import quadratic_triton

    trained = _spy(monkeypatch, "quadratic_attention")
    forwards = _spy(monkeypatch, "quadratic_forward")
    q, k, v = _inputs(1, 90, 2, 16, 16, seed=7)
    rows = _rows((30, 60))
    decay = DECAY[:2].to(DEVICE)
    _gradients(q, k, v, decay, "triton", rows=rows)
    assert trained == ["quadratic_attention"]
    forwards.clear()  # the training call's own forward
    with torch.no_grad():
        lightning_attention(q, k, v, decay, rows=rows, impl="triton")
    assert forwards == ["quadratic_forward"]
    state = torch.zeros(1, 2, 16, 16, device=DEVICE)
    with torch.no_grad():
        lightning_attention(q, k, v, decay, rows=rows, impl="triton", initial_state=state)
        lightning_attention(q, k, v, decay, rows=rows, impl="triton", output_final_state=True)
        lightning_attention(q, k, v, decay, cu_seqlens=rows.cu_seqlens, impl="triton")
        lightning_attention(q, k, v, decay, impl="triton")
    monkeypatch.setattr(quadratic_triton, "QUADRATIC_MAX_MEAN_TOKENS", 49)
    _gradients(q, k, v, decay, "triton", rows=rows)
    assert trained == ["quadratic_attention"] and forwards == ["quadratic_forward"]


@needs_kernel
def test_refuses_more_than_one_row() -> None:
    from tnlora.ops.quadratic_triton import quadratic_forward

    q, k, v = _inputs(2, 10, 1, 16, 16, seed=8)
    with pytest.raises(ValueError, match="one row"):
        quadratic_forward(q, k, v, DECAY[:1].to(DEVICE), ExampleSpans.build(torch.tensor([0, 20])).to(DEVICE))


GPU = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device")


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("lengths", "key_dim"),
    [((97, 230, 64, 1, 150, 482), 128), ((97, 230, 64, 1, 150, 482), 256), ((2048, 1000), 128)],
)
def test_bf16_output_and_gradients_against_fla_and_fp32(lengths: tuple[int, ...], key_dim: int) -> None:
    """Packed examples at the model's widths (32 heads): the bf16 kernels' o, dq, dk, dv are as close to the fp32
    chunked path's as fla's are."""
    pytest.importorskip("fla.ops.simple_gla", reason="needs fla-core (pip install 'tnlora[gpu]')")
    total = sum(lengths)
    q, k, v = _inputs(1, total, 32, key_dim, 128, seed=total, dtype=torch.bfloat16)
    rows = _rows(lengths)
    decay = torch.linspace(-0.001, -1.0, 32, device=DEVICE)
    o, _, got = _gradients(q, k, v, decay, "triton", rows=rows)
    fla_o, _, fla = _gradients(q, k, v, decay, "fla", cu_seqlens=rows.cu_seqlens)
    want_o, _, want = _gradients(q.float(), k.float(), v.float(), decay, "chunked", cu_seqlens=rows.cu_seqlens)
    for name, mine, theirs, exact in zip(["o", "dq", "dk", "dv"], [o, *got], [fla_o, *fla], [want_o, *want]):
        fla_err = ((theirs.float() - exact).norm() / exact.norm()).item()
        err = ((mine.float() - exact).norm() / exact.norm()).item()
        assert err < max(1e-2, 1.5 * fla_err), f"{name}: {err:.2e} against fla's {fla_err:.2e}"


@needs_kernel
def test_a_model_trains_through_the_quadratic_form_as_through_the_chunked_path(monkeypatch) -> None:
    """A tiny model's training forward and backward on packed rows (LRPE in its first layer: q/k twice as wide):
    the loss and every parameter's gradient equal the chunked path's in fp32, every layer in the quadratic form."""
    from test_lightning_triton import TINY, assert_trains_as_chunked

    calls = _spy(monkeypatch, "quadratic_attention")
    assert_trains_as_chunked([[0] * 30 + [1] * 60, [2] * 7 + [3] * 83])
    assert len(calls) == TINY["decoder_layers"]
