"""Lightning attention token by token: the reference recurrence, and the in-place one-token decode step.

    S_t = λ S_{t−1} + k_tᵀ v_t,   o_t = q_t S_t      (S [K, V] per row and head; fp32, fp64 for fp64 inputs)

:func:`recurrent_attention` runs the recurrence over a sequence (one-token decode steps, and the reference
for packed rows). :func:`torch_step` is one token written INTO a given state, the form static (CUDA-graph)
decoding needs: the same products and sum as ``recurrent_attention``, so its results are bitwise equal.
Padded rows (``pad`` True) add nothing: their v counts as zero, so S only decays; q and k stay unmasked
(the token mixer zeroes v at pads, nothing else).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from tnlora.ops.chunked import compute_dtype
from tnlora.ops.packing import segment_starts


def recurrent_attention(
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
            o_i, f_i = recurrent_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], log_decay, None, None, s0, True)
            outs.append(o_i)
            finals.append(f_i)
        return torch.cat(outs, dim=1), torch.cat(finals) if output_final_state else None

    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = compute_dtype(v)
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



def check_step_shapes(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor, decay: Tensor, pad: Tensor | None, state_key_dim: int | None = None
) -> None:
    """Shape checks shared by both steps (Python only: no device work); the state's K is q's unless
    ``state_key_dim`` says otherwise (LRPE doubles it)."""
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [B, H, K] and v [B, H, V]; got {q.shape}, {k.shape}, {v.shape}")
    batch, heads, key_dim = q.shape
    expected = (batch, heads, state_key_dim if state_key_dim is not None else key_dim, v.shape[2])
    if tuple(state.shape) != expected:
        raise ValueError(f"state must have shape {expected}, got {tuple(state.shape)}")
    if tuple(decay.shape) != (heads,):
        raise ValueError(f"decay must have shape [H]={heads}, got {tuple(decay.shape)}")
    if pad is not None and (pad.dtype != torch.bool or tuple(pad.shape) != (batch,)):
        raise ValueError(f"pad must be a bool tensor [B]={batch}, got {pad.dtype} {tuple(pad.shape)}")


def torch_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, decay: Tensor, pad: Tensor | None = None) -> Tensor:
    """One token in PyTorch: ``state`` [B, H, K, V] ← λ·state + kᵀv in place; returns o = q·state [B, H, V].

    q, k [B, H, K]; v [B, H, V] (any dtype); ``decay`` λ [H] in the state's dtype; ``pad`` bool [B] (v of a
    padded row counts as zero). o is in v's dtype.
    """
    check_step_shapes(q, k, v, state, decay, pad)
    if pad is not None:
        # Always masked when given (a graph has no branches): with no pad this copies v unchanged.
        v = v.masked_fill(pad[:, None, None], 0)
    qf, kf, vf = q.to(state.dtype), k.to(state.dtype), v.to(state.dtype)
    # recurrent_attention's `λ·S + kᵀv`: the same products and sum (bitwise), written into S.
    state.mul_(decay[:, None, None]).add_(kf[:, :, :, None] * vf[:, :, None, :])
    return torch.einsum("bhk,bhkv->bhv", qf, state).to(v.dtype)


__all__ = ["check_step_shapes", "recurrent_attention", "torch_step"]
