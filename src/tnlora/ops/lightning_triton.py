"""Lightning attention without gradients as one Triton kernel: the prefill's attention in one launch.

A prefill of a few dozen tokens is launch-bound: its GPU work per layer is a few microseconds, and fla's
``chunk_simple_gla`` (built for training: chunk-parallel, autotuned, with a backward) goes through several
autotuned launches and their Python each layer. :func:`triton_forward` computes the same thing as
:func:`tnlora.ops.chunked.chunked_attention` in one launch with fixed tiles: one program per (example, head,
block of V columns) walks its example's chunks of ``CHUNK`` tokens (``CHUNK_FP32`` for fp32) in order, keeps
the state S [K, BV] in registers (fp32) and per chunk computes

    o = (q kᵀ ⊙ D) v + (q ⊙ λ^{i+1}) S,    S ← λ^L S + kᵀ (v ⊙ λ^{L−1−j})

(D[i, j] = λ^{i−j} for i ≥ j, else 0; L the chunk's length). The chunks of one example run one after another,
so a long prompt is one program's loop; the grid's parallelism is examples × heads × V blocks (7B, one
prompt: 32 heads × 4 blocks), enough for prefill lengths. Training keeps fla (chunk-parallel, with a backward).

q, k, v are read in place with their strides (the projection's views), examples given by ``cu_seqlens`` (one
row) or one per row; the state enters from ``initial_state`` and leaves in fp32. Products use the inputs' dtype
with fp32 accumulation (bf16 inputs: the state is rounded to bf16 for q·S and the decayed v for kᵀv, as fla
does); fp32 inputs use IEEE fp32 products, which the tests hold against the recurrence.

This module imports triton at import; :func:`tnlora.ops.lightning.lightning_attention` imports it on first use
only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Tokens a step of a program's loop: fla's chunk size for half types; fp32 tiles at 64 tokens and q/k 256 wide
# (LRPE's layer) would need 320 KB of shared memory on sm_90 (227 KB there), 176 KB at 32 tokens.
CHUNK = 64
CHUNK_FP32 = 32
BLOCK_V = 32  # state columns a program keeps: 128 × 32 fp32 at 4 warps is 32 values a thread
NUM_WARPS = 4  # 8 warps gave the same results and no measured gain at q/k 256 wide


@triton.jit
def _chunk(q_base, k_base, v_base, o_base, state, i_c, bos, eos, heads, stride_qt, stride_kt, stride_vt, g,
           within, to_token, ks, k_ok, cols, col_ok, pos, posf, V: tl.constexpr, PRECISION: tl.constexpr,
           BT: tl.constexpr):  # fmt: skip
    """One chunk of BT tokens from token bos + i_c·BT: its outputs stored, the state after it returned."""
    dtype = v_base.dtype.element_ty
    start = bos + i_c.to(tl.int64) * BT
    t = start + pos
    t_ok = t < eos
    q = tl.load(q_base + t[:, None] * stride_qt + ks[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
    # k read transposed [BK, BT] (no transpose of a register tile), as both products take it.
    k_t = tl.load(k_base + ks[:, None] + t[None, :] * stride_kt, mask=k_ok[:, None] & t_ok[None, :], other=0.0)
    v = tl.load(v_base + t[:, None] * stride_vt + cols[None, :], mask=t_ok[:, None] & col_ok[None, :], other=0.0)
    scores = tl.dot(q, k_t, input_precision=PRECISION) * within
    o = tl.dot(scores.to(dtype), v, input_precision=PRECISION)
    o += tl.dot(q, state.to(dtype), input_precision=PRECISION) * to_token[:, None]
    tl.store(o_base + t[:, None] * (heads * V) + cols[None, :], o.to(o_base.dtype.element_ty),
             mask=t_ok[:, None] & col_ok[None, :])  # fmt: skip
    # The state after the chunk's last valid token (L of them): each v decayed to that token.
    last = (tl.minimum(eos - start, BT) - 1).to(tl.float32)
    to_end = tl.where(t_ok, tl.exp(g * tl.maximum(last - posf, 0.0)), 0.0)
    decayed = (v.to(tl.float32) * to_end[:, None]).to(dtype)
    return tl.dot(k_t, decayed, state * tl.exp(g * (last + 1.0)), input_precision=PRECISION)


@triton.jit
def lightning_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    decay_ptr,
    h0_ptr,
    cu_ptr,
    o_ptr,
    ht_ptr,
    length,
    heads,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    K: tl.constexpr,
    V: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    # Axis 0 is (example, head) (up to 2³¹ programs), axis 1 the V block.
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // heads
    i_h = i_nh % heads
    if VARLEN:
        row = i_n.to(tl.int64) * 0
        bos = tl.load(cu_ptr + i_n).to(tl.int64)
        eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    else:
        row = i_n.to(tl.int64)
        bos = row * 0
        eos = bos + length
    g = tl.load(decay_ptr + i_h)  # log λ, fp32

    ks = tl.arange(0, BK)
    cols = i_v * BV + tl.arange(0, BV)
    k_ok = ks < K
    col_ok = cols < V
    pos = tl.arange(0, BT)
    posf = pos.to(tl.float32)
    # λ^(i−j) below the diagonal; the exponent is clamped before exp so the masked half cannot overflow.
    gap = posf[:, None] - posf[None, :]
    causal = pos[:, None] >= pos[None, :]
    within = tl.where(causal, tl.exp(g * tl.where(causal, gap, 0.0)), 0.0)
    to_token = tl.exp(g * (posf + 1.0))  # λ^(i+1): the state before the chunk, decayed to token i

    q_base = q_ptr + row * stride_qb + i_h * stride_qh
    k_base = k_ptr + row * stride_kb + i_h * stride_kh
    v_base = v_ptr + row * stride_vb + i_h * stride_vh
    # o is [rows, length, heads, V], contiguous.
    o_base = o_ptr + (row * length * heads + i_h) * V
    state_offset = i_nh.to(tl.int64) * K * V + ks[:, None] * V + cols[None, :]
    state_ok = k_ok[:, None] & col_ok[None, :]
    if HAS_H0:
        state = tl.load(h0_ptr + state_offset, mask=state_ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)

    chunks = tl.cdiv(eos - bos, BT)
    # Compiled: a range loop. The same steps as a while loop compiled wrong for sm_90 with Triton 3.6 (bf16:
    # outputs and states off by 10-100 %, an illegal address at 8 warps), but Triton's interpreter (CPU
    # tensors) cannot take a tensor bound in range() with numpy 2, so it runs the while loop.
    if WHILE_LOOP:
        i_c = chunks * 0
        while i_c < chunks:
            state = _chunk(q_base, k_base, v_base, o_base, state, i_c, bos, eos, heads, stride_qt, stride_kt,
                           stride_vt, g, within, to_token, ks, k_ok, cols, col_ok, pos, posf, V, PRECISION,
                           BT)  # fmt: skip
            i_c += 1
    else:
        for i_c in range(0, chunks):
            state = _chunk(q_base, k_base, v_base, o_base, state, i_c, bos, eos, heads, stride_qt, stride_kt,
                           stride_vt, g, within, to_token, ks, k_ok, cols, col_ok, pos, posf, V, PRECISION,
                           BT)  # fmt: skip

    if STORE_FINAL:
        tl.store(ht_ptr + state_offset, state, mask=state_ok)


def _token_rows(x: Tensor) -> Tensor:
    """``x`` as the kernel reads it: the last dim contiguous (the projection's views already are)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    cu_seqlens: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Lightning attention's forward in one launch (see the module docstring).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; fp32 or half types, on one device (CUDA, or CPU tensors under
            Triton's interpreter).
        log_decay: [H] fp32.
        cu_seqlens: [N+1] example boundaries of one row (B = 1); otherwise each row is one example.
        initial_state: [N, H, K, V] (or [B, H, K, V]) state before each example, any float dtype.
        output_final_state: also return each example's state after its last token, fp32.

    Returns:
        o in v.dtype [B, T, H, V], and the final states [N, H, K, V] fp32 or None.
    """
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    q, k, v = _token_rows(q), _token_rows(k), _token_rows(v)
    examples = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else batch
    o = torch.empty(batch, length, heads, value_dim, device=v.device, dtype=v.dtype)
    final = (
        torch.empty(examples, heads, key_dim, value_dim, device=v.device, dtype=torch.float32)
        if output_final_state
        else None
    )
    if initial_state is not None:
        initial_state = initial_state.to(torch.float32).contiguous()
    decay = log_decay.to(device=q.device, dtype=torch.float32).contiguous()
    if examples == 0 or length == 0:
        if final is not None and initial_state is not None:
            final.copy_(initial_state)
        elif final is not None:
            final.zero_()
        return o, final
    block_k = max(16, triton.next_power_of_2(key_dim))
    block_v = min(BLOCK_V, max(16, triton.next_power_of_2(value_dim)))
    grid = (examples * heads, -(-value_dim // block_v))
    lightning_forward_kernel[grid](
        q, k, v, decay, initial_state if initial_state is not None else decay,
        cu_seqlens if cu_seqlens is not None else decay, o, final if final is not None else o,
        length, heads,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        K=key_dim, V=value_dim, VARLEN=cu_seqlens is not None, HAS_H0=initial_state is not None,
        STORE_FINAL=final is not None, PRECISION="ieee" if v.dtype == torch.float32 else "tf32",
        WHILE_LOOP=not q.is_cuda, BT=CHUNK_FP32 if v.dtype == torch.float32 else CHUNK, BK=block_k, BV=block_v,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return o, final


__all__ = ["CHUNK", "CHUNK_FP32", "lightning_forward_kernel", "triton_forward"]
