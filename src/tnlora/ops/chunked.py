"""Lightning attention in pure PyTorch, chunked (Lightning-Attention-2, spec §9): exact, any device.

The sequence is split into chunks; within a chunk the attention is the quadratic masked form, across chunks
it goes through the running state, written loop-free so that every decay exponent is ≥ 0. Example boundaries
(packed rows) zero every term whose key and query lie in different examples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tnlora.ops.packing import segment_starts


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 accumulation for half types; fp64 stays fp64 so that references can be exact."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _segment_index(cu_seqlens: Tensor, length: int) -> Tensor:
    """Example index of each token, [T], for cu_seqlens."""
    positions = torch.arange(length, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:], positions, right=True)


def chunked_attention(
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
    dtype = compute_dtype(v)
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


