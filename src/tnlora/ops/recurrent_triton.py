"""The one-token recurrent step of lightning attention as one fused Triton kernel.

:func:`triton_step` computes what :func:`tnlora.ops.recurrent.torch_step` does (S ← λ·S + kᵀv in place,
o = q·S after the update, padded rows adding nothing) in one kernel that reads each state tile once, updates
it, stores it and reduces q·S from the registers: one read and one write of S per step, where the PyTorch
form reads S about four times and writes it twice. At large batch those passes over the fp32 states dominate
a decode step. Results equal ``torch_step`` up to rounding (the kernel may fuse λ·S + k·v into one FMA and
sums q·S in another order). It launches one kernel and allocates only its output (or none, given ``out``),
with no host synchronisation, so it can be captured in a CUDA graph.

Triton is imported on the first :func:`triton_step` call, never at import: the CPU path and ``import tnlora``
work without it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from tnlora.ops.recurrent import check_step_shapes

# Tile of one program: BLOCK_K rows of the state (looped over K) by BLOCK_V columns (128-byte row segments,
# whole sectors). 128 × 32 at 4 warps is 32 fp32 values a thread, few enough registers (no spills on sm_90)
# for 8 programs an SM; 64 × 64 tiles need more than twice the registers.
BLOCK_K = 128
BLOCK_V = 32
NUM_WARPS = 4


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@functools.cache
def _kernel() -> Any:
    """The Triton kernel, defined on first use so that importing this module never imports triton."""
    import triton
    import triton.language as tl

    from tnlora.ops.gemv_triton import gdc_launch_dependents, gdc_wait

    @triton.jit
    def recurrent_step_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        state_ptr,
        decay_ptr,
        pad_ptr,
        o_ptr,
        heads,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_vb,
        stride_vh,
        stride_ob,
        stride_oh,
        K: tl.constexpr,
        V: tl.constexpr,
        HAS_PAD: tl.constexpr,
        SILU: tl.constexpr,
        PDL: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
    ):
        # Axis 0 is (row, head) (up to 2³¹ programs; axis 1 is capped at 65,535), axis 1 the V block.
        i_bh = tl.program_id(0)
        i_v = tl.program_id(1)
        i_b = i_bh // heads
        i_h = i_bh % heads
        # int64 offsets: B·H·K·V passes 2³¹ from batch ~1,000 in LRPE layers.
        i_b64 = i_b.to(tl.int64)
        compute = state_ptr.dtype.element_ty
        cols = i_v * BV + tl.arange(0, BV)
        col_ok = cols < V
        state_base = state_ptr + i_bh.to(tl.int64) * (K * V)
        first_rows = tl.arange(0, BK)
        first_ok = (first_rows < K)[:, None] & col_ok[None, :]
        first_ptrs = state_base + first_rows[:, None] * V + cols[None, :]
        if PDL:
            # A programmatic dependent launch: the next kernel may start launching. The first state tile and
            # λ are read before the wait: only this kernel writes the state, in the step before, and a step
            # begins with a kernel that is not a dependent launch (the embedding), which waits for all before
            # it. Every read of q, k, v and every write comes after the wait.
            gdc_launch_dependents()
        s_first = tl.load(first_ptrs, mask=first_ok, other=0.0)
        decay = tl.load(decay_ptr + i_h)
        if PDL:
            gdc_wait()

        v = tl.load(v_ptr + i_b64 * stride_vb + i_h * stride_vh + cols, mask=col_ok, other=0.0).to(compute)
        if HAS_PAD:
            # where, not a product: a padded v of inf/nan must still count as zero (masked_fill).
            keep = tl.load(pad_ptr + i_b).to(tl.int32) == 0
            v = tl.where(keep, v, tl.zeros_like(v))

        q_base = q_ptr + i_b64 * stride_qb + i_h * stride_qh
        k_base = k_ptr + i_b64 * stride_kb + i_h * stride_kh
        o = tl.zeros([BV], dtype=compute)
        for k0 in tl.static_range(0, K, BK):
            rows = k0 + tl.arange(0, BK)
            row_ok = rows < K
            q = tl.load(q_base + rows, mask=row_ok, other=0.0)
            k = tl.load(k_base + rows, mask=row_ok, other=0.0)
            if SILU:
                # F.silu on the projection's slices (fp32 math for half types), rounded to their dtype as
                # PyTorch's op returns it.
                qf, kf = q.to(compute), k.to(compute)
                q = (qf / (1.0 + tl.exp(-qf))).to(q.dtype)
                k = (kf / (1.0 + tl.exp(-kf))).to(k.dtype)
            q, k = q.to(compute), k.to(compute)
            ptrs = state_base + rows[:, None] * V + cols[None, :]
            tile_ok = row_ok[:, None] & col_ok[None, :]
            if k0 == 0:  # noqa: SIM108 (a constant: static_range unrolls the loop, one side compiled)
                s = s_first
            else:
                s = tl.load(ptrs, mask=tile_ok, other=0.0)
            s = decay * s + k[:, None] * v[None, :]
            tl.store(ptrs, s, mask=tile_ok)
            # o after the update (recurrent_attention's order), reduced from the registers just stored.
            o += tl.sum(q[:, None] * s, axis=0)
        tl.store(o_ptr + i_b64 * stride_ob + i_h * stride_oh + cols, o.to(o_ptr.dtype.element_ty), mask=col_ok)

    return recurrent_step_kernel


def triton_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: Tensor,
    decay: Tensor,
    pad: Tensor | None = None,
    out: Tensor | None = None,
    silu_qk: bool = False,
    pdl: bool = False,
) -> Tensor:
    """One token as one Triton kernel: the arguments and results of :func:`torch_step` (``state`` updated in
    place), o written into ``out`` [B, H, V] (v's dtype) when given. With ``silu_qk`` the kernel applies the
    token mixer's SiLU to q and k itself (they are then the projection's raw slices): the step of
    ``torch_step(F.silu(q), F.silu(k), ...)`` with two fewer kernels. ``pdl``: launched as a programmatic
    dependent launch (sm_90 and later), its launch and its first state reads overlapping the end of the
    kernel before (which must therefore not write ``state``).

    q, k, v may be strided views (the last dim contiguous, as the slices of the fused projection are);
    ``state`` must be contiguous. Any B, H, K, V; every tensor on one CUDA device (or CPU tensors under
    Triton's interpreter).
    """
    check_step_shapes(q, k, v, state, decay, pad)
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
    if decay.dtype != state.dtype:
        raise ValueError(f"decay must be in the state's dtype {state.dtype}, got {decay.dtype}")
    # The kernel indexes the last dim with stride 1; anything else is copied (never on the model's path).
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    batch, heads, key_dim = q.shape
    value_dim = v.shape[2]
    if out is None:
        out = torch.empty((batch, heads, value_dim), dtype=v.dtype, device=v.device)
    elif tuple(out.shape) != (batch, heads, value_dim) or out.dtype != v.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {v.dtype} tensor [B, H, V] with a contiguous last dim")
    block_k = min(BLOCK_K, _next_power_of_2(key_dim))
    block_v = min(BLOCK_V, _next_power_of_2(value_dim))
    grid = (batch * heads, -(-value_dim // block_v))
    _kernel()[grid](
        q,
        k,
        v,
        state,
        decay,
        pad if pad is not None else decay,  # unread without HAS_PAD; any pointer will do
        out,
        heads,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        K=key_dim,
        V=value_dim,
        HAS_PAD=pad is not None,
        SILU=silu_qk,
        PDL=pdl,
        BK=block_k,
        BV=block_v,
        num_warps=NUM_WARPS,
        **({"launch_pdl": True} if pdl else {}),  # an option Triton before 3.3 does not know
    )
    return out


__all__ = ["triton_step"]
