"""tnlora.ops.lightning: every CPU implementation equals the float64 O(n²) reference."""

from __future__ import annotations

import importlib.abc
import sys
import types

import pytest
import torch

from tnl_reference import reference_attention
from tnlora.model.modeling import layer_log_decay
from tnlora.ops import fla
from tnlora.ops.lightning import lightning_attention
from tnlora.ops.packing import PackedRows, segment_starts

# (B, T, H, K, V, chunk): chunk boundaries not aligned with T, head counts not powers of two, K = 2·V
# as in the LRPE layer, and T shorter than one chunk.
SHAPES = [
    (2, 37, 3, 8, 8, 8),
    (1, 50, 5, 16, 8, 16),
    (3, 9, 2, 4, 6, 64),
    (2, 65, 1, 6, 3, 64),
]


def _inputs(B: int, T: int, H: int, K: int, V: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    return q, k, v


def _decays(H: int) -> list[torch.Tensor]:
    # Strong decay (layer 0) and almost none (last layer: λ ≈ 1 − s·1e-5).
    return [layer_log_decay(H, 0, 4), layer_log_decay(H, 3, 4)]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    scale = b.abs().max().clamp(min=1.0)
    assert (a.double() - b.double()).abs().max() <= tol * scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_impl_equals_float64_reference(shape: tuple[int, ...], impl: str) -> None:
    B, T, H, K, V, chunk = shape
    q, k, v = _inputs(B, T, H, K, V)
    for log_decay in _decays(H):
        o, _ = lightning_attention(q, k, v, log_decay, impl=impl, chunk_size=chunk)
        _close(o, reference_attention(q, k, v, log_decay))


@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_equals_recurrent_with_boundaries_and_states(shape: tuple[int, ...]) -> None:
    B, T, H, K, V, chunk = shape
    q, k, v = _inputs(B, T, H, K, V, seed=1)
    seq_ids = torch.randint(0, 3, (B, T), generator=torch.Generator().manual_seed(2)).sort(dim=1).values
    s0 = torch.randn(B, H, K, V, dtype=torch.float64)
    log_decay = _decays(H)[0]
    kwargs = {"seq_ids": seq_ids, "initial_state": s0, "output_final_state": True}
    o_c, f_c = lightning_attention(q, k, v, log_decay, impl="chunked", chunk_size=chunk, **kwargs)
    o_r, f_r = lightning_attention(q, k, v, log_decay, impl="recurrent", **kwargs)
    _close(o_c, o_r)
    _close(f_c, f_r)
    _close(o_c, reference_attention(q, k, v, log_decay, seq_ids, s0))


def test_segment_starts_from_seq_ids_and_cu_seqlens_agree() -> None:
    seq_ids = torch.tensor([[7, 7, 7, 2, 2, 9, 9, 9, 9, 4]])
    cu_seqlens = torch.tensor([0, 3, 5, 9, 10])
    expected = torch.tensor([[0, 0, 0, 3, 3, 5, 5, 5, 5, 9]])
    assert torch.equal(segment_starts(seq_ids, None, 10), expected)
    assert torch.equal(segment_starts(None, cu_seqlens, 10), expected)


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_packed_row_equals_examples_run_alone(impl: str) -> None:
    lengths = [7, 1, 12, 5]
    T, H, K, V = sum(lengths), 3, 8, 4
    q, k, v = _inputs(1, T, H, K, V, seed=3)
    log_decay = _decays(H)[0]
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    s0 = torch.randn(len(lengths), H, K, V, dtype=torch.float64)

    alone_o, alone_f, lo = [], [], 0
    for i, n in enumerate(lengths):
        o, f = lightning_attention(
            q[:, lo : lo + n],
            k[:, lo : lo + n],
            v[:, lo : lo + n],
            log_decay,
            initial_state=s0[i : i + 1],
            output_final_state=True,
            impl="recurrent",
        )
        alone_o.append(o)
        alone_f.append(f)
        lo += n
    alone_o, alone_f = torch.cat(alone_o, dim=1), torch.cat(alone_f)

    o, f = lightning_attention(
        q,
        k,
        v,
        log_decay,
        cu_seqlens=cu_seqlens,
        initial_state=s0,
        output_final_state=True,
        impl=impl,
        chunk_size=5,
    )
    _close(o, alone_o)
    _close(f, alone_f)
    # seq_ids: the row state belongs to the first example (initial) and the last one (final).
    o, f = lightning_attention(
        q,
        k,
        v,
        log_decay,
        seq_ids=seq_ids,
        initial_state=s0[:1],
        output_final_state=True,
        impl=impl,
        chunk_size=5,
    )
    first = lengths[0]
    _close(o[:, :first], alone_o[:, :first])
    o_rest, f_rest = lightning_attention(
        q, k, v, log_decay, cu_seqlens=cu_seqlens, output_final_state=True, impl="recurrent"
    )
    _close(o[:, first:], o_rest[:, first:])
    _close(f, f_rest[-1:])


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_final_state_continues_the_sequence(impl: str) -> None:
    B, T, H, K, V = 2, 29, 2, 6, 5
    q, k, v = _inputs(B, T, H, K, V, seed=4)
    log_decay = _decays(H)[0]
    full, full_state = lightning_attention(
        q, k, v, log_decay, output_final_state=True, impl=impl, chunk_size=4
    )
    split = 11
    head, state = lightning_attention(
        q[:, :split], k[:, :split], v[:, :split], log_decay, output_final_state=True, impl=impl, chunk_size=4
    )
    tail, tail_state = lightning_attention(
        q[:, split:],
        k[:, split:],
        v[:, split:],
        log_decay,
        initial_state=state,
        output_final_state=True,
        impl=impl,
        chunk_size=4,
    )
    _close(torch.cat([head, tail], dim=1), full)
    _close(tail_state, full_state)


def test_chunked_gradients_equal_reference_gradients() -> None:
    B, T, H, K, V = 2, 23, 3, 8, 4
    q, k, v = (x.requires_grad_() for x in _inputs(B, T, H, K, V, seed=5))
    seq_ids = torch.tensor([[0] * 9 + [1] * 14, [3] * 23])
    s0 = torch.randn(B, H, K, V, dtype=torch.float64, requires_grad=True)
    log_decay = _decays(H)[0]
    weight = torch.randn(B, T, H, V, dtype=torch.float64)

    o, f = lightning_attention(
        q,
        k,
        v,
        log_decay,
        seq_ids=seq_ids,
        initial_state=s0,
        output_final_state=True,
        impl="chunked",
        chunk_size=6,
    )
    out_grads = torch.autograd.grad((o * weight).sum(), (q, k, v, s0), retain_graph=True)
    all_grads = torch.autograd.grad((o * weight).sum() + f.sum(), (q, k, v, s0))
    ref = reference_attention(q, k, v, log_decay, seq_ids, s0)
    for got, want in zip(out_grads, torch.autograd.grad((ref * weight).sum(), (q, k, v, s0))):
        _close(got, want, 1e-9)
    o_rec, f_rec = lightning_attention(
        q, k, v, log_decay, seq_ids=seq_ids, initial_state=s0, output_final_state=True, impl="recurrent"
    )
    for got, want in zip(all_grads, torch.autograd.grad((o_rec * weight).sum() + f_rec.sum(), (q, k, v, s0))):
        _close(got, want, 1e-9)


def test_half_precision_inputs_give_half_outputs_and_fp32_states() -> None:
    q, k, v = (x.to(torch.bfloat16) for x in _inputs(1, 20, 2, 8, 8))
    o, state = lightning_attention(q, k, v, _decays(2)[0], output_final_state=True, impl="chunked")
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    ref = reference_attention(q, k, v, _decays(2)[0])
    assert (o.double() - ref).norm() / ref.norm() < 1e-2


def test_auto_picks_recurrent_for_one_token_and_chunked_otherwise() -> None:
    q, k, v = _inputs(1, 1, 2, 4, 4)
    calls = []
    # One token: auto must give exactly what the recurrent step gives, for any state.
    s0 = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    for impl in ("auto", "recurrent"):
        calls.append(lightning_attention(q, k, v, _decays(2)[0], initial_state=s0, impl=impl)[0])
    assert torch.equal(calls[0], calls[1])
    q, k, v = _inputs(1, 40, 2, 4, 4)
    auto = lightning_attention(q, k, v, _decays(2)[0], impl="auto", chunk_size=8)[0]
    chunked = lightning_attention(q, k, v, _decays(2)[0], impl="chunked", chunk_size=8)[0]
    assert torch.equal(auto, chunked)


def test_cpu_path_never_imports_fla(monkeypatch: pytest.MonkeyPatch) -> None:
    attempted: list[str] = []

    class Recorder(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            if name == "fla" or name.startswith("fla."):
                attempted.append(name)

    monkeypatch.setattr(sys, "meta_path", [Recorder(), *sys.meta_path])
    for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
        monkeypatch.delitem(sys.modules, name)
    fla.fla_available.cache_clear()
    q, k, v = _inputs(1, 9, 2, 4, 4)
    for T in (9, 1):
        lightning_attention(q[:, :T], k[:, :T], v[:, :T], _decays(2)[0], impl="auto")
    fla.fla_available.cache_clear()
    assert attempted == []


def test_fla_impl_refuses_cpu_tensors() -> None:
    q, k, v = _inputs(1, 4, 1, 4, 4)
    with pytest.raises((ValueError, ImportError)):
        lightning_attention(q, k, v, -torch.ones(1), impl="fla")


def test_fla_adapter_flattens_packed_rows_and_maps_states(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fla path's own logic, on CPU, against a stand-in kernel with fla's calling convention."""
    calls: list[dict] = []

    def fake_chunk_simple_gla(q, k, v, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                              cu_seqlens=None, **kwargs):  # fmt: skip
        calls.append({"scale": scale, "B": q.shape[0], "cu_seqlens": cu_seqlens})
        assert g_gamma.dtype == torch.float32 and initial_state.dtype == torch.float32
        return lightning_attention(
            q, k, v, g_gamma, cu_seqlens=cu_seqlens, initial_state=initial_state,
            output_final_state=output_final_state, impl="recurrent",
        )  # fmt: skip

    fake = types.ModuleType("fla.ops.simple_gla")
    fake.chunk_simple_gla = fake_chunk_simple_gla
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.simple_gla", fake)
    fla._takes_cu_seqlens_cpu.cache_clear()
    fla.install.cache_clear()  # the stand-in fla has no backend registry: fla's own path

    B, T, H, K, V = 2, 17, 2, 6, 4
    q, k, v = _inputs(B, T, H, K, V, seed=6)
    seq_ids = torch.tensor([[0] * 5 + [1] * 12, [4] * 9 + [2] * 8])
    s0 = torch.randn(B, H, K, V).double()  # fp32 values: fla takes fp32 states
    log_decay = _decays(H)[0]
    kwargs = {"seq_ids": seq_ids, "initial_state": s0, "output_final_state": True}
    o, f = fla.fla_attention(q, k, v, log_decay, PackedRows.from_seq_ids(seq_ids), None, s0, True)
    want_o, want_f = lightning_attention(q, k, v, log_decay, impl="recurrent", **kwargs)
    fla._takes_cu_seqlens_cpu.cache_clear()
    fla.install.cache_clear()
    _close(o, want_o)
    _close(f, want_f)
    assert calls[0]["scale"] == 1.0 and calls[0]["B"] == 1
    assert calls[0]["cu_seqlens"].tolist() == [0, 5, 17, 26, 34]


def test_bad_shapes_are_refused() -> None:
    q, k, v = _inputs(2, 4, 2, 4, 4)
    with pytest.raises(ValueError, match="log_decay"):
        lightning_attention(q, k, v, -torch.ones(3))
    with pytest.raises(ValueError, match="B = 1"):
        lightning_attention(q, k, v, -torch.ones(2), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention(q, k, v, -torch.ones(2), initial_state=torch.zeros(1, 2, 4, 4))
