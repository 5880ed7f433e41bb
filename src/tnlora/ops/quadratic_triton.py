"""Lightning attention of short packed examples in its quadratic form, in blocks: no state, no scan.

Within one example the attention is a masked, decayed product (spec §8, Lightning-1's form):

    o = (q kᵀ ⊙ D) v,    D[i, j] = λ^(i−j) where tokens i ≥ j are of one example, else 0

Training's packed rows hold examples of ~100 tokens (huanhuan.json), so D is block diagonal: a row block of ``BT``
tokens meets only the few column blocks back to its first token's example start. Each program here takes one block
of tokens and those blocks, as FlashAttention's kernels do (without a softmax there are no row statistics), and the
grid's parallelism is every block × head at once, where :mod:`tnlora.ops.lightning_triton`'s scans walk each
example's chunks one after another holding a [K, V] state (whose registers leave its backward kernels none for
anything else). The work grows with the square of an example's length, so the dispatcher
(:func:`tnlora.ops.lightning._triton_attention`) takes this form only for packed rows of short examples (their
tokens' examples at most :data:`QUADRATIC_MAX_MEAN_TOKENS` long on average), and no states in or out.

The examples come as :class:`~tnlora.ops.packing.ExampleSpans` (each token's example start and end) of one row laid
end to end. The forward is one launch; the backward two: dq per row block (the forward's kernel, its operands
swapped), dk and dv together per column block (the row blocks forward to the end of its last token's example).
Products take the inputs' dtype with fp32 accumulation (bf16: the decayed scores rounded to bf16 for the second
product, as FlashAttention rounds its probabilities); fp32 inputs IEEE fp32 products, which the tests hold against
the recurrence. Imports triton at import; the dispatcher imports it on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from tnlora.ops.lightning_triton import listed_for_width, tile_width
from tnlora.ops.packing import ExampleSpans

# Packed rows whose tokens' examples are this long on average (PackedRows.mean_example_reach: Σ L² ÷ Σ L) take this
# form; longer go to the scans, whose work a token does not grow with the example's length (0: never). On an H100
# (1B's 16 heads, 32,768 tokens, forward + backward; benchmarks/RESULTS.md, "Short packed examples in the quadratic
# form"): huanhuan-shaped examples (~110 by that mean) 2.05 -> 1.22 ms at q/k 128; uniform 256-token examples 1.67
# -> 1.42; 512 1.62 -> 2.06 (at q/k 256 still ahead, 4.09 -> 3.31). 320 sits below the crossover at q/k 128.
QUADRATIC_MAX_MEAN_TOKENS = 320


@dataclass(frozen=True)
class BlockLaunch:
    """Tokens a program's own block (``block``: the forward's and dq's rows of D, dk / dv's columns), warps a
    program and software-pipeline stages of the loop over the other side's tiles (``num_stages``: Triton's default
    on CUDA is 3), for the forward and the two backward launches; ``columns``: the output columns a program (o's V,
    dq's K; dk's and dv's, the wider in ``columns``: :func:`dkv_splits`). Below the width, more programs share a
    block, each holding smaller accumulators (fewer registers, more programs resident), while each reads the
    block's whole q / k tiles for the scores. ``step``: the tokens of each tile the loop walks (0: ``block``); a
    tall block over narrow steps reads each walked tile for more tokens of its own while less of its tiles lies
    past the examples' diagonal than a square one of its size."""

    block: int
    num_warps: int
    num_stages: int = 3
    columns: int = 128
    step: int = 0

    @property
    def walk(self) -> int:
        """The tokens of each tile the loop walks."""
        return self.step or self.block


# Per q / k width (the next power of two); other widths take the narrowest listed at least as wide. Swept on an H100
# at 1B's huanhuan-shaped micro-batch (16 heads, 32,768 tokens; benchmarks/RESULTS.md, "Short packed examples in the
# quadratic form"): 32-token blocks at 4 warps won every square launch at both widths (less of the blocks' area past
# the ~100-token examples' diagonal blocks than at 64). At q/k 128, 64-token blocks walking 32-token tiles since
# (their products on Hopper's warpgroup MMA, which needs 64 rows; 5.8 % off the three kernels at 1B's and 7B's
# micro-batches, H100); at 256 that launch's dk / dv holds 255 registers and 160 KB of shared memory a program.
FORWARD_LAUNCHES: dict[int, BlockLaunch] = {128: BlockLaunch(64, 4, step=32), 256: BlockLaunch(32, 4)}
DQ_LAUNCHES: dict[int, BlockLaunch] = {128: BlockLaunch(64, 4, step=32), 256: BlockLaunch(32, 4)}
DKV_LAUNCHES: dict[int, BlockLaunch] = {128: BlockLaunch(64, 4, step=32), 256: BlockLaunch(32, 4, columns=256)}


def _launch(launches: dict[int, BlockLaunch], key_dim: int, fp32: bool) -> BlockLaunch:
    """The launch listed for ``key_dim``'s width; fp32 tiles at half the tokens (IEEE products, twice the bytes), at
    least 16 (the products' least)."""
    launch = listed_for_width(launches, key_dim)
    if not fp32:
        return launch
    return replace(launch, block=max(16, launch.block // 2), step=max(16, launch.step // 2) if launch.step else 0)


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
    # One return: compiled, the code after a constexpr branch's early return is generated too.
    if TRANSPOSED:
        tile = tl.load(base + cols[:, None] + at[None, :], mask=(cols[:, None] < n_cols) & (tokens[None, :] < n_tokens),
                       other=0.0)  # fmt: skip
    else:
        tile = tl.load(base + at[:, None] + cols[None, :], mask=(tokens[:, None] < n_tokens) & (cols[None, :] < n_cols),
                       other=0.0)  # fmt: skip
    return tile


@triton.jit
def _rows_tile(a, b_base, c_base, acc, j, rows, first, g, length, stride_bt, stride_ct, bs, cs,
               AB: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr, BS: tl.constexpr):  # fmt: skip
    cols = j * BS + tl.arange(0, BS)
    b_t = _load(b_base, cols, stride_bt, bs, length, AB, True)
    c = _load(c_base, cols, stride_ct, cs, length, C, False)
    scores = tl.dot(a, b_t, input_precision=PRECISION) * _decays(rows, cols, first, g, False)
    return tl.dot(scores.to(c.dtype), c, acc, input_precision=PRECISION)


@triton.jit
def quadratic_rows_kernel(
    a_ptr, b_ptr, c_ptr, decay_ptr, starts_ptr, out_ptr, length, heads, stride_at, stride_ah, stride_bt, stride_bh,
    stride_ct, stride_ch, AB: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, BAB: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """(a bᵀ ⊙ D) c for one block of BT tokens (D's rows), one head and BC columns of c, over the column tiles of
    BS tokens from its first token's example start to its last token: the forward's o with (a, b, c) = (q, k, v),
    dq with (do, v, k). a and b are AB wide, c and the output [T, H, C] (contiguous) C wide."""
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    i_c = tl.program_id(2)
    g = tl.load(decay_ptr + i_h)
    rows = i_t * BT + tl.arange(0, BT)
    first = tl.load(starts_ptr + rows, mask=rows < length, other=0)
    bs = tl.arange(0, BAB)
    cs = i_c * BC + tl.arange(0, BC)
    a = _load(a_ptr + i_h * stride_ah, rows, stride_at, bs, length, AB, False)
    b_base = b_ptr + i_h * stride_bh
    c_base = c_ptr + i_h * stride_ch
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    # Starts only grow along the row: the block's first token reaches back furthest.
    j = tl.load(starts_ptr + i_t * BT) // BS
    j_last = (tl.minimum(i_t * BT + BT, length) - 1) // BS
    # Triton's interpreter cannot take a tensor bound in range() (numpy 2); compiled, the range loop.
    if WHILE_LOOP:
        while j <= j_last:
            acc = _rows_tile(a, b_base, c_base, acc, j, rows, first, g, length, stride_bt, stride_ct, bs, cs, AB, C,
                             PRECISION, BS)  # fmt: skip
            j += 1
    else:
        for jj in range(j, j_last + 1):
            acc = _rows_tile(a, b_base, c_base, acc, jj, rows, first, g, length, stride_bt, stride_ct, bs, cs, AB,
                             C, PRECISION, BS)  # fmt: skip
    tl.store(out_ptr + (rows.to(tl.int64)[:, None] * heads + i_h) * C + cs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < length) & (cs[None, :] < C))  # fmt: skip


@triton.jit
def _dkv_tile(kk, v, q_base, do_base, dk, dv, i, cols, starts_ptr, g, length, heads, stride_qt, ks, vs, kc, vc,
              K: tl.constexpr, V: tl.constexpr, PRECISION: tl.constexpr, BS: tl.constexpr,
              SPLIT: tl.constexpr):  # fmt: skip
    rows = i * BS + tl.arange(0, BS)
    first = tl.load(starts_ptr + rows, mask=rows < length, other=length)
    qq = _load(q_base, rows, stride_qt, ks, length, K, False)
    do = _load(do_base, rows, heads * V, vs, length, V, False)
    decays = _decays(rows, cols, first, g, True)  # [cols, rows]
    scores = tl.dot(kk, tl.trans(qq), input_precision=PRECISION) * decays
    grads = tl.dot(v, tl.trans(do), input_precision=PRECISION) * decays
    if SPLIT:  # this program's output columns of do and q, loaded again (cached) rather than sliced from the tiles
        do = _load(do_base, rows, heads * V, vc, length, V, False)
        qq = _load(q_base, rows, stride_qt, kc, length, K, False)
    dv = tl.dot(scores.to(do.dtype), do, dv, input_precision=PRECISION)
    dk = tl.dot(grads.to(qq.dtype), qq, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def quadratic_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, decay_ptr, starts_ptr, ends_ptr, dk_ptr, dv_ptr, length, heads, stride_qt,
    stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, K: tl.constexpr, V: tl.constexpr,
    PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BKF: tl.constexpr,
    BVF: tl.constexpr, BKC: tl.constexpr, BVC: tl.constexpr,
):  # fmt: skip
    """dk and dv for one block of BT tokens (D's columns) and one head: dv = (q kᵀ ⊙ D)ᵀ do, dk = (do vᵀ ⊙ D)ᵀ q
    over the row tiles of BS tokens from its first token to the end of its last token's example; program axis 2
    takes dk's BKC and dv's BVC columns of its split (the scores over the whole widths in every split)."""
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    i_s = tl.program_id(2)
    g = tl.load(decay_ptr + i_h)
    cols = i_c * BT + tl.arange(0, BT)
    ks = tl.arange(0, BKF)
    vs = tl.arange(0, BVF)
    kc = i_s * BKC + tl.arange(0, BKC)
    vc = i_s * BVC + tl.arange(0, BVC)
    split: tl.constexpr = BKC < BKF
    kk = _load(k_ptr + i_h * stride_kh, cols, stride_kt, ks, length, K, False)
    v = _load(v_ptr + i_h * stride_vh, cols, stride_vt, vs, length, V, False)
    q_base = q_ptr + i_h * stride_qh
    do_base = do_ptr + i_h * V
    dk = tl.zeros([BT, BKC], dtype=tl.float32)
    dv = tl.zeros([BT, BVC], dtype=tl.float32)
    # Ends only grow along the row: the block's last token's example ends last.
    last = tl.load(ends_ptr + tl.minimum(i_c * BT + BT, length) - 1)
    # Whole tiles a block (the launches listed): the first tile's index without a division.
    i_first = i_c * (BT // BS) if BT % BS == 0 else i_c * BT // BS
    i_end = (last - 1) // BS
    if WHILE_LOOP:
        i = i_first
        while i <= i_end:
            dk, dv = _dkv_tile(kk, v, q_base, do_base, dk, dv, i, cols, starts_ptr, g, length, heads, stride_qt,
                               ks, vs, kc, vc, K, V, PRECISION, BS, split)  # fmt: skip
            i += 1
    else:
        for i in range(i_first, i_end + 1):
            dk, dv = _dkv_tile(kk, v, q_base, do_base, dk, dv, i, cols, starts_ptr, g, length, heads, stride_qt,
                               ks, vs, kc, vc, K, V, PRECISION, BS, split)  # fmt: skip
    at = cols.to(tl.int64)[:, None] * heads + i_h
    c_ok = cols[:, None] < length
    tl.store(dk_ptr + at * K + kc[None, :], dk.to(dk_ptr.dtype.element_ty), mask=c_ok & (kc[None, :] < K))
    tl.store(dv_ptr + at * V + vc[None, :], dv.to(dv_ptr.dtype.element_ty), mask=c_ok & (vc[None, :] < V))


def output_columns(launch: BlockLaunch, width: int) -> int:
    """The output columns a forward / dq program of ``launch`` takes of an output ``width`` wide."""
    return min(launch.columns, tile_width(width))


def dkv_splits(key_tile: int, value_tile: int, columns: int) -> int:
    """The programs a dk / dv block's outputs split over: the wider tile in ``columns`` (a power of two), while each
    split keeps at least 16 columns of both (the products' least)."""
    splits = max(1, max(key_tile, value_tile) // columns)
    while splits > 1 and min(key_tile, value_tile) // splits < 16:
        splits //= 2
    return splits


def _flat(x: Tensor) -> Tensor:
    """[1, T, H, ·] as the kernels read it: the last dim contiguous (the projection's views already are)."""
    if x.shape[0] != 1:
        raise ValueError(f"the quadratic form takes one row laid end to end (B = 1), got {x.shape[0]} rows")
    return x if x.stride(-1) == 1 else x.contiguous()


def _rows_launch(a: Tensor, b: Tensor, c: Tensor, decay: Tensor, spans: ExampleSpans, out: Tensor,
                 launch: BlockLaunch) -> None:  # fmt: skip
    """:func:`quadratic_rows_kernel` writing ``out`` [1, T, H, C] from a, b [1, T, H, AB] and c [1, T, H, C]."""
    _, length, heads, width = a.shape
    c_width = c.shape[-1]
    block_c = output_columns(launch, c_width)
    quadratic_rows_kernel[(triton.cdiv(length, launch.block), heads, triton.cdiv(c_width, block_c))](
        a, b, c, decay, spans.starts, out, length, heads, a.stride(1), a.stride(2), b.stride(1), b.stride(2),
        c.stride(1), c.stride(2), AB=width, C=c_width, PRECISION="ieee" if c.dtype == torch.float32 else "tf32",
        WHILE_LOOP=not a.is_cuda, BT=launch.block, BS=launch.walk, BAB=tile_width(width), BC=block_c,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip


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
    _rows_launch(q, k, v, decay, spans, o, _launch(FORWARD_LAUNCHES, key_dim, v.dtype == torch.float32))
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
    _rows_launch(do, v, k, decay, spans, dq, _launch(DQ_LAUNCHES, key_dim, fp32))
    launch = _launch(DKV_LAUNCHES, key_dim, fp32)
    key_tile, value_tile = tile_width(key_dim), tile_width(value_dim)
    splits = dkv_splits(key_tile, value_tile, launch.columns)
    quadratic_dkv_kernel[(triton.cdiv(length, launch.block), heads, splits)](
        q, k, v, do, decay, spans.starts, spans.ends, dk, dv, length, heads, q.stride(1), q.stride(2), k.stride(1),
        k.stride(2), v.stride(1), v.stride(2), K=key_dim, V=value_dim, PRECISION="ieee" if fp32 else "tf32",
        WHILE_LOOP=not q.is_cuda, BT=launch.block, BS=launch.walk, BKF=key_tile, BVF=value_tile, BKC=key_tile // splits,
        BVC=value_tile // splits, num_warps=launch.num_warps, num_stages=launch.num_stages,
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
    "QUADRATIC_MAX_MEAN_TOKENS",
    "BlockLaunch",
    "QuadraticLightning",
    "dkv_splits",
    "output_columns",
    "quadratic_attention",
    "quadratic_backward",
    "quadratic_dkv_kernel",
    "quadratic_forward",
    "quadratic_rows_kernel",
]
