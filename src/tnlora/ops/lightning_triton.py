"""Lightning attention as per-example scans in Triton: the forward in one launch, the backward in two or three.

A prefill of a few dozen tokens is launch-bound: its GPU work per layer is a few microseconds, and fla's
``chunk_simple_gla`` (chunk-parallel, autotuned) goes through several autotuned launches and their Python each
layer. :func:`triton_forward` computes the same thing as :func:`tnlora.ops.chunked.chunked_attention` in one
launch with fixed tiles: one program per (example, head, block of V columns) walks its example's chunks of
``CHUNK`` tokens (``CHUNK_FP32`` for fp32) in order, keeps the state S [K, BV] in registers (fp32) and per chunk
computes

    o = (q kᵀ ⊙ D) v + (q ⊙ λ^{i+1}) S,    S ← λ^L S + kᵀ (v ⊙ λ^{L−1−j})

(D[i, j] = λ^{i−j} for i ≥ j, else 0; L the chunk's length). The chunks of one example run one after another;
the grid's parallelism is examples × heads × blocks. Training's packed rows hold many short examples, so the
same form trains: :func:`triton_backward` (below) scans each example again, forward for dq and in reverse for
dk and dv, and nothing is stored between chunks (fla writes every chunk's state and its gradient to memory).
Measured against fla's chunk kernels on an H100 (benchmarks/RESULTS.md, "Attention kernel"): faster with half the
memory wherever the examples × heads fill the card (huanhuan-sized, 1,024- and 4,096-token examples at 16 and 32
heads; one 16,384- or 131,072-token row at 32 heads), slower on one long row at 16 or 8 heads, where a few programs
walk the whole row; training's default on Hopper cards for calls with enough of them (``tnlora.ops.select``).

q, k, v are read in place with their strides (the projection's views), examples given by ``cu_seqlens`` (one
row) or one per row; the state enters from ``initial_state`` and leaves in fp32. Packed examples without states
(training's micro-batches) can be given to the forward as :class:`~tnlora.ops.packing.ScanSegments` too: then a
program walks a segment of several examples chunk by chunk, the chunks across the examples' boundaries, each token's
example start telling it which decays and states apply, where one program an example of ~100 tokens would walk one
or two chunks, a quarter of their rows past the example's end. The backward's kernels have no registers left for
those masks (with them every launch spilled and ran slower: benchmarks/RESULTS.md); given
:class:`~tnlora.ops.packing.ScanChunks` a backward program walks a segment's examples one after another instead,
each cut into chunks of its own (a table of chunks, read one chunk ahead), the state starting over at each example.
Products use the inputs' dtype
with fp32 accumulation (bf16 inputs: the state is rounded to bf16 for q·S and the decayed v for kᵀv, as fla
does); fp32 inputs use IEEE fp32 products, which the tests hold against the recurrence.

This module imports triton at import; :func:`tnlora.ops.lightning.lightning_attention` imports it on first use
only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
import triton
import triton.language as tl
from torch import Tensor

from tnlora.ops.packing import ScanChunks, ScanSegments

_Launch = TypeVar("_Launch")

# Tokens a step of a program's loop: fla's chunk size for half types; fp32 tiles at 64 tokens and q/k 256 wide
# (LRPE's layer) would need 320 KB of shared memory on sm_90 (227 KB there), 176 KB at 32 tokens.
CHUNK = 64
CHUNK_FP32 = 32
BLOCK_V = 32  # state columns a program keeps: 128 × 32 fp32 at 4 warps is 32 values a thread
NUM_WARPS = 4  # 8 warps gave the same results and no measured gain at q/k 256 wide
# Packed examples without states (ScanSegments): a program walks the examples that start in one block of this many
# tokens, chunk by chunk across their boundaries. One program an example walked the huanhuan-shaped micro-batches'
# ~100-token examples in one or two chunks each, a quarter of the chunks' rows past an example's end
# (benchmarks/RESULTS.md, "Packed examples walked a segment at a time").
SEGMENT_TOKENS = 2048  # 0: one example a program
# The backward's programs (ScanChunks): each walks the examples that start in one block of this many tokens one
# after another, each example cut into chunks on its own (the per-token masks of the forward's chunks across the
# examples' boundaries made every backward kernel spill). 0: one example a program. Alone, on an H100
# (huanhuan-shaped micro-batches, forward + backward; benchmarks/RESULTS.md, "The backward walked a segment at a
# time"), 2,048 with SEGMENTED_LAUNCHES took 1B's and 7B's layers from 2.08-2.09 to 1.84-1.88 ms at q/k 128 and
# 5.28 to 4.60 at 256; but the one training pair run with it as the default was 9 % slower than the tree before on
# that machine (95,151 against 104,979 tokens/s at 1B; it ran first, and a machine's first run has been up to 7 %
# slow), so 0, the setting with a training figure, stays the default until an alternating run settles it.
BACKWARD_SEGMENT_TOKENS = 0


@triton.jit
def _example(pid, heads, blocks, cu_ptr, length, VARLEN: tl.constexpr):
    """(example·heads + head, block, head, bos, eos, row) of program ``pid``: blocks of one example next to each
    other, so that they find the inputs they share in L2."""
    i_nh = pid // blocks
    i_b = pid % blocks
    i_n = i_nh // heads
    if VARLEN:
        row = i_n.to(tl.int64) * 0
        bos = tl.load(cu_ptr + i_n).to(tl.int64)
        eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    else:
        row = i_n.to(tl.int64)
        bos = row * 0
        eos = bos + length
    return i_nh, i_b, i_nh % heads, bos, eos, row


@triton.jit
def _decays(g, BT: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Positions in a chunk, λ^(i−j) below the diagonal [i, j] (or its transpose [j, i]; exponents clamped before
    exp) and λ^(i+1)."""
    pos = tl.arange(0, BT)
    posf = pos.to(tl.float32)
    if TRANSPOSED:
        causal = pos[None, :] >= pos[:, None]
        gap = posf[None, :] - posf[:, None]
    else:
        causal = pos[:, None] >= pos[None, :]
        gap = posf[:, None] - posf[None, :]
    within = tl.where(causal, tl.exp(g * tl.where(causal, gap, 0.0)), 0.0)
    return pos, posf, within, tl.exp(g * (posf + 1.0))


@triton.jit
def _chunk_end(start, eos, t_ok, posf, g):
    """The chunk's last valid token (as a float) and each token's decay to it, λ^(L−1−j) (0 past the example)."""
    last = (tl.minimum(eos - start, posf.shape[0]) - 1).to(tl.float32)
    return last, tl.where(t_ok, tl.exp(g * tl.maximum(last - posf, 0.0)), 0.0)


@triton.jit
def _chunk_decays(starts_ptr, t, t_ok, start, end, posf, g, within, to_token, SEGMENTED: tl.constexpr):
    """A chunk's decays as its tokens' examples allow, (within, to_token, to_end, across): λ^(i−j) between
    tokens of one example (``within`` as :func:`_decays` gives it); λ^(i+1) for the tokens of the example the
    state before the chunk belongs to; each token's decay to the chunk's last valid token, λ^(L−1−j), for the
    tokens of that token's example; and the state's decay across the chunk, λ^L, where one example spans it (else
    0: the state after the chunk is the last example's alone). Without SEGMENTED the chunk is one example's; with
    it ``starts_ptr`` holds each token's example start."""
    last, to_end = _chunk_end(start, end, t_ok, posf, g)
    across = tl.exp(g * (last + 1.0))
    if SEGMENTED:
        first = tl.load(starts_ptr + t, mask=t_ok, other=0)
        # token j is in token i's example where j ≥ i's example start (j ≤ i: the causal mask already holds)
        within = tl.where(t[None, :] >= first[:, None], within, 0.0)
        to_token = tl.where(first < start, to_token, 0.0)
        first_last = tl.max(tl.where(t_ok, first, 0))
        to_end = tl.where(t >= first_last, to_end, 0.0)
        across = tl.where(first_last < start, across, 0.0)
    return within, to_token, to_end, across


@triton.jit
def _chunk(q_base, k_base, v_base, o_base, state, i_c, bos, eos, starts_ptr, heads, stride_qt, stride_kt,
           stride_vt, g, within, to_token, ks, k_ok, cols, col_ok, pos, posf, V: tl.constexpr,
           PRECISION: tl.constexpr, SEGMENTED: tl.constexpr):  # fmt: skip
    """The program's chunk i_c: its outputs stored, the state after it returned."""
    dtype = v_base.dtype.element_ty
    start = bos + i_c.to(tl.int64) * pos.shape[0]
    t = start + pos
    t_ok = t < eos
    within, to_token, to_end, across = _chunk_decays(starts_ptr, t, t_ok, start, eos, posf, g, within, to_token,
                                                     SEGMENTED)  # fmt: skip
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
    decayed = (v.to(tl.float32) * to_end[:, None]).to(dtype)
    return tl.dot(k_t, decayed, state * across, input_precision=PRECISION)


@triton.jit
def lightning_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    decay_ptr,
    h0_ptr,
    cu_ptr,
    starts_ptr,
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
    SEGMENTED: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    # One axis (up to 2³¹ programs), the V blocks of one (example or segment, head) next to each other.
    i_nh, i_v, i_h, bos, eos, row = _example(tl.program_id(0), heads, tl.cdiv(V, BV), cu_ptr, length, VARLEN)
    g = tl.load(decay_ptr + i_h)  # log λ, fp32

    ks = tl.arange(0, BK)
    cols = i_v * BV + tl.arange(0, BV)
    k_ok = ks < K
    col_ok = cols < V
    # λ^(i−j) below the diagonal, and λ^(i+1): the state before the chunk, decayed to token i.
    pos, posf, within, to_token = _decays(g, BT, False)

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
            state = _chunk(q_base, k_base, v_base, o_base, state, i_c, bos, eos, starts_ptr, heads,
                           stride_qt, stride_kt, stride_vt, g, within, to_token, ks, k_ok, cols, col_ok, pos,
                           posf, V, PRECISION, SEGMENTED)  # fmt: skip
            i_c += 1
    else:
        for i_c in range(0, chunks):
            state = _chunk(q_base, k_base, v_base, o_base, state, i_c, bos, eos, starts_ptr, heads,
                           stride_qt, stride_kt, stride_vt, g, within, to_token, ks, k_ok, cols, col_ok, pos,
                           posf, V, PRECISION, SEGMENTED)  # fmt: skip

    if STORE_FINAL:
        tl.store(ht_ptr + state_offset, state, mask=state_ok)


def _walks(
    batch: int, cu_seqlens: Tensor | None, segments: ScanSegments | ScanChunks | None
) -> tuple[int, Tensor | None]:
    """(the walks a head's programs make: the segments, the examples or the rows; the boundaries the kernels
    read)."""
    if segments is not None:
        if batch != 1:
            raise ValueError(f"segments are of one row laid end to end (B = 1), got {batch} rows")
        return segments.count, segments.bounds
    return (cu_seqlens.shape[0] - 1 if cu_seqlens is not None else batch), cu_seqlens


def chunk_tokens(dtype: torch.dtype) -> int:
    """The tokens of a chunk of the scans' loops for inputs of ``dtype`` (a :class:`~tnlora.ops.packing.ScanChunks`'
    chunk)."""
    return CHUNK_FP32 if dtype == torch.float32 else CHUNK


def _scan_args(q: Tensor, v: Tensor, bounds: Tensor | None) -> dict:
    """The launch arguments every scan kernel takes alike: widths, boundaries, product precision, loop form and
    chunk (fp32 runs IEEE products in chunks of CHUNK_FP32; the interpreter the while loop)."""
    fp32 = v.dtype == torch.float32
    return dict(
        K=q.shape[-1], V=v.shape[-1], VARLEN=bounds is not None,
        PRECISION="ieee" if fp32 else "tf32", WHILE_LOOP=not q.is_cuda, BT=chunk_tokens(v.dtype),
    )  # fmt: skip


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
    segments: ScanSegments | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Lightning attention's forward in one launch (see the module docstring).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; fp32 or half types, on one device (CUDA, or CPU tensors under
            Triton's interpreter).
        log_decay: [H] fp32.
        cu_seqlens: [N+1] example boundaries of one row (B = 1); otherwise each row is one example.
        initial_state: [N, H, K, V] (or [B, H, K, V]) state before each example, any float dtype.
        output_final_state: also return each example's state after its last token, fp32.
        segments: the examples of one row (B = 1) as :class:`~tnlora.ops.packing.ScanSegments`, in place of
            ``cu_seqlens``: each program walks a segment of examples; no state in or out.

    Returns:
        o in v.dtype [B, T, H, V], and the final states [N, H, K, V] fp32 or None.
    """
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    q, k, v = _token_rows(q), _token_rows(k), _token_rows(v)
    if segments is not None and (initial_state is not None or output_final_state):
        raise ValueError("segmented scans take no initial state and return no final state")
    examples, bounds = _walks(batch, cu_seqlens, segments)
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
    block_k = tile_width(key_dim)
    block_v = min(BLOCK_V, tile_width(value_dim))
    grid = (examples * heads * -(-value_dim // block_v),)
    lightning_forward_kernel[grid](
        q, k, v, decay, initial_state if initial_state is not None else decay,
        bounds if bounds is not None else decay, segments.starts if segments is not None else decay, o,
        final if final is not None else o, length, heads,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        HAS_H0=initial_state is not None, STORE_FINAL=final is not None, BK=block_k, BV=block_v,
        SEGMENTED=segments is not None, num_warps=NUM_WARPS, **_scan_args(q, v, bounds),
    )  # fmt: skip
    return o, final



# ---------------------------------------------------------------------------------------------------------------
# The backward: three scans over each example's chunks, one program per (example, head, block of K or V); dk's and
# dv's reverse scans run as one where GRAD_LAUNCHES says (lightning_dkv_kernel).
#
# With dS_e = Σ_{t>e} λ^{t−e} q_tᵀ do_t (the gradient reaching the state after token e, a reverse scan):
#   dq_i = Σ_{j≤i} λ^{i−j} (do_i·v_j) k_j + λ^{i+1} do_i Sᵀ        (S: the state before the chunk, forward scan)
#   dk_j = Σ_{i≥j} λ^{i−j} (v_j·do_i) q_i + λ^{L−1−j} dS v_j       (dS: after the chunk's last token)
#   dv_j = Σ_{i≥j} λ^{i−j} (k_j·q_i) do_i + λ^{L−1−j} k_j dS
#   dS ← λ^L dS + Σ_i λ^{i+1} q_iᵀ do_i,  and the initial state's gradient is dS after the first chunk.
# dq needs S's rows of its K block and all of V, dk dS's rows of its K block, dv dS's columns of its V block: so
# dq and dk run over K blocks and dv over V blocks, each keeping its part of the state in registers (fp32). Nothing
# is stored between chunks, so the backward reads q, k, v, do and writes dq, dk, dv (and dh0) once per block.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _walk_begin(bos, eos, table_ptr, SEGMENTED: tl.constexpr, REVERSE: tl.constexpr, BT: tl.constexpr):
    """(chunks, first chunk's start, its example's end) of a backward program's walk: its example's tokens bos to
    eos in chunks of BT, or with SEGMENTED rows bos to eos of a :class:`~tnlora.ops.packing.ScanChunks` table
    (REVERSE: the last chunk first)."""
    if SEGMENTED:
        chunks = eos - bos
        entry = table_ptr + (eos - 1 if REVERSE else bos) * 2
        start = tl.load(entry).to(tl.int64)
        end = tl.load(entry + 1).to(tl.int64)
    else:
        chunks = tl.cdiv(eos - bos, BT)
        start = bos
        end = eos
    return chunks, start, end


@triton.jit
def _walk_chunk(i, chunks, bos, eos, start, end, table_ptr, SEGMENTED: tl.constexpr, REVERSE: tl.constexpr,
                BT: tl.constexpr):  # fmt: skip
    """(start, example's end) of the program's i-th chunk and of the one after it. With SEGMENTED the i-th's are
    ``start`` / ``end``, read from the table an iteration before: the next row is read here, one chunk ahead, so
    that the loop's data loads keep their pipeline stages (read in the same iteration as its chunk, the table cost
    one: benchmarks/RESULTS.md). Without, the chunks of one example, counted from ``bos``."""
    if SEGMENTED:
        row = tl.maximum(eos - 2 - i, bos) if REVERSE else tl.minimum(bos + 1 + i, eos - 1)
        next_start = tl.load(table_ptr + row * 2).to(tl.int64)
        next_end = tl.load(table_ptr + row * 2 + 1).to(tl.int64)
    else:
        j = chunks - 1 - i if REVERSE else i
        start = bos + j.to(tl.int64) * BT
        next_start = start
        next_end = eos
    return start, end, next_start, next_end


@triton.jit
def lightning_dq_kernel(
    k_ptr, v_ptr, do_ptr, decay_ptr, h0_ptr, cu_ptr, table_ptr, dq_ptr, length, heads,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    K: tl.constexpr, V: tl.constexpr, VARLEN: tl.constexpr, SEGMENTED: tl.constexpr, HAS_H0: tl.constexpr,
    PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr,
):  # fmt: skip
    """dq of a block of BK columns of K: the forward scan, S's rows of the block kept transposed [V, BK]."""
    i_nh, i_k, i_h, bos, eos, row = _example(tl.program_id(0), heads, tl.cdiv(K, BK), cu_ptr, length, VARLEN)
    g = tl.load(decay_ptr + i_h)
    pos, posf, within, to_token = _decays(g, BT, False)
    ks = i_k * BK + tl.arange(0, BK)
    vs = tl.arange(0, BVF)
    k_ok = ks < K
    v_ok = vs < V
    k_base = k_ptr + row * stride_kb + i_h * stride_kh
    v_base = v_ptr + row * stride_vb + i_h * stride_vh
    do_base = do_ptr + (row * length * heads + i_h) * V  # do and dq: [rows, length, heads, ·], contiguous
    dq_base = dq_ptr + (row * length * heads + i_h) * K
    if HAS_H0:
        offset = i_nh.to(tl.int64) * K * V + ks[None, :] * V + vs[:, None]
        state_t = tl.load(h0_ptr + offset, mask=v_ok[:, None] & k_ok[None, :], other=0.0)
    else:
        state_t = tl.zeros([BVF, BK], dtype=tl.float32)
    chunks, start, end = _walk_begin(bos, eos, table_ptr, SEGMENTED, False, BT)
    # A range loop compiled, the while loop under the interpreter (see lightning_forward_kernel).
    if WHILE_LOOP:
        i_c = chunks * 0
        while i_c < chunks:
            state_t, start, end = _dq_step(k_base, v_base, do_base, dq_base, state_t, i_c, chunks, bos, eos, start,
                                           end, table_ptr, heads, stride_kt, stride_vt, g, pos, posf, within, to_token,
                                           ks, k_ok, vs, v_ok, K, V, PRECISION, SEGMENTED, BT)  # fmt: skip
            i_c += 1
    else:
        for i_c in range(0, chunks):
            state_t, start, end = _dq_step(k_base, v_base, do_base, dq_base, state_t, i_c, chunks, bos, eos, start,
                                           end, table_ptr, heads, stride_kt, stride_vt, g, pos, posf, within, to_token,
                                           ks, k_ok, vs, v_ok, K, V, PRECISION, SEGMENTED, BT)  # fmt: skip


@triton.jit
def _dq_step(k_base, v_base, do_base, dq_base, state_t, i, chunks, bos, eos, start, end, table_ptr, heads, stride_kt,
             stride_vt, g, pos, posf, within, to_token, ks, k_ok, vs, v_ok, K: tl.constexpr, V: tl.constexpr,
             PRECISION: tl.constexpr, SEGMENTED: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    """The program's i-th chunk of dq (:func:`_walk_chunk`): (the state after it, the next chunk's start and end)."""
    start, end, next_start, next_end = _walk_chunk(i, chunks, bos, eos, start, end, table_ptr, SEGMENTED, False, BT)
    state_t = _dq_chunk(k_base, v_base, do_base, dq_base, state_t, start, end, heads, stride_kt, stride_vt, g, pos,
                        posf, within, to_token, ks, k_ok, vs, v_ok, K, V, PRECISION)  # fmt: skip
    if SEGMENTED:
        state_t = tl.where(start + BT >= end, 0.0, state_t)  # the example's last chunk: the next example starts anew
    return state_t, next_start, next_end


@triton.jit
def _dq_chunk(k_base, v_base, do_base, dq_base, state_t, start, eos, heads, stride_kt, stride_vt, g, pos, posf,
              within, to_token, ks, k_ok, vs, v_ok, K: tl.constexpr, V: tl.constexpr, PRECISION: tl.constexpr):
    """One chunk of dq from token ``start``: its rows stored, the state (transposed) after it returned."""
    dtype = do_base.dtype.element_ty
    t = start + pos
    t_ok = t < eos
    do = tl.load(do_base + t[:, None] * (heads * V) + vs[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0)
    v_t = tl.load(v_base + vs[:, None] + t[None, :] * stride_vt, mask=v_ok[:, None] & t_ok[None, :], other=0.0)
    kb = tl.load(k_base + t[:, None] * stride_kt + ks[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
    scores = tl.dot(do, v_t, input_precision=PRECISION) * within
    dq = tl.dot(scores.to(dtype), kb, input_precision=PRECISION)
    dq += tl.dot(do, state_t.to(dtype), input_precision=PRECISION) * to_token[:, None]
    tl.store(dq_base + t[:, None] * (heads * K) + ks[None, :], dq.to(dq_base.dtype.element_ty),
             mask=t_ok[:, None] & k_ok[None, :])  # fmt: skip
    last, to_end = _chunk_end(start, eos, t_ok, posf, g)
    decayed = (v_t.to(tl.float32) * to_end[None, :]).to(dtype)
    return tl.dot(decayed, kb, state_t * tl.exp(g * (last + 1.0)), input_precision=PRECISION)


@triton.jit
def lightning_dk_kernel(
    q_ptr, v_ptr, do_ptr, decay_ptr, dht_ptr, cu_ptr, table_ptr, dk_ptr, dh0_ptr, length, heads,
    stride_qb, stride_qt, stride_qh, stride_vb, stride_vt, stride_vh,
    K: tl.constexpr, V: tl.constexpr, VARLEN: tl.constexpr, SEGMENTED: tl.constexpr, HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BVF: tl.constexpr,
):  # fmt: skip
    """dk of a block of BK columns of K (and those rows of the initial state's gradient): the reverse scan, dS's
    rows of the block kept transposed [V, BK]."""
    i_nh, i_k, i_h, bos, eos, row = _example(tl.program_id(0), heads, tl.cdiv(K, BK), cu_ptr, length, VARLEN)
    g = tl.load(decay_ptr + i_h)
    pos, posf, within_t, to_token = _decays(g, BT, True)
    ks = i_k * BK + tl.arange(0, BK)
    vs = tl.arange(0, BVF)
    k_ok = ks < K
    v_ok = vs < V
    q_base = q_ptr + row * stride_qb + i_h * stride_qh
    v_base = v_ptr + row * stride_vb + i_h * stride_vh
    do_base = do_ptr + (row * length * heads + i_h) * V
    dk_base = dk_ptr + (row * length * heads + i_h) * K
    offset = i_nh.to(tl.int64) * K * V + ks[None, :] * V + vs[:, None]
    state_ok = v_ok[:, None] & k_ok[None, :]
    if HAS_DHT:
        grad_t = tl.load(dht_ptr + offset, mask=state_ok, other=0.0)
    else:
        grad_t = tl.zeros([BVF, BK], dtype=tl.float32)
    chunks, start, end = _walk_begin(bos, eos, table_ptr, SEGMENTED, True, BT)
    if WHILE_LOOP:
        i_r = chunks * 0
        while i_r < chunks:
            grad_t, start, end = _dk_step(q_base, v_base, do_base, dk_base, grad_t, i_r, chunks, bos, eos, start, end,
                                          table_ptr, heads, stride_qt, stride_vt, g, pos, posf, within_t, to_token, ks,
                                          k_ok, vs, v_ok, K, V, PRECISION, SEGMENTED, BT)  # fmt: skip
            i_r += 1
    else:
        for i_r in range(0, chunks):
            grad_t, start, end = _dk_step(q_base, v_base, do_base, dk_base, grad_t, i_r, chunks, bos, eos, start, end,
                                          table_ptr, heads, stride_qt, stride_vt, g, pos, posf, within_t, to_token, ks,
                                          k_ok, vs, v_ok, K, V, PRECISION, SEGMENTED, BT)  # fmt: skip
    if STORE_DH0:
        tl.store(dh0_ptr + offset, grad_t, mask=state_ok)


@triton.jit
def _dk_step(q_base, v_base, do_base, dk_base, grad_t, i, chunks, bos, eos, start, end, table_ptr, heads, stride_qt,
             stride_vt, g, pos, posf, within_t, to_token, ks, k_ok, vs, v_ok, K: tl.constexpr, V: tl.constexpr,
             PRECISION: tl.constexpr, SEGMENTED: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    """The program's i-th chunk from the end of dk (:func:`_walk_chunk`): (dS before it, the next chunk's start and
    end)."""
    start, end, next_start, next_end = _walk_chunk(i, chunks, bos, eos, start, end, table_ptr, SEGMENTED, True, BT)
    if SEGMENTED:
        grad_t = tl.where(start + BT >= end, 0.0, grad_t)  # an example's last chunk: no gradient from a later one
    grad_t = _dk_chunk(q_base, v_base, do_base, dk_base, grad_t, start, end, heads, stride_qt, stride_vt, g, pos,
                       posf, within_t, to_token, ks, k_ok, vs, v_ok, K, V, PRECISION)  # fmt: skip
    return grad_t, next_start, next_end


@triton.jit
def lightning_dv_kernel(
    q_ptr, k_ptr, do_ptr, decay_ptr, dht_ptr, cu_ptr, table_ptr, dv_ptr, length, heads,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    K: tl.constexpr, V: tl.constexpr, VARLEN: tl.constexpr, SEGMENTED: tl.constexpr, HAS_DHT: tl.constexpr,
    PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr, BT: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """dv of a block of BV columns of V: the reverse scan, dS's columns of the block kept [K, BV]."""
    i_nh, i_v, i_h, bos, eos, row = _example(tl.program_id(0), heads, tl.cdiv(V, BV), cu_ptr, length, VARLEN)
    g = tl.load(decay_ptr + i_h)
    pos, posf, within_t, to_token = _decays(g, BT, True)
    ks = tl.arange(0, BKF)
    vs = i_v * BV + tl.arange(0, BV)
    k_ok = ks < K
    v_ok = vs < V
    q_base = q_ptr + row * stride_qb + i_h * stride_qh
    k_base = k_ptr + row * stride_kb + i_h * stride_kh
    do_base = do_ptr + (row * length * heads + i_h) * V
    dv_base = dv_ptr + (row * length * heads + i_h) * V
    if HAS_DHT:
        offset = i_nh.to(tl.int64) * K * V + ks[:, None] * V + vs[None, :]
        grad = tl.load(dht_ptr + offset, mask=k_ok[:, None] & v_ok[None, :], other=0.0)
    else:
        grad = tl.zeros([BKF, BV], dtype=tl.float32)
    chunks, start, end = _walk_begin(bos, eos, table_ptr, SEGMENTED, True, BT)
    if WHILE_LOOP:
        i_r = chunks * 0
        while i_r < chunks:
            grad, start, end = _dv_step(q_base, k_base, do_base, dv_base, grad, i_r, chunks, bos, eos, start, end,
                                        table_ptr, heads, stride_qt, stride_kt, g, pos, posf, within_t, to_token, ks,
                                        k_ok, vs, v_ok, V, PRECISION, SEGMENTED, BT)  # fmt: skip
            i_r += 1
    else:
        for i_r in range(0, chunks):
            grad, start, end = _dv_step(q_base, k_base, do_base, dv_base, grad, i_r, chunks, bos, eos, start, end,
                                        table_ptr, heads, stride_qt, stride_kt, g, pos, posf, within_t, to_token, ks,
                                        k_ok, vs, v_ok, V, PRECISION, SEGMENTED, BT)  # fmt: skip


@triton.jit
def _dv_step(q_base, k_base, do_base, dv_base, grad, i, chunks, bos, eos, start, end, table_ptr, heads, stride_qt,
             stride_kt, g, pos, posf, within_t, to_token, ks, k_ok, vs, v_ok, V: tl.constexpr,
             PRECISION: tl.constexpr, SEGMENTED: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    """The program's i-th chunk from the end of dv (:func:`_walk_chunk`): (dS's block before it, the next chunk's
    start and end)."""
    start, end, next_start, next_end = _walk_chunk(i, chunks, bos, eos, start, end, table_ptr, SEGMENTED, True, BT)
    if SEGMENTED:
        grad = tl.where(start + BT >= end, 0.0, grad)
    grad = _dv_chunk(q_base, k_base, do_base, dv_base, grad, start, end, heads, stride_qt, stride_kt, g, pos, posf,
                     within_t, to_token, ks, k_ok, vs, v_ok, V, PRECISION)  # fmt: skip
    return grad, next_start, next_end


@triton.jit
def _dk_chunk(q_base, v_base, do_base, dk_base, grad_t, start, eos, heads, stride_qt, stride_vt, g, pos, posf,
              within_t, to_token, ks, k_ok, vs, v_ok, K: tl.constexpr, V: tl.constexpr, PRECISION: tl.constexpr):
    """One chunk of dk from token ``start``: its rows stored, dS (transposed) before the chunk returned."""
    dtype = do_base.dtype.element_ty
    t = start + pos
    t_ok = t < eos
    v = tl.load(v_base + t[:, None] * stride_vt + vs[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0)
    do_t = tl.load(do_base + vs[:, None] + t[None, :] * (heads * V), mask=v_ok[:, None] & t_ok[None, :], other=0.0)
    qb = tl.load(q_base + t[:, None] * stride_qt + ks[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
    last, to_end = _chunk_end(start, eos, t_ok, posf, g)
    scores = tl.dot(v, do_t, input_precision=PRECISION) * within_t
    dk = tl.dot(scores.to(dtype), qb, input_precision=PRECISION)
    dk += tl.dot(v, grad_t.to(dtype), input_precision=PRECISION) * to_end[:, None]
    tl.store(dk_base + t[:, None] * (heads * K) + ks[None, :], dk.to(dk_base.dtype.element_ty),
             mask=t_ok[:, None] & k_ok[None, :])  # fmt: skip
    scaled = (qb.to(tl.float32) * to_token[:, None]).to(dtype)
    return tl.dot(do_t, scaled, grad_t * tl.exp(g * (last + 1.0)), input_precision=PRECISION)


@triton.jit
def _dv_chunk(q_base, k_base, do_base, dv_base, grad, start, eos, heads, stride_qt, stride_kt, g, pos, posf,
              within_t, to_token, ks, k_ok, vs, v_ok, V: tl.constexpr, PRECISION: tl.constexpr):
    """One chunk of dv from token ``start``: its rows stored, dS's block before the chunk returned."""
    dtype = do_base.dtype.element_ty
    t = start + pos
    t_ok = t < eos
    kk = tl.load(k_base + t[:, None] * stride_kt + ks[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
    q_t = tl.load(q_base + ks[:, None] + t[None, :] * stride_qt, mask=k_ok[:, None] & t_ok[None, :], other=0.0)
    do = tl.load(do_base + t[:, None] * (heads * V) + vs[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0)
    last, to_end = _chunk_end(start, eos, t_ok, posf, g)
    scores = tl.dot(kk, q_t, input_precision=PRECISION) * within_t
    dv = tl.dot(scores.to(dtype), do, input_precision=PRECISION)
    dv += tl.dot(kk, grad.to(dtype), input_precision=PRECISION) * to_end[:, None]
    tl.store(dv_base + t[:, None] * (heads * V) + vs[None, :], dv.to(dv_base.dtype.element_ty),
             mask=t_ok[:, None] & v_ok[None, :])  # fmt: skip
    scaled = (q_t.to(tl.float32) * to_token[None, :]).to(dtype)
    return tl.dot(scaled, do, grad * tl.exp(g * (last + 1.0)), input_precision=PRECISION)


@triton.jit
def lightning_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, decay_ptr, dht_ptr, cu_ptr, table_ptr, dk_ptr, dv_ptr, dh0_ptr, length, heads,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    K: tl.constexpr, V: tl.constexpr, VARLEN: tl.constexpr, SEGMENTED: tl.constexpr, HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr, BT: tl.constexpr,
    BKF: tl.constexpr, BVF: tl.constexpr,
):  # fmt: skip
    """dk and dv together (``GradLaunch.merged``): one reverse scan per (example, head) holding the whole dS [K, V],
    so q, k, v and do are read once where the two kernels read them twice."""
    i_nh, _, i_h, bos, eos, row = _example(tl.program_id(0), heads, 1, cu_ptr, length, VARLEN)
    g = tl.load(decay_ptr + i_h)
    pos, posf, within_t, to_token = _decays(g, BT, True)
    ks = tl.arange(0, BKF)
    vs = tl.arange(0, BVF)
    k_ok = ks < K
    v_ok = vs < V
    q_base = q_ptr + row * stride_qb + i_h * stride_qh
    k_base = k_ptr + row * stride_kb + i_h * stride_kh
    v_base = v_ptr + row * stride_vb + i_h * stride_vh
    do_base = do_ptr + (row * length * heads + i_h) * V
    dk_base = dk_ptr + (row * length * heads + i_h) * K
    dv_base = dv_ptr + (row * length * heads + i_h) * V
    offset = i_nh.to(tl.int64) * K * V + ks[:, None] * V + vs[None, :]
    state_ok = k_ok[:, None] & v_ok[None, :]
    if HAS_DHT:
        grad = tl.load(dht_ptr + offset, mask=state_ok, other=0.0)
    else:
        grad = tl.zeros([BKF, BVF], dtype=tl.float32)
    chunks, start, end = _walk_begin(bos, eos, table_ptr, SEGMENTED, True, BT)
    if WHILE_LOOP:
        i_r = chunks * 0
        while i_r < chunks:
            grad, start, end = _dkv_step(q_base, k_base, v_base, do_base, dk_base, dv_base, grad, i_r, chunks, bos,
                                         eos, start, end, table_ptr, heads, stride_qt, stride_kt, stride_vt, g, pos,
                                         posf, within_t, to_token, ks, k_ok, vs, v_ok, K, V, PRECISION, SEGMENTED,
                                         BT)  # fmt: skip
            i_r += 1
    else:
        for i_r in range(0, chunks):
            grad, start, end = _dkv_step(q_base, k_base, v_base, do_base, dk_base, dv_base, grad, i_r, chunks, bos,
                                         eos, start, end, table_ptr, heads, stride_qt, stride_kt, stride_vt, g, pos,
                                         posf, within_t, to_token, ks, k_ok, vs, v_ok, K, V, PRECISION, SEGMENTED,
                                         BT)  # fmt: skip
    if STORE_DH0:
        tl.store(dh0_ptr + offset, grad, mask=state_ok)


@triton.jit
def _dkv_step(q_base, k_base, v_base, do_base, dk_base, dv_base, grad, i, chunks, bos, eos, start, end, table_ptr,
              heads, stride_qt, stride_kt, stride_vt, g, pos, posf, within_t, to_token, ks, k_ok, vs, v_ok,
              K: tl.constexpr, V: tl.constexpr, PRECISION: tl.constexpr, SEGMENTED: tl.constexpr,
              BT: tl.constexpr):  # fmt: skip
    """The program's i-th chunk from the end of dk and dv (:func:`_walk_chunk`): (dS before it, the next chunk's
    start and end)."""
    start, end, next_start, next_end = _walk_chunk(i, chunks, bos, eos, start, end, table_ptr, SEGMENTED, True, BT)
    if SEGMENTED:
        grad = tl.where(start + BT >= end, 0.0, grad)
    grad = _dkv_chunk(q_base, k_base, v_base, do_base, dk_base, dv_base, grad, start, end, heads, stride_qt,
                      stride_kt, stride_vt, g, pos, posf, within_t, to_token, ks, k_ok, vs, v_ok, K, V,
                      PRECISION)  # fmt: skip
    return grad, next_start, next_end


@triton.jit
def _dkv_chunk(q_base, k_base, v_base, do_base, dk_base, dv_base, grad, start, eos, heads, stride_qt, stride_kt,
               stride_vt, g, pos, posf, within_t, to_token, ks, k_ok, vs, v_ok, K: tl.constexpr, V: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
    """One chunk of dk and dv from token ``start``: both stored, the whole dS before the chunk returned."""
    dtype = do_base.dtype.element_ty
    t = start + pos
    t_ok = t < eos
    row_k = t_ok[:, None] & k_ok[None, :]
    row_v = t_ok[:, None] & v_ok[None, :]
    qq = tl.load(q_base + t[:, None] * stride_qt + ks[None, :], mask=row_k, other=0.0)
    kk = tl.load(k_base + t[:, None] * stride_kt + ks[None, :], mask=row_k, other=0.0)
    v = tl.load(v_base + t[:, None] * stride_vt + vs[None, :], mask=row_v, other=0.0)
    do = tl.load(do_base + t[:, None] * (heads * V) + vs[None, :], mask=row_v, other=0.0)
    last, to_end = _chunk_end(start, eos, t_ok, posf, g)
    grad_in = grad.to(dtype)
    scores = tl.dot(v, tl.trans(do), input_precision=PRECISION) * within_t
    dk = tl.dot(scores.to(dtype), qq, input_precision=PRECISION)
    dk += tl.dot(v, tl.trans(grad_in), input_precision=PRECISION) * to_end[:, None]
    tl.store(dk_base + t[:, None] * (heads * K) + ks[None, :], dk.to(dk_base.dtype.element_ty), mask=row_k)
    scores = tl.dot(kk, tl.trans(qq), input_precision=PRECISION) * within_t
    dv = tl.dot(scores.to(dtype), do, input_precision=PRECISION)
    dv += tl.dot(kk, grad_in, input_precision=PRECISION) * to_end[:, None]
    tl.store(dv_base + t[:, None] * (heads * V) + vs[None, :], dv.to(dv_base.dtype.element_ty), mask=row_v)
    scaled = (qq.to(tl.float32) * to_token[:, None]).to(dtype)
    return tl.dot(tl.trans(scaled), do, grad * tl.exp(g * (last + 1.0)), input_precision=PRECISION)


@dataclass(frozen=True)
class GradLaunch:
    """How the backward launches for one width of q / k: dq and dk over K blocks of ``block_k`` (all of V), dv over
    V blocks of ``block_v`` (all of K), ``num_warps`` a program; ``merged``: dk and dv from one reverse scan
    holding the whole state gradient [K, V] (:func:`lightning_dkv_kernel`: q, k, v and do read once), where q / k
    and v are at most ``MERGED_MAX_WIDTH`` wide."""

    block_k: int
    block_v: int
    num_warps: int
    merged: bool


# The launches per q / k width (the next power of two), swept on an H100 at 32 heads and huanhuan-shaped packed
# examples (benchmarks/RESULTS.md, "tnlora's scans against fla's chunk kernels"): at 128 (every layer but LRPE's)
# dk and dv as one launch at 8 warps, 2.35 → 2.18 ms forward + backward; at 256 (LRPE's layer doubles q / k)
# 128-wide K blocks at 8 warps, 5.68 → 5.11 ms (the merged scan's whole state gradient would not fit there).
# Other widths take the launch of the narrowest listed one at least as wide (the widest past it).
GRAD_LAUNCHES: dict[int, GradLaunch] = {128: GradLaunch(64, 32, 8, True), 256: GradLaunch(128, 32, 8, False)}
MERGED_MAX_WIDTH = 128
# The launches per width when the backward walks ScanChunks (BACKWARD_SEGMENT_TOKENS): there the merged dk / dv scan
# lost (2.22 ms against 1.88 at q/k 128, 1B's huanhuan-shaped layer on an H100) and dq, dk, dv apart at 64-wide K
# blocks and 4 warps won; at 256 the width's own launch stayed best (4.60 against 4.69 at 64:32:4).
SEGMENTED_LAUNCHES: dict[int, GradLaunch] = {128: GradLaunch(64, 32, 4, False), 256: GradLaunch(128, 32, 8, False)}
# The merged scan gives each (example, head) one program doing dk's and dv's work: fine when the programs fill the
# card, slow when a few long walks set the time. On an H200, 32 heads over 131,072 tokens (K 128) forward +
# backward: one example (32 lanes) 24.5 ms merged against 15.3 with two launches at 64:32:4 (fla 16.2), two
# examples (64 lanes) 13.7 against 10.6, four (128) 10.4 against 10.6. So a call of fewer than MERGED_MIN_LANES
# lanes (heads × tokens ÷ its longest example) takes FEW_LANES_LAUNCH where its width's launch is merged.
MERGED_MIN_LANES = 128
FEW_LANES_LAUNCH = GradLaunch(64, 32, 4, False)


def tile_width(n: int) -> int:
    """A tile's width for ``n`` columns: the next power of two, at least 16 (the products' least)."""
    return max(16, triton.next_power_of_2(n))


def listed_for_width(launches: dict[int, _Launch], key_dim: int) -> _Launch:
    """The launch ``launches`` lists for q / k ``key_dim`` wide: that of the narrowest listed width at least
    :func:`tile_width` (``key_dim``), the widest listed past them all."""
    width = tile_width(key_dim)
    fitting = [w for w in sorted(launches) if w >= width]
    return launches[fitting[0] if fitting else max(launches)]


def grad_launch(key_dim: int, lanes: int | None = None, segmented: bool = False) -> GradLaunch:
    """The backward's launch for q / k ``key_dim`` wide (:data:`GRAD_LAUNCHES`, or :data:`SEGMENTED_LAUNCHES` where
    the backward walks :class:`~tnlora.ops.packing.ScanChunks`), for a call of ``lanes`` lanes (None: not known,
    taken as many)."""
    launch = listed_for_width(SEGMENTED_LAUNCHES if segmented else GRAD_LAUNCHES, key_dim)
    return FEW_LANES_LAUNCH if launch.merged and lanes is not None and lanes < MERGED_MIN_LANES else launch


def triton_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    do: Tensor,
    cu_seqlens: Tensor | None = None,
    initial_state: Tensor | None = None,
    final_grad: Tensor | None = None,
    initial_grad: bool = False,
    lanes: int | None = None,
    chunks: ScanChunks | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The gradients of :func:`triton_forward`'s outputs: dq, dk, dv in the inputs' dtype, and the initial
    state's gradient (fp32) when ``initial_grad``. ``final_grad`` is the final state's incoming gradient;
    ``lanes`` the call's lanes where the caller knows them (:func:`grad_launch`; the dispatcher counts them,
    :func:`tnlora.ops.lightning.call_lanes`). ``chunks``: the examples of one row (B = 1) as
    :class:`~tnlora.ops.packing.ScanChunks` of :func:`chunk_tokens` chunks, in place of ``cu_seqlens``: each
    program walks a segment of examples, each example's chunks on their own; no states in or out."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    q, k, v = _token_rows(q), _token_rows(k), _token_rows(v)
    do = do.to(v.dtype).contiguous()
    if chunks is not None:
        if initial_state is not None or final_grad is not None or initial_grad:
            raise ValueError("segmented scans take no initial state and return no final state")
        if chunks.chunk != chunk_tokens(v.dtype):
            raise ValueError(f"{v.dtype} scans walk chunks of {chunk_tokens(v.dtype)} tokens, got {chunks.chunk}")
    examples, bounds = _walks(batch, cu_seqlens, chunks)
    dq = torch.empty(batch, length, heads, key_dim, device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq, dtype=k.dtype)
    dv = torch.empty(batch, length, heads, value_dim, device=v.device, dtype=v.dtype)
    dh0 = (
        torch.zeros(examples, heads, key_dim, value_dim, device=v.device, dtype=torch.float32)
        if initial_grad
        else None
    )
    if examples == 0 or length == 0:
        if dh0 is not None and final_grad is not None:
            dh0.copy_(final_grad)
        return dq.zero_(), dk.zero_(), dv.zero_(), dh0
    decay = log_decay.to(device=q.device, dtype=torch.float32).contiguous()
    h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
    dht = final_grad.to(torch.float32).contiguous() if final_grad is not None else None
    cu = bounds if bounds is not None else decay
    table = chunks.table if chunks is not None else decay
    full_k = tile_width(key_dim)
    full_v = tile_width(value_dim)
    launch = grad_launch(key_dim, lanes, segmented=chunks is not None)
    block_k = min(launch.block_k, full_k)
    block_v = min(launch.block_v, full_v)
    k_blocks = -(-key_dim // block_k)
    common = {**_scan_args(q, v, bounds), "SEGMENTED": chunks is not None, "num_warps": launch.num_warps}
    lightning_dq_kernel[(examples * heads * k_blocks,)](
        k, v, do, decay, h0 if h0 is not None else decay, cu, table, dq, length, heads,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        HAS_H0=h0 is not None, BK=block_k, BVF=full_v, **common,
    )  # fmt: skip
    if launch.merged and max(key_dim, value_dim) <= MERGED_MAX_WIDTH:
        lightning_dkv_kernel[(examples * heads,)](
            q, k, v, do, decay, dht if dht is not None else decay, cu, table, dk, dv,
            dh0 if dh0 is not None else decay, length, heads, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
            k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), HAS_DHT=dht is not None,
            STORE_DH0=dh0 is not None, BKF=full_k, BVF=full_v, **common,
        )  # fmt: skip
        return dq, dk, dv, dh0
    lightning_dk_kernel[(examples * heads * k_blocks,)](
        q, v, do, decay, dht if dht is not None else decay, cu, table, dk, dh0 if dh0 is not None else decay, length,
        heads, q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2),
        HAS_DHT=dht is not None, STORE_DH0=dh0 is not None, BK=block_k, BVF=full_v, **common,
    )  # fmt: skip
    lightning_dv_kernel[(examples * heads * -(-value_dim // block_v),)](
        q, k, do, decay, dht if dht is not None else decay, cu, table, dv, length, heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        HAS_DHT=dht is not None, BKF=full_k, BV=block_v, **common,
    )  # fmt: skip
    return dq, dk, dv, dh0


class TritonLightning(torch.autograd.Function):
    """:func:`triton_forward` with :func:`triton_backward` as its gradient (q, k, v and the initial state)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, cu_seqlens, initial_state, output_final_state, lanes, segments, chunks):
        o, final = triton_forward(q, k, v, log_decay, cu_seqlens, initial_state, output_final_state, segments)
        ctx.save_for_backward(q, k, v, log_decay, cu_seqlens, initial_state)
        ctx.lanes = lanes
        ctx.chunks = chunks
        return o, final

    @staticmethod
    def backward(ctx, do, final_grad):
        q, k, v, log_decay, cu_seqlens, initial_state = ctx.saved_tensors
        wants_h0 = initial_state is not None and ctx.needs_input_grad[5]
        dq, dk, dv, dh0 = triton_backward(
            q, k, v, log_decay, do, cu_seqlens, initial_state, final_grad, wants_h0, ctx.lanes, ctx.chunks
        )
        return dq, dk, dv, None, None, dh0, None, None, None, None


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    cu_seqlens: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    lanes: int | None = None,
    segments: ScanSegments | None = None,
    chunks: ScanChunks | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`triton_forward` with gradients for q, k, v and ``initial_state`` (two or three backward launches;
    ``lanes`` and ``chunks``: :func:`triton_backward`'s; ``segments``: :func:`triton_forward`'s). Without
    ``chunks`` the backward walks the examples of ``cu_seqlens`` one a program."""
    return TritonLightning.apply(
        q, k, v, log_decay, cu_seqlens, initial_state, output_final_state, lanes, segments, chunks
    )


__all__ = [
    "BACKWARD_SEGMENT_TOKENS",
    "CHUNK",
    "CHUNK_FP32",
    "FEW_LANES_LAUNCH",
    "GRAD_LAUNCHES",
    "MERGED_MIN_LANES",
    "SEGMENTED_LAUNCHES",
    "SEGMENT_TOKENS",
    "GradLaunch",
    "TritonLightning",
    "chunk_tokens",
    "grad_launch",
    "lightning_dk_kernel",
    "lightning_dkv_kernel",
    "lightning_dq_kernel",
    "lightning_dv_kernel",
    "lightning_forward_kernel",
    "listed_for_width",
    "tile_width",
    "triton_attention",
    "triton_backward",
    "triton_forward",
]
