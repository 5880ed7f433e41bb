"""Lightning attention: causal linear attention with a fixed per-head decay (spec §4.4 step 5, §8, §9).

    o_t = Σ_{s≤t, same example} λ^{t−s} (q_t·k_s) v_s,   λ = exp(log_decay) per head

No softmax, no q·k scale, no denominator. One entry point, :func:`lightning_attention`, dispatches to:

* ``"chunked"`` (:mod:`tnlora.ops.chunked`): pure PyTorch, exact, any device; the intra-chunk quadratic part
  and the inter-chunk state part, loop-free (spec §9).
* ``"recurrent"`` (:mod:`tnlora.ops.recurrent`): the per-token recurrence S_t = λ S_{t−1} + k_tᵀ v_t,
  o_t = q_t S_t (decoding steps; the reference for packed rows).
* ``"fla"`` (:mod:`tnlora.ops.fla`): fla-core's Triton ``chunk_simple_gla`` (CUDA only, optional extra
  ``tnlora[gpu]``).
* ``"triton"`` (:mod:`tnlora.ops.lightning_triton`): each example's chunks scanned in order by one program per
  (example, head, block): the forward in one Triton launch (prefill, evaluation), the backward in two or three;
  CUDA, or Triton's interpreter.
* ``"auto"``: what :mod:`tnlora.ops.select` picks for the device (the model passes a concrete choice).

Layout is sequence-first like fla: q, k [B, T, H, K]; v [B, T, H, V]; states [B, H, K, V].
Example boundaries inside a row (``rows``, a :class:`~tnlora.ops.packing.PackedRows`; or ``seq_ids``; or
``cu_seqlens`` for one row) reset the state: no decay or state crosses them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from tnlora.ops.chunked import chunked_attention
from tnlora.ops.fla import fla_attention
from tnlora.ops.packing import PackedRows, end_to_end, per_row
from tnlora.ops.recurrent import recurrent_attention
from tnlora.ops.select import attention_impl, scan_lanes, step_attention_impl

Impl = Literal["auto", "chunked", "recurrent", "fla", "triton"]
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
    rows: PackedRows | None = None,
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
        rows: the example boundaries of packed rows (the model passes these).
        seq_ids: [B, T] example index per token; a change between neighbours starts a new example (the
            same as ``rows=PackedRows.from_seq_ids(seq_ids)``).
        cu_seqlens: [N+1] cumulative example lengths (FlashAttention convention) for B = 1.
        initial_state: with cu_seqlens [N, H, K, V], one per example; otherwise [B, H, K, V], the state
            before the first token of each row (it feeds only the row's first example).
        output_final_state: also return the state after the last token: [N, H, K, V] per example with
            cu_seqlens, otherwise [B, H, K, V] of each row's last example.
        impl: "chunked", "recurrent", "fla", "triton" or "auto" (recurrent for T = 1, else what
            :func:`tnlora.ops.select.attention_impl` picks for the device).
        chunk_size: chunk length of the chunked implementation.

    Returns:
        o in v.dtype, [B, T, H, V]; final_state in fp32 (fp64 for fp64 inputs) or None.
    """
    if rows is not None and seq_ids is not None:
        raise ValueError("pass rows or seq_ids, not both")
    if rows is not None:
        seq_ids = rows.seq_ids
    _check_shapes(q, k, v, log_decay, seq_ids, cu_seqlens, initial_state)
    if impl == "auto":
        single = q.shape[1] == 1 and cu_seqlens is None
        impl = step_attention_impl(impl) if single else attention_impl(impl, q.device)
    if impl == "fla":
        if not q.is_cuda:
            raise ValueError("impl='fla' needs CUDA tensors (fla's kernels are Triton)")
        if rows is None and seq_ids is not None:
            rows = PackedRows.from_seq_ids(seq_ids)
        return fla_attention(q, k, v, log_decay, rows, cu_seqlens, initial_state, output_final_state)
    if impl == "triton":
        return _triton_attention(q, k, v, log_decay, rows, seq_ids, cu_seqlens, initial_state, output_final_state)
    if impl == "chunked":
        return chunked_attention(
            q, k, v, log_decay, seq_ids, cu_seqlens, initial_state, output_final_state, chunk_size
        )
    if impl == "recurrent":
        return recurrent_attention(q, k, v, log_decay, seq_ids, cu_seqlens, initial_state, output_final_state)
    raise ValueError(f"unknown lightning attention impl {impl!r}; choose auto, chunked, recurrent, fla or triton")


def call_lanes(q: Tensor, rows: PackedRows | None) -> int:
    """The lanes of an attention call on q [B, T, H, K] (:func:`tnlora.ops.select.scan_lanes`): heads × tokens ÷
    the longest example, from ``rows``' host boundaries (no device read), one example a row without them."""
    batch, length, heads = q.shape[:3]
    return scan_lanes(heads, batch * length, rows.longest_example if rows is not None else length)


def _triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    rows: PackedRows | None,
    seq_ids: Tensor | None,
    cu_seqlens: Tensor | None,
    initial_state: Tensor | None,
    output_final_state: bool,
) -> tuple[Tensor, Tensor | None]:
    """:mod:`tnlora.ops.lightning_triton`'s scans: the forward in one launch, with gradients the backward in two or
    three; packed rows run laid end to end."""
    from tnlora.ops import lightning_triton as scans

    if q.dtype == torch.float64 or not q.dtype == k.dtype == v.dtype:
        raise ValueError("impl='triton' takes q, k, v of one fp32 or half dtype; use impl='chunked' for fp64")
    tracked = [x for x in (q, k, v, initial_state) if x is not None]
    trains = torch.is_grad_enabled() and any(x.requires_grad for x in tracked)
    if rows is None and seq_ids is not None:
        rows = PackedRows.from_seq_ids(seq_ids)
    segments = chunks = None
    if rows is None:
        inputs = (q, k, v, log_decay, cu_seqlens, initial_state, output_final_state)
    else:
        rows = rows.to(q.device)
        flat_q, flat_k, flat_v, first = end_to_end(rows, q, k, v, initial_state)
        inputs = (flat_q, flat_k, flat_v, log_decay, rows.cu_seqlens, first, output_final_state)
        if initial_state is None and not output_final_state:
            if _quadratic_fits(rows):
                # Packed short examples (training's micro-batches, evaluation): the quadratic form in blocks, every
                # block of tokens × head at once, where the scans walk each example's chunks in order.
                from tnlora.ops import quadratic_triton

                attention = quadratic_triton.quadratic_attention if trains else quadratic_triton.quadratic_forward
                o = attention(flat_q, flat_k, flat_v, log_decay, rows.example_spans())
                return per_row(rows, o, None, q.shape[0])
            # Packed rows without states (training, evaluation): each forward program walks a segment of examples,
            # and each backward program the examples of a segment, each cut into chunks on its own.
            if scans.SEGMENT_TOKENS > 0:
                segments = rows.scan_segments(scans.SEGMENT_TOKENS)
            if trains and scans.BACKWARD_SEGMENT_TOKENS > 0:
                chunks = rows.scan_chunks(scans.BACKWARD_SEGMENT_TOKENS, scans.chunk_tokens(q.dtype))
    if trains:
        # The backward's launch depends on the call's lanes: counted from the packed rows' host boundaries or the
        # unpacked shape; unknown where only a bare cu_seqlens (a device tensor) bounds the examples.
        lanes = call_lanes(q, rows) if rows is not None or cu_seqlens is None else None
        o, final = scans.triton_attention(*inputs, lanes, segments, chunks)
    else:
        o, final = scans.triton_forward(*inputs, segments)
    return (o, final) if rows is None else per_row(rows, o, final, q.shape[0])


def _quadratic_fits(rows: PackedRows) -> bool:
    """Whether packed rows' examples are short enough for the quadratic form (their tokens' examples at most
    :data:`tnlora.ops.quadratic_triton.QUADRATIC_MAX_MEAN_TOKENS` long on average, from the host copy)."""
    from tnlora.ops import quadratic_triton

    return 0 < rows.mean_example_reach <= quadratic_triton.QUADRATIC_MAX_MEAN_TOKENS


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


__all__ = ["DEFAULT_CHUNK_SIZE", "Impl", "call_lanes", "lightning_attention"]
