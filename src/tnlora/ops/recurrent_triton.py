"""The one-token recurrent step of lightning attention as one fused Triton kernel.

:func:`triton_step` computes what :func:`tnlora.ops.recurrent.torch_step` does (S ← λ·S + kᵀv in place,
o = q·S after the update, padded rows adding nothing) in one kernel that reads each state tile once, updates
it, stores it and reduces q·S from the registers: one read and one write of S per step, where the PyTorch
form reads S about four times and writes it twice. At large batch those passes over the fp32 states dominate
a decode step. Results equal ``torch_step`` up to rounding (the kernel may fuse λ·S + k·v into one FMA and
sums q·S in another order). It launches one kernel and allocates only its output (or none, given ``out``),
with no host synchronisation, so it can be captured in a CUDA graph.

The kernel lives in :mod:`tnlora.ops.recurrent_kernel`, imported on the first :func:`triton_step` call, never
at import: the CPU path and ``import tnlora`` work without triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tnlora.ops.gemv import squares_dtype
from tnlora.ops.recurrent import check_step_shapes

# Tile of one program: BLOCK_K rows of the state (looped over K) by BLOCK_V columns (128-byte row segments,
# whole sectors). 128 × 32 at 4 warps is 32 fp32 values a thread, few enough registers (no spills on sm_90)
# for 8 programs an SM; 64 × 64 tiles need more than twice the registers.
BLOCK_K = 128
BLOCK_V = 32
NUM_WARPS = 4


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class StepLaunch(NamedTuple):
    """How :func:`triton_step` launches: state rows a tile (looped over K), columns of V a program, warps."""

    block_k: int = BLOCK_K
    block_v: int = BLOCK_V
    warps: int = NUM_WARPS


def _value_block(value_dim: int, block_v: int = BLOCK_V) -> int:
    """Columns of v (and o) one program takes."""
    return min(block_v, _next_power_of_2(value_dim))


def square_parts(heads: int, value_dim: int, block_v: int = BLOCK_V) -> int:
    """How many partial sums of squares of one o row ``triton_step(..., emit_squares=True)`` writes: one a head
    and block of V columns (``block_v``: the launch's, :class:`StepLaunch`)."""
    return heads * -(-value_dim // _value_block(value_dim, block_v))


def _kernel(deferred: bool = False) -> Any:
    """The Triton kernel, imported on first use so that importing this module never imports triton."""
    from tnlora.ops.recurrent_kernel import recurrent_deferred_kernel, recurrent_step_kernel

    return recurrent_deferred_kernel if deferred else recurrent_step_kernel


@dataclass(frozen=True)
class DeferredTerms:
    """What a step with deferred state writes keeps beside one layer's state (:func:`triton_step`'s ``deferred``):
    the k and v of the steps since the state was last written, ``hk`` [steps − 1, B, H, K] and ``hv``
    [steps − 1, B, H, V] in the state's dtype, and ``base``, the position (0-dim, or [B] as the position is)
    at which the state was whole. The state is written at every ``steps``-th step after ``base`` only; until
    then each step reads it and the held terms. :meth:`apply` makes it whole."""

    hk: Tensor
    hv: Tensor
    base: Tensor
    steps: int

    @staticmethod
    def allocate(state: Tensor, value_dim: int, base: Tensor, steps: int) -> DeferredTerms:
        """Zeroed terms for ``state`` [B, H, K, V] (``base`` shared by every layer)."""
        batch, heads, key_dim = state.shape[:3]
        hk = torch.zeros((steps - 1, batch, heads, key_dim), dtype=state.dtype, device=state.device)
        hv = torch.zeros((steps - 1, batch, heads, value_dim), dtype=state.dtype, device=state.device)
        return DeferredTerms(hk, hv, base, steps)

    def whole(self, state: Tensor, decay: Tensor, held: Tensor, row: int | None = None) -> Tensor:
        """The state after ``held`` steps held here (a 0-dim integer tensor, read on the device: no host sync),
        S' = λ^p S + Σ_{j<p} λ^{p−1−j} k_jᵀ v_j, as a new tensor (``state`` is not changed): of every row, or
        [H, K, V] of ``row`` alone (PyTorch ops; ``decay`` λ [H])."""
        index = slice(None) if row is None else row
        lam = decay.to(state.dtype)
        j = torch.arange(self.steps - 1, device=state.device)
        # Step j's weight λ^{p−1−j} for the held steps j < p, 0 for the others: [steps − 1, H].
        weights = torch.where((j < held)[:, None], lam ** (held - 1 - j).clamp_min(0)[:, None], 0.0)
        hk, hv = self.hk[:, index], self.hv[:, index]
        # Every held step's outer product at once, summed over the steps: a few kernels a layer, not a few a step.
        # Elementwise, not a matmul, so that TF32 (if a caller allows it) never rounds the state.
        weights = weights.view(weights.shape[0], *[1] * (hk.dim() - 3), weights.shape[1], 1, 1)
        held_sum = (weights * hk[..., :, None] * hv[..., None, :]).sum(0)
        return (lam**held)[:, None, None] * state[index] + held_sum

    def apply(self, state: Tensor, decay: Tensor, pending: int) -> None:
        """Make ``state`` whole in place after ``pending`` steps held here (:meth:`whole` of every row)."""
        if not 0 <= pending < self.steps:
            raise ValueError(f"pending must be 0 to {self.steps - 1}, got {pending}")
        if pending:
            state.copy_(self.whole(state, decay, torch.tensor(pending, device=state.device)))


def _check_position(position: Tensor | None, batch: int, what: str) -> None:
    """Refuse a position that is not an integer tensor, 0-dim or [B] (``what``: who needs it, for the message)."""
    if position is None or position.dtype.is_floating_point or tuple(position.shape) not in ((), (batch,)):
        raise ValueError(f"{what} an integer position, 0-dim or [B]={batch}")


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
    lrpe_theta: Tensor | None = None,
    position: Tensor | None = None,
    lrpe_angle_dtype: str = "float32",
    deferred: DeferredTerms | None = None,
    emit_squares: bool = False,
    launch: StepLaunch | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """One token as one Triton kernel: the arguments and results of :func:`torch_step` (``state`` updated in
    place), o written into ``out`` [B, H, V] (v's dtype) when given. With ``silu_qk`` the kernel applies the
    token mixer's SiLU to q and k itself (they are then the projection's raw slices): the step of
    ``torch_step(F.silu(q), F.silu(k), ...)`` with two fewer kernels. With ``lrpe_theta`` (an LRPE layer's θ,
    H·K values) it also applies that layer's LRPE at ``position`` (0-dim, or [B] one per row; integer):
    the step of ``torch_step(lrpe(q), lrpe(k), ...)``, ``state`` [B, H, 2K, V], with the roundings of
    ``Lrpe.forward`` for ``lrpe_angle_dtype`` ("float32" or "model"), where the PyTorch form launches about
    twenty small kernels. ``pdl``: launched as a programmatic dependent launch (sm_90 and later), its launch
    and its first state reads overlapping the end of the kernel before (which must therefore not write
    ``state``). ``deferred`` (with an integer ``position``): the state is written back only every
    ``deferred.steps`` steps after ``deferred.base`` and the steps between keep their k and v in the terms
    (:class:`DeferredTerms`): o equals the plain step's up to rounding, ``state`` holds the state of (position
    − base) mod steps steps before, and each step moves one read of the state and 1 ÷ steps of a write
    instead of a read and a write. ``emit_squares``: also return the partial sums of squares of o's rows (as
    stored, in v's dtype), ``(o, squares)``, squares [:func:`square_parts`, B] (fp64 for fp64 o, else fp32): what
    :func:`tnlora.ops.gemv.gemv` takes as ``norm_squares`` for the norm of o [B, H · V]. ``launch``: the tiles
    and warps (:class:`StepLaunch`; the default's when None; the square parts follow its ``block_v``).

    q, k, v may be strided views (the last dim contiguous, as the slices of the fused projection are);
    ``state`` must be contiguous. Any B, H, K, V; every tensor on one CUDA device (or CPU tensors under
    Triton's interpreter).
    """
    head_dim = q.shape[-1] if q.dim() == 3 else 0
    check_step_shapes(q, k, v, state, decay, pad, state_key_dim=2 * head_dim if lrpe_theta is not None else None)
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
    if decay.dtype != state.dtype:
        raise ValueError(f"decay must be in the state's dtype {state.dtype}, got {decay.dtype}")
    if lrpe_theta is not None:
        if lrpe_theta.numel() != q.shape[1] * head_dim or not lrpe_theta.is_contiguous():
            raise ValueError(f"lrpe_theta must be contiguous with H·K = {q.shape[1] * head_dim} values")
        _check_position(position, q.shape[0], "LRPE needs")
        if lrpe_angle_dtype not in ("float32", "model"):
            raise ValueError(f"lrpe_angle_dtype must be 'float32' or 'model', got {lrpe_angle_dtype!r}")
    if deferred is not None:
        _check_position(position, q.shape[0], "deferred state writes need")
        if deferred.base.shape != position.shape or deferred.steps < 2:
            raise ValueError("deferred.base must have the position's shape and deferred.steps be at least 2")
        if tuple(deferred.hk.shape) != (deferred.steps - 1, *state.shape[:3]) or tuple(deferred.hv.shape) != (
            deferred.steps - 1, *state.shape[:2], v.shape[2]
        ):
            raise ValueError(f"deferred terms must be [{deferred.steps - 1}, B, H, K or V] for state {tuple(state.shape)}")
        if not (deferred.hk.is_contiguous() and deferred.hv.is_contiguous()) or deferred.hk.dtype != state.dtype:
            raise ValueError("deferred terms must be contiguous and in the state's dtype")
    # The kernel indexes the last dim with stride 1; anything else is copied (never on the model's path).
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    batch, heads, key_dim = state.shape[:3]
    value_dim = v.shape[2]
    if out is None:
        out = torch.empty((batch, heads, value_dim), dtype=v.dtype, device=v.device)
    elif tuple(out.shape) != (batch, heads, value_dim) or out.dtype != v.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {v.dtype} tensor [B, H, V] with a contiguous last dim")
    launch = launch or StepLaunch()
    block_k = min(launch.block_k, _next_power_of_2(key_dim))
    block_v = _value_block(value_dim, launch.block_v)
    grid = (batch * heads, -(-value_dim // block_v))
    parts = square_parts(heads, value_dim, launch.block_v)
    squares = (torch.empty(parts, batch, dtype=squares_dtype(v.dtype), device=v.device)
               if emit_squares else None)  # fmt: skip
    common = (
        heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
        out.stride(1), lrpe_theta if lrpe_theta is not None else decay,  # unread without LRPE
    )
    flags = {
        "HAS_PAD": pad is not None, "SILU": silu_qk, "LRPE": lrpe_theta is not None,
        "ANGLE_MODEL": lrpe_angle_dtype == "model", "HD": head_dim, "PDL": pdl, "SQUARES": emit_squares,
        "BK": block_k, "BV": block_v,
        "num_warps": launch.warps, **({"launch_pdl": True} if pdl else {}),  # an option Triton before 3.3 does not know
    }
    pad_arg = pad if pad is not None else decay  # unread without HAS_PAD; any pointer will do
    squares_arg = squares if squares is not None else out  # unwritten without SQUARES
    per_row = 1 if position is not None and position.dim() == 1 else 0
    if deferred is None:
        _kernel()[grid](
            q, k, v, state, decay, pad_arg, out, *common, position if lrpe_theta is not None else decay, per_row,
            squares_arg, K=key_dim, V=value_dim, **flags,
        )  # fmt: skip
    else:
        _kernel(deferred=True)[grid](
            q, k, v, state, decay, pad_arg, out, deferred.hk, deferred.hv, deferred.base, *common, position,
            per_row, batch * heads * key_dim, batch * heads * value_dim, squares_arg, K=key_dim, V=value_dim,
            M=deferred.steps, **flags,
        )  # fmt: skip
    return (out, squares) if squares is not None else out


__all__ = ["DeferredTerms", "StepLaunch", "square_parts", "triton_step"]
