"""Lightning attention: causal linear attention with a fixed per-head decay (spec §4.4 step 5, §8, §9).

    o_t = Σ_{s≤t, same example} λ^{t−s} (q_t·k_s) v_s,   λ = exp(log_decay) per head

No softmax, no q·k scale, no denominator. One entry point, :func:`lightning_attention`, dispatches to:

* ``"chunked"``: pure PyTorch, exact, any device. Lightning-Attention-2 split into an intra-chunk quadratic
  part and an inter-chunk state part, written loop-free (spec §9) so that every decay exponent is ≥ 0.
* ``"recurrent"``: the per-token recurrence S_t = λ S_{t−1} + k_tᵀ v_t, o_t = q_t S_t (decoding steps).
* ``"fla"``: fla-core's Triton ``chunk_simple_gla`` with ``g_gamma = log_decay`` and ``scale = 1`` (CUDA only,
  imported lazily, optional extra ``tnlora[gpu]``).

Layout is sequence-first like fla: q, k [B, T, H, K]; v [B, T, H, V]; states [B, H, K, V].
Example boundaries inside a row (``seq_ids`` or ``cu_seqlens``) reset the state: no decay or state crosses them.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import weakref
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Impl = Literal["auto", "chunked", "recurrent", "fla"]
DEFAULT_CHUNK_SIZE = 64


# A compile boundary: under torch.compile (the decoder layers, ``torch_compile: true``) dynamo graph-breaks
# here instead of tracing fla's Triton launches or the Python loops of the chunked / recurrent paths. The layers'
# elementwise work on either side still compiles; the attention runs exactly as in eager mode.
@torch.compiler.disable
def lightning_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    *,
    seq_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    impl: Impl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """Decayed causal linear attention; returns ``(o, final_state)``.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V].
        log_decay: [H], negative, fp32 (log λ per head).
        seq_ids: [B, T] example index per token; a change between neighbours starts a new example.
        cu_seqlens: [N+1] cumulative example lengths (FlashAttention convention) for B = 1.
        initial_state: with cu_seqlens [N, H, K, V], one per example; otherwise [B, H, K, V], the state
            before the first token of each row (it feeds only the row's first example).
        output_final_state: also return the state after the last token: [N, H, K, V] per example with
            cu_seqlens, otherwise [B, H, K, V] of each row's last example.
        impl: "chunked", "recurrent", "fla" or "auto" (recurrent for T = 1, fla on CUDA when importable,
            else chunked).
        chunk_size: chunk length of the chunked implementation.

    Returns:
        o in v.dtype, [B, T, H, V]; final_state in fp32 (fp64 for fp64 inputs) or None.
    """
    _check_shapes(q, k, v, log_decay, seq_ids, cu_seqlens, initial_state)
    if impl == "auto":
        if q.shape[1] == 1 and cu_seqlens is None:
            impl = "recurrent"
        elif q.is_cuda and fla_available():
            impl = "fla"
        else:
            impl = "chunked"
    if impl == "fla":
        if not q.is_cuda:
            raise ValueError("impl='fla' needs CUDA tensors (fla's kernels are Triton)")
        return _fla(q, k, v, log_decay, seq_ids, cu_seqlens, initial_state, output_final_state)
    if impl == "chunked":
        return _chunked(
            q, k, v, log_decay, seq_ids, cu_seqlens, initial_state, output_final_state, chunk_size
        )
    if impl == "recurrent":
        return _recurrent(q, k, v, log_decay, seq_ids, cu_seqlens, initial_state, output_final_state)
    raise ValueError(f"unknown lightning attention impl {impl!r}; choose auto, chunked, recurrent or fla")


def _check_shapes(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    seq_ids: Tensor | None,
    cu_seqlens: Tensor | None,
    initial_state: Tensor | None,
) -> None:
    if q.dim() != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B,T,H,K] and v [B,T,H,V]; got {q.shape}, {k.shape}, {v.shape}")
    if log_decay.shape != (q.shape[2],):
        raise ValueError(f"log_decay must have shape [H]={q.shape[2]}, got {tuple(log_decay.shape)}")
    if seq_ids is not None and cu_seqlens is not None:
        raise ValueError("pass seq_ids or cu_seqlens, not both")
    if seq_ids is not None and seq_ids.shape != q.shape[:2]:
        raise ValueError(f"seq_ids must have shape [B,T]={tuple(q.shape[:2])}, got {tuple(seq_ids.shape)}")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError("cu_seqlens needs B = 1 (flatten the packed rows first)")
    if initial_state is not None:
        rows = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else q.shape[0]
        expected = (rows, q.shape[2], q.shape[3], v.shape[3])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must have shape {expected}, got {tuple(initial_state.shape)}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 accumulation for half types; fp64 stays fp64 so that references can be exact."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------
# Example boundaries


def _first_tokens(seq_ids: Tensor) -> Tensor:
    """Bool [B, T]: True where an example begins (every row start and every change of id)."""
    new = torch.ones_like(seq_ids, dtype=torch.bool)
    new[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    return new


def segment_starts(seq_ids: Tensor | None, cu_seqlens: Tensor | None, length: int) -> Tensor | None:
    """Position where each token's example starts, [B, T] (None when every row is one example).

    Computed with tensor ops only, so it never waits for the device.
    """
    if seq_ids is not None:
        new = _first_tokens(seq_ids)
    elif cu_seqlens is not None:
        # Size T + 1 so that an empty last example (start == T) has somewhere harmless to land.
        new = torch.zeros(length + 1, dtype=torch.bool, device=cu_seqlens.device)
        new[cu_seqlens[:-1]] = True
        new = new[:length].unsqueeze(0)
    else:
        return None
    positions = torch.arange(length, device=new.device)
    return torch.where(new, positions, 0).cummax(dim=1).values


def _segment_index(cu_seqlens: Tensor, length: int) -> Tensor:
    """Example index of each token, [T], for cu_seqlens."""
    positions = torch.arange(length, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:], positions, right=True)


# ---------------------------------------------------------------------------------------------------------
# Chunked (pure PyTorch)


def _chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    seq_ids: Tensor | None,
    cu_seqlens: Tensor | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    """Loop-free chunked form (spec §9), extended with example boundaries.

    Per chunk c of length C (t = position in the chunk, n = chunk index):
      ΔS_c = (K_c ⊙ λ^{C−1−t})ᵀ V_c                                  (keys decayed to the chunk end)
      S_c = Σ_{c'<c} λ^{C(c−1−c')} ΔS_{c'}                            (state entering chunk c)
      O_c = (Q_c ⊙ λ^{t+1}) S_c + ((Q_c K_cᵀ) ⊙ Λ) V_c,  Λ_ts = λ^{t−s} (t ≥ s)
    Boundaries zero every term whose key and query lie in different examples; the initial state enters as
    a direct term q_t·S0·λ^{t−start+1} for the tokens of the example it belongs to.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = _compute_dtype(v)
    C = max(1, min(chunk_size, T))
    NC = math.ceil(T / C)
    pad = NC * C - T
    g = log_decay.to(device=q.device, dtype=dtype)
    starts = segment_starts(seq_ids, cu_seqlens, T)
    # Cast once: the chunks and the state terms below all read the compute-dtype copies.
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    s0 = initial_state.to(dtype) if initial_state is not None else None

    def to_chunks(x: Tensor) -> Tensor:  # [B,T,H,D] -> [B,H,NC,C,D]
        x = F.pad(x.transpose(1, 2), (0, 0, 0, pad))
        return x.reshape(B, H, NC, C, x.shape[-1])

    qc, kc, vc = to_chunks(qf), to_chunks(kf), to_chunks(vf)
    t = torch.arange(C, device=q.device)
    q_decay = torch.exp(g[:, None] * (t + 1))  # [H,C]
    k_decay = torch.exp(g[:, None] * (C - 1 - t))  # [H,C]
    dist = t[:, None] - t[None, :]
    intra = (torch.exp(g[:, None, None] * dist.clamp(min=0)) * (dist >= 0)).unsqueeze(1)  # [H,1,C,C]
    n = torch.arange(NC, device=q.device)
    hops = n[:, None] - 1 - n[None, :]
    inter = torch.exp(g[:, None, None] * (C * hops.clamp(min=0))) * (hops >= 0)  # [H,NC,NC]

    q_in, k_in = qc * q_decay[:, None, :, None], kc * k_decay[:, None, :, None]
    if starts is not None:
        # Padded tail tokens continue the last example; their q, k, v are zero.
        st = torch.cat([starts, starts[:, -1:].expand(-1, pad)], dim=1).reshape(-1, 1, NC, C)
        pos = torch.arange(NC * C, device=q.device).reshape(NC, C)
        intra = intra * (pos[:, None, :] >= st[..., :, None])  # key s in query t's example
        q_in = q_in * (st < (n * C)[:, None]).unsqueeze(-1)  # the chunk's previous token is in t's example
        last_start = st[..., -1]  # [B',1,NC]: start of the example of each chunk's last token
        k_in = k_in * (pos >= last_start[..., None]).unsqueeze(-1)  # keys that survive to the chunk end
        prev_start = F.pad(last_start, (1, 0))[..., :-1]  # example start at the end of chunk c−1
        inter = inter * (prev_start[..., :, None] <= (n * C + C - 1)[None, None, None, :])

    delta = torch.einsum("bhnck,bhncv->bhnkv", k_in, vc)
    states = (inter @ delta.reshape(B, H, NC, K * V)).reshape(B, H, NC, K, V)
    o = torch.einsum("bhnck,bhnkv->bhncv", q_in, states)
    o = o + ((qc @ kc.transpose(-1, -2)) * intra) @ vc
    o = o.reshape(B, H, NC * C, V)[:, :, :T].transpose(1, 2)  # [B,T,H,V]

    if cu_seqlens is not None:
        o, final = _segment_states_cu(qf, kf, vf, g, o, cu_seqlens, starts, s0, output_final_state)
    else:
        o, final = _segment_states_rows(qf, kf, vf, g, o, starts, s0, output_final_state)
    # Contiguous like fla's output, in one copy (the cast makes it when the dtype changes; `.to` returns a
    # same-dtype view unchanged, hence .contiguous()): the caller's reshape is then a view, and a compiled
    # caller sees one layout whatever T is (the transposed, chunk-padded view's strides depend on T mod C and
    # would fail a compiled caller's stride guards: a recompile).
    return o.to(v.dtype, memory_format=torch.contiguous_format).contiguous(), final


def _segment_states_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    o: Tensor,
    starts: Tensor | None,
    initial_state: Tensor | None,
    output_final_state: bool,
) -> tuple[Tensor, Tensor | None]:
    """Initial-state term and final state when each row's state belongs to its first / last example.

    q, k, v and initial_state are already in the compute dtype (that of ``o``).
    """
    T = q.shape[1]
    pos = torch.arange(T, device=q.device)
    if initial_state is not None:
        w = torch.exp(g[None, :] * (pos + 1)[:, None])  # [T,H]
        if starts is not None:
            w = w * (starts == 0).unsqueeze(-1)  # [B,T,H]: only the row's first example sees S0
        o = o + torch.einsum("bthk,bhkv->bthv", q, initial_state) * w.unsqueeze(-1)
    if not output_final_state:
        return o, None
    w = torch.exp(g[None, :] * (T - 1 - pos)[:, None])  # [T,H]: keys decayed to the row end
    if starts is not None:
        w = w * (pos[None, :] >= starts[:, -1:]).unsqueeze(-1)  # keys of the last example only
    final = torch.einsum("bthk,bthv->bhkv", k * w.unsqueeze(-1), v)
    if initial_state is not None:
        carry = torch.exp(g * T)[None, :, None, None]
        if starts is not None:
            carry = carry * (starts[:, -1] == 0)[:, None, None, None]
        final = final + carry * initial_state
    return o, final


def _segment_states_cu(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    o: Tensor,
    cu_seqlens: Tensor,
    starts: Tensor,
    initial_state: Tensor | None,
    output_final_state: bool,
) -> tuple[Tensor, Tensor | None]:
    """Initial-state term and final states with one state per example (cu_seqlens, B = 1).

    q, k, v and initial_state are already in the compute dtype (that of ``o``).
    """
    T, dtype = q.shape[1], o.dtype
    N = cu_seqlens.shape[0] - 1
    pos = torch.arange(T, device=q.device)
    seg = _segment_index(cu_seqlens, T)
    onehot = F.one_hot(seg, N).to(dtype)  # [T,N]
    if initial_state is not None:
        w = torch.exp(g[None, :] * (pos - starts[0] + 1)[:, None])  # [T,H]
        init_out = torch.einsum("tn,thk,nhkv->thv", onehot, q[0], initial_state)
        o = o + (init_out * w.unsqueeze(-1)).unsqueeze(0)
    if not output_final_state:
        return o, None
    ends = cu_seqlens[1:][seg]  # exclusive end of each token's example
    w = torch.exp(g[None, :] * (ends - 1 - pos)[:, None])
    final = torch.einsum("tn,thk,thv->nhkv", onehot, k[0] * w.unsqueeze(-1), v[0])
    if initial_state is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(dtype)
        final = final + torch.exp(g[None, :] * lengths[:, None])[..., None, None] * initial_state
    return o, final


# ---------------------------------------------------------------------------------------------------------
# Recurrent (per token)


def _recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    seq_ids: Tensor | None,
    cu_seqlens: Tensor | None,
    initial_state: Tensor | None,
    output_final_state: bool,
) -> tuple[Tensor, Tensor | None]:
    """S_t = λ S_{t−1} + k_tᵀ v_t, o_t = q_t S_t, in fp32 (fp64 for fp64 inputs)."""
    if cu_seqlens is not None:
        # Reference path for packed rows: run each example alone (one host sync for the boundaries).
        bounds = cu_seqlens.tolist()
        outs, finals = [], []
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            s0 = None if initial_state is None else initial_state[i : i + 1]
            o_i, f_i = _recurrent(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], log_decay, None, None, s0, True)
            outs.append(o_i)
            finals.append(f_i)
        return torch.cat(outs, dim=1), torch.cat(finals) if output_final_state else None

    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = _compute_dtype(v)
    lam = torch.exp(log_decay.to(device=q.device, dtype=dtype))[None, :, None, None]
    state = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    starts = segment_starts(seq_ids, None, T)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    outs = []
    for t in range(T):
        if starts is not None and t > 0:
            state = torch.where((starts[:, t] == t)[:, None, None, None], 0.0, state)
        state = lam * state + kf[:, t, :, :, None] * vf[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], state))
    o = torch.stack(outs, dim=1) if outs else vf.new_zeros(B, 0, H, V)
    return o.to(v.dtype), state if output_final_state else None


# ---------------------------------------------------------------------------------------------------------
# fla (CUDA)


@functools.cache
def fla_available() -> bool:
    """Whether fla-core's simple_gla kernel imports (needs triton and a CUDA build)."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
    except Exception:  # an installed but broken fla (e.g. triton mismatch) counts as absent
        return False
    return True


class _RowFlattening:
    """Single-entry memo of :func:`_flatten_rows`: every layer of a forward passes the same seq_ids tensor."""

    source: weakref.ref | None = None
    version = -1
    value: tuple[Tensor, Tensor, Tensor, Tensor] | None = None


def flat_cu_seqlens(seq_ids: Tensor) -> Tensor:
    """cu_seqlens [N+1] of ``seq_ids``' rows laid end to end: a boundary at every row start and id change.

    On the device this reads N back (a host sync); the training collator computes it on the CPU instead and
    hands it to the model (``cu_seqlens_cpu``), which seeds :func:`remember_flattening` with it.
    """
    return _cu_seqlens(_first_tokens(seq_ids).reshape(-1))


def _cu_seqlens(new: Tensor) -> Tensor:
    """cu_seqlens [N+1] from the flat example-start flags ``new`` [B·T]."""
    return F.pad(new.nonzero().squeeze(1), (0, 1), value=new.shape[0])


def _flatten_rows(seq_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Packed rows as one flat row: (cu_seqlens, its CPU copy, each row's first and last example index).

    Found once per seq_ids tensor (and per in-place change of it), not once per layer: from the host copy
    given to :func:`remember_flattening`, or else on the device at the cost of two host syncs.
    """
    memo = _RowFlattening
    if memo.source is not None and memo.source() is seq_ids and memo.version == seq_ids._version:
        return memo.value
    B, T = seq_ids.shape
    new = _first_tokens(seq_ids).reshape(-1)
    cu_seqlens = _cu_seqlens(new)
    example = (new.cumsum(0) - 1).reshape(B, T)
    memo.value = (cu_seqlens, cu_seqlens.cpu(), example[:, 0], example[:, -1])
    memo.source, memo.version = weakref.ref(seq_ids), seq_ids._version
    return memo.value


def remember_flattening(seq_ids: Tensor, cu_seqlens_cpu: Tensor | Sequence[int]) -> None:
    """Let :func:`_flatten_rows` take ``seq_ids``' boundaries from their host copy (``flat_cu_seqlens`` of
    the CPU ids): nothing is read back from the device. A copy that does not match ``seq_ids`` fails a
    device-side assertion."""
    B, T = seq_ids.shape
    host = torch.as_tensor(cu_seqlens_cpu, dtype=torch.long).cpu()
    row_starts = torch.arange(B) * T
    # Each row's first and last example: the examples holding the row's first and last token.
    first = torch.searchsorted(host[:-1], row_starts, right=True) - 1
    last = torch.searchsorted(host[:-1], row_starts + T - 1, right=True) - 1
    device = seq_ids.device

    def to_device(x: Tensor) -> Tensor:
        # From pinned memory without waiting: a blocking copy from pageable memory syncs the stream.
        return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)

    cu_seqlens = to_device(host)
    new = _first_tokens(seq_ids).reshape(-1)
    matches = (new.sum() == host.shape[0] - 1) & new[cu_seqlens[:-1]].all() & (cu_seqlens[-1] == B * T)
    torch._assert_async(matches, "cu_seqlens_cpu does not match seq_ids")
    memo = _RowFlattening
    memo.value = (cu_seqlens, host, to_device(first), to_device(last))
    memo.source, memo.version = weakref.ref(seq_ids), seq_ids._version


@functools.cache
def _fla_takes_cu_seqlens_cpu() -> bool:
    """fla-core added ``cu_seqlens_cpu`` in 2026; older releases lack it."""
    from fla.ops.simple_gla import chunk_simple_gla

    return "cu_seqlens_cpu" in inspect.signature(chunk_simple_gla).parameters


def _fla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    seq_ids: Tensor | None,
    cu_seqlens: Tensor | None,
    initial_state: Tensor | None,
    output_final_state: bool,
) -> tuple[Tensor, Tensor | None]:
    """fla-core ``chunk_simple_gla``: g_gamma = log λ, scale 1 (TNL does not scale q·k)."""
    from fla.ops.simple_gla import chunk_simple_gla

    from tnlora.model import fla_backend

    B, T, H = q.shape[:3]
    g_gamma = log_decay.to(device=q.device, dtype=torch.float32)
    row_last = cu_seqlens_cpu = None
    if seq_ids is not None:
        cu_seqlens, cu_seqlens_cpu, row_first, row_last = _flatten_rows(seq_ids)
        if initial_state is not None:
            s0 = initial_state.new_zeros(cu_seqlens.shape[0] - 1, *initial_state.shape[1:])
            initial_state = s0.index_copy(0, row_first, initial_state)
        q, k, v = (x.reshape(1, B * T, H, x.shape[-1]) for x in (q, k, v))
    extra = {}
    if cu_seqlens is not None:
        if cu_seqlens_cpu is None:
            cu_seqlens_cpu = cu_seqlens.cpu()
        if fla_backend.install():
            # fla's state kernels then size their buffers from the host copy instead of reading the device.
            fla_backend.remember_host_copy(cu_seqlens, cu_seqlens_cpu)
        if _fla_takes_cu_seqlens_cpu():
            # Lets fla plan its chunks without another device->host copy.
            extra["cu_seqlens_cpu"] = cu_seqlens_cpu
    o, final = chunk_simple_gla(
        q,
        k,
        v,
        g_gamma=g_gamma,
        scale=1.0,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        **extra,
    )
    if row_last is not None:
        o = o.reshape(B, T, H, -1)
        final = final[row_last] if final is not None else None
    return o.to(v.dtype), final
