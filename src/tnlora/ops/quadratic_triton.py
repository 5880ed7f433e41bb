"""Lightning attention of short packed examples in its quadratic form, in blocks: no state, no scan.

Within one example the attention is a masked, decayed product (spec §8, Lightning-1's form):

    o = (q kᵀ ⊙ D) v,    D[i, j] = λ^(i−j) where tokens i ≥ j are of one example, else 0

Training's packed rows hold examples of ~100 tokens (huanhuan.json), so D is block diagonal: a row block of ``BT``
tokens meets only the few column blocks back to its first token's example start. Each program here takes one block
of tokens and those blocks, as FlashAttention's kernels do (without a softmax there are no row statistics), and the
grid's parallelism is every block × head at once, where :mod:`tnlora.ops.lightning_triton`'s scans walk each
example's chunks one after another holding a [K, V] state (whose registers leave its backward kernels none for
anything else). The work grows with the square of an example's length, so the dispatcher
(:func:`tnlora.ops.lightning._triton_attention`) takes this form only for packed rows whose longest example is at
most :data:`QUADRATIC_MAX_TOKENS`, and no states in or out.

The examples come as :class:`~tnlora.ops.packing.ExampleSpans` (each token's example start and end) of one row laid
end to end. The forward is one launch; the backward two: dq per row block (its column blocks as the forward's), dk
and dv together per column block (the row blocks forward to the end of its last token's example). Products take
the inputs' dtype with fp32 accumulation (bf16: the decayed scores rounded to bf16 for the second product, as
FlashAttention rounds its probabilities); fp32 inputs IEEE fp32 products, which the tests hold against the
recurrence. Imports triton at import; the dispatcher imports it on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from tnlora.ops.packing import ExampleSpans

# The longest example taken in this form (tokens); longer ones go to the scans, whose work grows linearly. 0: never
# (the default until the form has a training figure on the GPU).
QUADRATIC_MAX_TOKENS = 0


@dataclass(frozen=True)
class BlockLaunch:
    """Tokens a block (``block``, both sides of D's tiles) and warps a program, for the forward and the two backward
    launches."""

    block: int
    num_warps: int


# Per q / k width (the next power of two); other widths take the narrowest listed at least as wide.
FORWARD_LAUNCHES: dict[int, BlockLaunch] = {128: BlockLaunch(64, 4), 256: BlockLaunch(64, 8)}
DQ_LAUNCHES: dict[int, BlockLaunch] = {128: BlockLaunch(64, 4), 256: BlockLaunch(64, 8)}
DKV_LAUNCHES: dict[int, BlockLaunch] = {128: BlockLaunch(64, 8), 256: BlockLaunch(32, 8)}
BLOCK_V = 128  # the forward's V columns a program (o's block)
BLOCK_K_DQ = 128  # the dq launch's K columns a program


def _launch(launches: dict[int, BlockLaunch], key_dim: int, fp32: bool) -> BlockLaunch:
    """The launch listed for ``key_dim``'s width; fp32 tiles at half the tokens (IEEE products, twice the bytes)."""
    width = max(16, triton.next_power_of_2(key_dim))
    fitting = [w for w in sorted(launches) if w >= width]
    launch = launches[fitting[0] if fitting else max(launches)]
    return BlockLaunch(launch.block // 2, launch.num_warps) if fp32 else launch


@triton.jit
def _decays(rows, cols, first, g, TRANSPOSED: tl.constexpr):
    """D's tile: λ^(i−j) where token j is of token i's example (j ≥ i's example start ``first``) and j ≤ i, else 0;
    [rows, cols], or [cols, rows] TRANSPOSED."""
    if TRANSPOSED:
        gap = rows[None, :] - cols[:, None]
        keep = (gap >= 0) & (cols[:, None] >= first[None, :])
    else:
        gap = rows[:, None] - cols[None, :]
        keep = (gap >= 0) & (cols[None, :] >= first[:, None])
    return tl.where(keep, tl.exp(g * tl.where(keep, gap, 0).to(tl.float32)), 0.0)


@triton.jit
def _load(base, tokens, stride_t, cols, n_tokens, n_cols, TRANSPOSED: tl.constexpr):
    """A tile of a [tokens, cols] operand at ``base`` (token stride ``stride_t``, columns contiguous), zero outside;
    [cols, tokens] TRANSPOSED."""
    at = tokens.to(tl.int64) * stride_t
    if TRANSPOSED:
        return tl.load(base + cols[:, None] + at[None, :], mask=(cols[:, None] < n_cols) & (tokens[None, :] < n_tokens),
                       other=0.0)  # fmt: skip
    return tl.load(base + at[:, None] + cols[None, :], mask=(tokens[:, None] < n_tokens) & (cols[None, :] < n_cols),
                   other=0.0)  # fmt: skip


@triton.jit
def _forward_tile(q, k_base, v_base, acc, j, rows, first, g, length, stride_kt, stride_vt, ks, vs,
                  K: tl.constexpr, V: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    cols = j * BT + tl.arange(0, BT)
    k_t = _load(k_base, cols, stride_kt, ks, length, K, True)
    v = _load(v_base, cols, stride_vt, vs, length, V, False)
    scores = tl.dot(q, k_t, input_precision=PRECISION) * _decays(rows, cols, first, g, False)
    return tl.dot(scores.to(v.dtype), v, acc, input_precision=PRECISION)


@triton.jit
def quadratic_forward_kernel(
    q_ptr, k_ptr, v_ptr, decay_ptr, starts_ptr, o_ptr, length, heads, stride_qt, stride_qh, stride_kt, stride_kh,
    stride_vt, stride_vh, K: tl.constexpr, V: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """o for one block of tokens, one head and BV columns of V: the column blocks from its first token's example
    start to the block itself."""
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    g = tl.load(decay_ptr + i_h)
    rows = i_t * BT + tl.arange(0, BT)
    first = tl.load(starts_ptr + rows, mask=rows < length, other=0)
    ks = tl.arange(0, BK)
    vs = i_v * BV + tl.arange(0, BV)
    q = _load(q_ptr + i_h * stride_qh, rows, stride_qt, ks, length, K, False)
    k_base = k_ptr + i_h * stride_kh
    v_base = v_ptr + i_h * stride_vh
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    # Starts only grow along the row: the block's first token reaches back furthest.
    j = tl.load(starts_ptr + i_t * BT) // BT
    # Triton's interpreter cannot take a tensor bound in range() (numpy 2); compiled, the range loop.
    if WHILE_LOOP:
        while j <= i_t:
            acc = _forward_tile(q, k_base, v_base, acc, j, rows, first, g, length, stride_kt, stride_vt,
                                ks, vs, K, V, PRECISION, BT)  # fmt: skip
            j += 1
    else:
        for jj in range(j, i_t + 1):
            acc = _forward_tile(q, k_base, v_base, acc, jj, rows, first, g, length, stride_kt, stride_vt,
                                ks, vs, K, V, PRECISION, BT)  # fmt: skip
    tl.store(o_ptr + (rows.to(tl.int64)[:, None] * heads + i_h) * V + vs[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=(rows[:, None] < length) & (vs[None, :] < V))  # fmt: skip


@triton.jit
def _dq_tile(do, k_base, v_base, dq, j, rows, first, g, length, stride_kt, stride_vt, ks, vs,
             K: tl.constexpr, V: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    cols = j * BT + tl.arange(0, BT)
    v_t = _load(v_base, cols, stride_vt, vs, length, V, True)
    kk = _load(k_base, cols, stride_kt, ks, length, K, False)
    grads = tl.dot(do, v_t, input_precision=PRECISION) * _decays(rows, cols, first, g, False)
    return tl.dot(grads.to(kk.dtype), kk, dq, input_precision=PRECISION)


@triton.jit
def quadratic_dq_kernel(
    k_ptr, v_ptr, do_ptr, decay_ptr, starts_ptr, dq_ptr, length, heads, stride_kt, stride_kh, stride_vt, stride_vh,
    K: tl.constexpr, V: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BVF: tl.constexpr,
):  # fmt: skip
    """dq for one block of tokens, one head and BK columns of K: dq = (do vᵀ ⊙ D) k over the forward's blocks."""
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    i_k = tl.program_id(2)
    g = tl.load(decay_ptr + i_h)
    rows = i_t * BT + tl.arange(0, BT)
    first = tl.load(starts_ptr + rows, mask=rows < length, other=0)
    vs = tl.arange(0, BVF)
    ks = i_k * BK + tl.arange(0, BK)
    do = _load(do_ptr + i_h * V, rows, heads * V, vs, length, V, False)
    k_base = k_ptr + i_h * stride_kh
    v_base = v_ptr + i_h * stride_vh
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    j = tl.load(starts_ptr + i_t * BT) // BT
    if WHILE_LOOP:
        while j <= i_t:
            dq = _dq_tile(do, k_base, v_base, dq, j, rows, first, g, length, stride_kt, stride_vt,
                          ks, vs, K, V, PRECISION, BT)  # fmt: skip
            j += 1
    else:
        for jj in range(j, i_t + 1):
            dq = _dq_tile(do, k_base, v_base, dq, jj, rows, first, g, length, stride_kt, stride_vt,
                          ks, vs, K, V, PRECISION, BT)  # fmt: skip
    tl.store(dq_ptr + (rows.to(tl.int64)[:, None] * heads + i_h) * K + ks[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=(rows[:, None] < length) & (ks[None, :] < K))  # fmt: skip


@triton.jit
def _dkv_tile(kk, v, q_base, do_base, dk, dv, i, cols, starts_ptr, g, length, heads, stride_qt, ks, vs,
              K: tl.constexpr, V: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    rows = i * BT + tl.arange(0, BT)
    first = tl.load(starts_ptr + rows, mask=rows < length, other=length)
    qq = _load(q_base, rows, stride_qt, ks, length, K, False)
    do = _load(do_base, rows, heads * V, vs, length, V, False)
    decays = _decays(rows, cols, first, g, True)  # [cols, rows]
    scores = tl.dot(kk, tl.trans(qq), input_precision=PRECISION) * decays
    dv = tl.dot(scores.to(do.dtype), do, dv, input_precision=PRECISION)
    grads = tl.dot(v, tl.trans(do), input_precision=PRECISION) * decays
    dk = tl.dot(grads.to(qq.dtype), qq, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def quadratic_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, decay_ptr, starts_ptr, ends_ptr, dk_ptr, dv_ptr, length, heads, stride_qt,
    stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, K: tl.constexpr, V: tl.constexpr,
    PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr, BT: tl.constexpr, BKF: tl.constexpr, BVF: tl.constexpr,
):  # fmt: skip
    """dk and dv for one block of tokens (D's columns) and one head: dv = (q kᵀ ⊙ D)ᵀ do, dk = (do vᵀ ⊙ D)ᵀ q over
    the row blocks from the block itself to the end of its last token's example."""
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    g = tl.load(decay_ptr + i_h)
    cols = i_c * BT + tl.arange(0, BT)
    ks = tl.arange(0, BKF)
    vs = tl.arange(0, BVF)
    kk = _load(k_ptr + i_h * stride_kh, cols, stride_kt, ks, length, K, False)
    v = _load(v_ptr + i_h * stride_vh, cols, stride_vt, vs, length, V, False)
    q_base = q_ptr + i_h * stride_qh
    do_base = do_ptr + i_h * V
    dk = tl.zeros([BT, BKF], dtype=tl.float32)
    dv = tl.zeros([BT, BVF], dtype=tl.float32)
    # Ends only grow along the row: the block's last token's example ends last.
    last = tl.load(ends_ptr + tl.minimum(i_c * BT + BT, length) - 1)
    i_end = (last - 1) // BT
    if WHILE_LOOP:
        i = i_c
        while i <= i_end:
            dk, dv = _dkv_tile(kk, v, q_base, do_base, dk, dv, i, cols, starts_ptr, g, length, heads, stride_qt,
                               ks, vs, K, V, PRECISION, BT)  # fmt: skip
            i += 1
    else:
        for i in range(i_c, i_end + 1):
            dk, dv = _dkv_tile(kk, v, q_base, do_base, dk, dv, i, cols, starts_ptr, g, length, heads, stride_qt,
                               ks, vs, K, V, PRECISION, BT)  # fmt: skip
    at = cols.to(tl.int64)[:, None] * heads + i_h
    c_ok = cols[:, None] < length
    tl.store(dk_ptr + at * K + ks[None, :], dk.to(dk_ptr.dtype.element_ty), mask=c_ok & (ks[None, :] < K))
    tl.store(dv_ptr + at * V + vs[None, :], dv.to(dv_ptr.dtype.element_ty), mask=c_ok & (vs[None, :] < V))


def _flat(x: Tensor) -> Tensor:
    """[1, T, H, ·] as the kernels read it: the last dim contiguous (the projection's views already are)."""
    if x.shape[0] != 1:
        raise ValueError(f"the quadratic form takes one row laid end to end (B = 1), got {x.shape[0]} rows")
    return x if x.stride(-1) == 1 else x.contiguous()


def _common(q: Tensor, v: Tensor, launch: BlockLaunch) -> dict:
    """Launch arguments the three kernels take alike."""
    return dict(
        K=q.shape[-1], V=v.shape[-1], PRECISION="ieee" if v.dtype == torch.float32 else "tf32",
        WHILE_LOOP=not q.is_cuda, BT=launch.block, num_warps=launch.num_warps,
    )  # fmt: skip


def _width(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def quadratic_forward(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, spans: ExampleSpans) -> Tensor:
    """o [1, T, H, V] in v's dtype for q, k [1, T, H, K], v [1, T, H, V] (fp32 or half types; CUDA, or CPU tensors
    under Triton's interpreter) of the examples ``spans`` bounds, ``log_decay`` [H]."""
    q, k, v = _flat(q), _flat(k), _flat(v)
    _, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    o = torch.empty(1, length, heads, value_dim, device=v.device, dtype=v.dtype)
    if length == 0:
        return o
    decay = log_decay.to(device=q.device, dtype=torch.float32).contiguous()
    launch = _launch(FORWARD_LAUNCHES, key_dim, v.dtype == torch.float32)
    block_v = min(BLOCK_V, _width(value_dim))
    grid = (triton.cdiv(length, launch.block), heads, triton.cdiv(value_dim, block_v))
    quadratic_forward_kernel[grid](
        q, k, v, decay, spans.starts, o, length, heads, q.stride(1), q.stride(2), k.stride(1), k.stride(2),
        v.stride(1), v.stride(2), BK=_width(key_dim), BV=block_v, **_common(q, v, launch),
    )  # fmt: skip
    return o


def quadratic_backward(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, do: Tensor, spans: ExampleSpans
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (the inputs' dtypes) of :func:`quadratic_forward`'s output for its incoming gradient ``do``."""
    q, k, v = _flat(q), _flat(k), _flat(v)
    _, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    do = do.to(v.dtype).contiguous()
    dq = torch.empty(1, length, heads, key_dim, device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq, dtype=k.dtype)
    dv = torch.empty(1, length, heads, value_dim, device=v.device, dtype=v.dtype)
    if length == 0:
        return dq, dk, dv
    decay = log_decay.to(device=q.device, dtype=torch.float32).contiguous()
    fp32 = v.dtype == torch.float32
    launch = _launch(DQ_LAUNCHES, key_dim, fp32)
    block_k = min(BLOCK_K_DQ, _width(key_dim))
    grid = (triton.cdiv(length, launch.block), heads, triton.cdiv(key_dim, block_k))
    quadratic_dq_kernel[grid](
        k, v, do, decay, spans.starts, dq, length, heads, k.stride(1), k.stride(2), v.stride(1), v.stride(2),
        BK=block_k, BVF=_width(value_dim), **_common(q, v, launch),
    )  # fmt: skip
    launch = _launch(DKV_LAUNCHES, key_dim, fp32)
    quadratic_dkv_kernel[(triton.cdiv(length, launch.block), heads)](
        q, k, v, do, decay, spans.starts, spans.ends, dk, dv, length, heads, q.stride(1), q.stride(2), k.stride(1),
        k.stride(2), v.stride(1), v.stride(2), BKF=_width(key_dim), BVF=_width(value_dim), **_common(q, v, launch),
    )  # fmt: skip
    return dq, dk, dv


class QuadraticLightning(torch.autograd.Function):
    """:func:`quadratic_forward` with :func:`quadratic_backward` as its gradient (q, k, v)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, spans):
        ctx.save_for_backward(q, k, v, log_decay)
        ctx.spans = spans
        return quadratic_forward(q, k, v, log_decay, spans)

    @staticmethod
    def backward(ctx, do):
        q, k, v, log_decay = ctx.saved_tensors
        dq, dk, dv = quadratic_backward(q, k, v, log_decay, do, ctx.spans)
        return dq, dk, dv, None, None


def quadratic_attention(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, spans: ExampleSpans) -> Tensor:
    """:func:`quadratic_forward` with gradients for q, k and v (two backward launches)."""
    return QuadraticLightning.apply(q, k, v, log_decay, spans)


__all__ = [
    "DKV_LAUNCHES",
    "DQ_LAUNCHES",
    "FORWARD_LAUNCHES",
    "QUADRATIC_MAX_TOKENS",
    "BlockLaunch",
    "QuadraticLightning",
    "quadratic_attention",
    "quadratic_backward",
    "quadratic_dkv_kernel",
    "quadratic_dq_kernel",
    "quadratic_forward",
    "quadratic_forward_kernel",
]
