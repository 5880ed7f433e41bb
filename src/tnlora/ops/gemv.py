"""One-row projections of the batch-1 decode step, each with its neighbours fused in: y = W x for one x.

At batch 1 a decode step is a chain of matrix-vector products, each reading a weight once, with small kernels
between them (the RMS norms, the GLU's product, the residual adds). A Triton GEMV with a launch chosen per
shape streams TNL's weights faster than cuBLAS does for one row (``benchmarks/gemv.py --sweep``: the 7B
projections at 3.8–4.4 TB/s, benchmarks/RESULTS.md), and the small kernels fold into it:

* ``norm_eps``: x is SimpleRMSNorm-ed first. The dot products need only x's sum of squares, which the same
  pass over x accumulates: y = rstd(x) · W x, the norm's kernel gone. (The model rounds the normed x to its
  dtype before the matmul; here it stays exact: results equal the model's up to that rounding.)
* ``gate``: the token mixer's gated output norm, y = W (gate ⊙ norm(x)): the products read gate ⊙ x, the norm
  scales the sums.
* ``weight2``: the channel mixer's GLU, y = (W x) ⊙ (W₂ x), both products from one pass over x.
* ``residual``: y = residual + W x, the residual add of a decoder layer.

Products are rounded to the output dtype where the model's Linear rounds them (before the GLU's product and
before the residual add), so apart from the norm's rounding and the order of the sums the results are the
model's. :func:`gemv_reference` is the model's own composition of PyTorch ops, that the tests check against.
``pdl`` launches the kernel as a programmatic dependent launch (sm_90 and later): it reads its first weight
tile while the kernel before it finishes, which a chain of them inside a CUDA graph gains from.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _kernels() -> Any:
    """The module of the Triton kernels, imported on first use so that importing this module never imports
    triton."""
    from tnlora.ops import gemv_triton

    return gemv_triton


class GemvConfig(NamedTuple):
    """How :func:`gemv` launches: rows per program, columns per step, warps, software-pipeline stages,
    whether each step's products are summed to the rows at once (``row_sum``: fewer registers) or kept as a
    tile summed at the end, and, as a dependent launch, whether the next kernel may launch as soon as this one
    starts (``early``) or only once its loop is done. For several rows only, ``swap``: each step's product taken
    as W xᵀ rather than x Wᵀ, the weight's rows on the matrix unit's wide side (Hopper's warpgroup MMA takes 64
    rows there at least; a block of 16 to 64 rows of x is the narrow side). A normed call that sums its own
    squares (no ``norm_squares``) takes its products as x Wᵀ whatever ``swap`` says (see :func:`gemv`). For
    several rows only, ``split``: the columns of K split into that many parts, each a program of its own whose
    sums the last to finish adds up (more programs for a weight of few tiles; see :func:`gemv`); ``tma``: the
    weight tiles read by the copy engine (TMA, sm_90 and later) through tensor descriptors instead of each
    thread's loads (see :func:`gemv`); ``prefetch``: each program asks for its weight rows' next ``prefetch``
    column steps to be brought into L2 before it waits for the kernel before it (sm_90 and later; see
    :func:`gemv`). In fp64 several rows take at most ``FP64_STEP`` values of x a step
    (``block_k`` shortened to fit)."""

    block_n: int
    block_k: int
    warps: int = 4
    stages: int = 3
    row_sum: bool = False
    early: bool = False
    swap: bool = False
    split: int = 1
    tma: bool = False
    prefetch: int = 0


# The launch per TNL shape (N, K, GLU) that measured fastest on the H200 (benchmarks/RESULTS.md, "The GEMV
# step"): for 7B the best of benchmarks/gemv.py --sweep (1,024 columns a step, no software pipelining but for
# the GLU, few rows a program), which benchmarks/gemv_step.py's choice inside the step kept within 0.1 %; for
# 1B the launches gemv_step.py chose inside the captured step with dependent launches. Every one lets the
# next kernel launch as soon as it starts (``early``: 1B 0.662 → 0.644 ms a step, 7B 3.432 → 3.384, then 1B
# 0.634 with its launches searched again).
TUNED = {
    (16384, 4096, False): GemvConfig(4, 1024, 4, 1, False, True),  # 7B qkvu
    (4096, 4096, False): GemvConfig(8, 1024, 4, 1, False, True),  # 7B out_proj
    (11008, 4096, True): GemvConfig(2, 1024, 4, 3, False, True),  # 7B l1 / l2 as the GLU
    (4096, 11008, False): GemvConfig(8, 1024, 4, 1, False, True),  # 7B l3
    (64000, 4096, False): GemvConfig(4, 1024, 4, 1, False, True),  # 7B lm_head
    (8192, 2048, False): GemvConfig(2, 1024, 4, 3, False, True),  # 1B qkvu
    (2048, 2048, False): GemvConfig(4, 2048, 4, 1, False, True),  # 1B out_proj
    (5632, 2048, True): GemvConfig(2, 1024, 4, 1, False, True),  # 1B l1 / l2 as the GLU
    (2048, 5632, False): GemvConfig(4, 2048, 4, 1, False, True),  # 1B l3
    (64000, 2048, False): GemvConfig(2, 1024, 4, 1, False, True),  # 1B lm_head
}


# The same for several rows: what benchmarks/gemv_step.py --batch 32 chose inside the captured batch-32 step
# (weight rows a program, columns a step, warps, stages; dependents launched early; the last field: the
# products as W xᵀ; the parts K is split into), both on an H100 with the norms reading the squares the projection
# before wrote: 1B's step 1.551 → 1.520 ms (the layer forwards' 1.609), 7B's 7.640 → 7.179 (7.262); then 7B's
# out_proj and l3 in two parts of K each (``--splits 2,4 --split_only``): 6.797 → 6.605 ms; then the next one or
# two column steps asked into L2 before the wait (``--prefetch 1,2,3 --prefetch_only``; l3 and the heads tied
# without): 1B 1.428 → 1.412, 7B 6.611 → 6.569.
ROWS_TUNED = {
    (16384, 4096, False): GemvConfig(128, 128, 4, 4, False, True, prefetch=2),  # 7B qkvu
    (4096, 4096, False): GemvConfig(64, 128, 4, 4, False, True, True, 2, prefetch=2),  # 7B out_proj
    (11008, 4096, True): GemvConfig(64, 128, 4, 4, False, True, True, prefetch=2),  # 7B l1 / l2 as the GLU
    (4096, 11008, False): GemvConfig(64, 128, 4, 4, False, True, True, 2),  # 7B l3
    (64000, 4096, False): GemvConfig(128, 128, 8, 4, False, True, True),  # 7B lm_head
    (8192, 2048, False): GemvConfig(64, 128, 4, 4, False, True, True, prefetch=2),  # 1B qkvu
    (2048, 2048, False): GemvConfig(16, 256, 4, 4, False, True, prefetch=1),  # 1B out_proj
    (5632, 2048, True): GemvConfig(32, 128, 4, 4, False, True, prefetch=1),  # 1B l1 / l2 as the GLU
    (2048, 5632, False): GemvConfig(32, 256, 4, 4, False, True),  # 1B l3
    (64000, 2048, False): GemvConfig(128, 128, 4, 2, False, True),  # 1B lm_head
}
# The fewest rows of x a launch of ROWS_TUNED asks for its prefetch at: the entries were chosen at 32 rows, and
# at 8 the 7B step ran 2 % slower with them (1B unchanged), so smaller batches run their launches without.
PREFETCH_MIN_ROWS = 17
# The most values of x a step of the fp64 rows kernel multiplies (BLOCK_M x BLOCK_K; the column step is
# shortened to fit): it holds a tile's products [BLOCK_M, BLOCK_N, BLOCK_K] in registers, and ptxas for sm_90
# gives the normed GLU form 0 to 560 B of stack a thread at the tested launches so shortened, against 57 KB
# at 32 x 32 x 256. A bound on x's part alone keeps the order of the sums the same for launches that differ only
# in weight rows a program.
FP64_STEP = 128
# The most rows :func:`gemv` takes at once (its block of rows is their next power of two, 16 at least).
ROWS_MAX = 64


def squares_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the partial sums of squares a norm of rows of ``dtype`` reads (``norm_squares``) and a kernel
    writes for it (``emit_squares``, here and in :func:`tnlora.ops.recurrent_triton.triton_step`)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gemv_config(n: int, k: int, glu: bool = False, rows: int = 1) -> GemvConfig:
    """The launch for y [N] = W [N, K] x: the measured one for TNL's shapes (``TUNED``), else 4 rows a program
    and 1,024 columns a step (or K's next power of two), 3 stages, dependents launched early (other shapes are
    not measured). For several ``rows`` of x: ``ROWS_TUNED``'s (without its prefetch under
    ``PREFETCH_MIN_ROWS`` rows), else 32 weight rows a program (the dot's operands need 16 at least) and 256
    columns a step."""
    if rows > 1:
        if (n, k, glu) in ROWS_TUNED:
            launch = ROWS_TUNED[n, k, glu]
            return launch if rows >= PREFETCH_MIN_ROWS else launch._replace(prefetch=0)
        return GemvConfig(32, min(256, max(16, 1 << (k - 1).bit_length())), 4, 3, False, True)
    if (n, k, glu) in TUNED:
        return TUNED[n, k, glu]
    return GemvConfig(4, min(1024, 1 << (k - 1).bit_length()), 4, 3, False, True)


def gemv(
    x: Tensor,
    weight: Tensor,
    *,
    weight2: Tensor | None = None,
    residual: Tensor | None = None,
    norm_eps: float | None = None,
    gate: Tensor | None = None,
    config: GemvConfig | None = None,
    pdl: bool = False,
    norm_squares: Tensor | None = None,
    emit_squares: bool = False,
) -> Any:
    """y [N] for one x [K] (contiguous) and weight [N, K] (rows contiguous): W x, with x RMS-normed first when
    ``norm_eps`` is given and then multiplied by ``gate`` [K] when given (the token mixer's gated output norm,
    ``gate ⊙ norm(x)``), times W₂ x when ``weight2`` [N, K] is given, plus ``residual`` [N] when given. y has
    x's dtype. ``config``: the launch (default :func:`gemv_config`). ``pdl``: launch as a programmatic
    dependent launch (sm_90 and later; see the kernel), which lets it overlap the kernel before it.

    For up to ``ROWS_MAX`` rows x [M, K] (rows contiguous, any row stride; gate [M, K] and residual [M, N]
    alike) the same for every row, y [M, N] (contiguous): each weight tile is read once for all rows, each row
    normed by itself (the decode step of a small batch). For rows only: ``norm_squares``, the partial sums of
    squares of x's rows [P, M] that the projection producing x returned (``emit_squares``), which the norm then
    reads instead of summing x² itself; ``emit_squares``: also return those of y's rows, ``(y, squares)``
    (fp32, fp64 for fp64)."""
    rows = x.shape[0] if x.dim() == 2 else None
    if rows is None and (x.dim() != 1 or not x.is_contiguous()):
        raise ValueError(f"x must be one contiguous vector or [M, K] rows, got shape {tuple(x.shape)}")
    if rows is not None and not (1 <= rows <= ROWS_MAX and x.stride(1) == 1):
        raise ValueError(f"x [M, K] must have 1 to {ROWS_MAX} rows with contiguous values, got {tuple(x.shape)}")
    n, k = weight.shape
    lead = () if rows is None else (rows,)
    for other, name in ((weight, "weight"), (weight2, "weight2")):
        if other is not None and (other.shape != (n, k) or other.stride(1) != 1 or other.dtype != x.dtype):
            raise ValueError(f"{name} must be [{n}, {k}] of {x.dtype} with contiguous rows")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} values, the weight's rows {k}")
    for vector, name, width in ((residual, "residual", n), (gate, "gate", k)):
        if vector is not None and (vector.shape != (*lead, width) or vector.stride(-1) != 1 or vector.dtype != x.dtype
                                   or (rows is None and not vector.is_contiguous())):
            raise ValueError(f"{name} must be {list((*lead, width))} of {x.dtype} with contiguous values")
    if gate is not None and norm_eps is None:
        raise ValueError("gate needs norm_eps: it gates the normed x")
    sums_dtype = squares_dtype(x.dtype)
    if (norm_squares is not None or emit_squares) and rows is None:
        raise ValueError("norm_squares and emit_squares are for x of several rows [M, K]")
    if norm_squares is not None and (norm_eps is None or norm_squares.dim() != 2 or norm_squares.shape[1] != rows
                                     or not norm_squares.is_contiguous() or norm_squares.dtype != sums_dtype):
        raise ValueError(f"norm_squares must be contiguous [P, {rows}] of {sums_dtype} and needs norm_eps")
    y = torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages, row_sum, early, swap, split, tma, prefetch = config or gemv_config(
        n, k, glu=weight2 is not None, rows=rows or 1
    )
    if (swap or split != 1 or tma or prefetch) and rows is None:
        raise ValueError("a launch with swap, split, tma or prefetch is for x of several rows [M, K]")
    if split < 1:
        raise ValueError(f"split must be at least 1, got {split}")
    if prefetch < 0:
        raise ValueError(f"prefetch must be 0 or more column steps, got {prefetch}")
    gate_in = gate if gate is not None else x  # unread without a gate
    weight2_in = weight2 if weight2 is not None else weight  # unread without GLU
    residual_in = residual if residual is not None else y  # unread without a residual
    pointers = (x, gate_in, weight, weight2_in, residual_in, y)
    options = {
        "K": k,
        "NORM": norm_eps is not None,
        "GATE": gate is not None,
        "GLU": weight2 is not None,
        "RESIDUAL": residual is not None,
        "EVEN_K": k % block_k == 0,
        "PDL": pdl,
        "EARLY": early,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "num_warps": warps,
        "num_stages": stages,
        **({"launch_pdl": True} if pdl else {}),  # an option Triton before 3.3 does not know
    }
    eps = norm_eps if norm_eps is not None else 0.0
    if rows is None:
        _kernels().gemv_kernel[(_cdiv(n, block_n),)](
            *pointers, n, weight.stride(0), weight2_in.stride(0), eps,
            FP64=x.dtype == torch.float64, ROW_SUM=row_sum, **options,
        )  # fmt: skip
        return y
    # The tensor cores' dot needs 16 rows at least; fp64 sums products instead (no fp64 dot).
    dot = x.dtype != torch.float64
    if dot and block_n < 16:
        raise ValueError(f"a launch for several rows needs block_n >= 16, got {block_n}")
    block_m = row_block(rows)
    if not dot:
        # fp64 holds a tile's products in registers; a long step spills them (32 x 32 x 256, the default launch
        # at 17 rows: 57 KB of stack a thread, which CUDA reserves for every thread the card can run, ~16 GB on
        # an H100: out of memory beside other processes). Shorter steps sum the same products in another order.
        block_k = min(block_k, max(2, FP64_STEP // block_m))
        options["BLOCK_K"] = block_k
    own_squares = norm_eps is not None and norm_squares is None
    # The products as W xᵀ beside the norm's own Gram matrix x xᵀ (two tensor-core dots in one loop) summed
    # wrong on an H100 with Triton 3.6, differently run to run (a race in the generated code; fine with the
    # squares read in, or the products as X Wᵀ): a launch whose norm sums its own squares takes them as X Wᵀ.
    swap = swap and dot and not own_squares
    # A part of K has only its own columns of x, so a norm that sums its own squares runs unsplit.
    k_part, splits = k_parts(k, block_k, 1 if own_squares else split)
    tiles = _cdiv(n, block_n)
    squares_out = torch.empty(tiles, rows, dtype=sums_dtype, device=x.device) if emit_squares else None
    if splits > 1:
        kinds = 2 if weight2 is not None else 1
        part_sums = torch.empty(splits * kinds, rows, n, dtype=sums_dtype, device=x.device)
        counts = split_counters(x.device, tiles)
    else:
        part_sums = counts = y  # unread unsplit
    parts = norm_squares.shape[0] if norm_squares is not None else 1
    # The copy engine reads what it can address: the weights, and x and the gate where their rows allow too.
    tma = tma and dot and all(tma_addressable(t, block_k) for t in (weight, weight2) if t is not None)
    tma_x = tma and all(tma_addressable(t, block_k) for t in (x, gate) if t is not None)
    # L2 prefetches of whole rows need the rows and the steps on 16 bytes, and sm_90's bulk copies.
    if prefetch and not (dot and not tma and all(prefetchable(t, block_k) for t in (weight, weight2) if t is not None)):
        prefetch = 0
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        def described(t: Tensor, block: int) -> TensorDescriptor:
            return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [block, block_k])

        inputs = (described(x, block_m), described(gate_in, block_m)) if tma_x else (x, gate_in)
        pointers = (*inputs, described(weight, block_n), described(weight2_in, block_n), residual_in, y)
    options.update(DOT=dot, PRECISION="ieee", BLOCK_M=block_m, TMA=tma, TMA_X=tma_x, PREFETCH=prefetch,
                   SQUARES_IN=norm_squares is not None, SQUARES_OUT=emit_squares, SWAP=swap, SPLIT=splits,
                   K_PART=k_part, EVEN_K=k % k_part == 0, BLOCK_P=max(2, 1 << (parts - 1).bit_length()))
    arguments = (*pointers, rows, n, x.stride(0), gate_in.stride(0), residual_in.stride(0), weight.stride(0),
                 weight2_in.stride(0), eps, norm_squares if norm_squares is not None else y,
                 squares_out if squares_out is not None else y, parts, part_sums, counts)
    _launch_rows((tiles, splits), arguments, options, x)
    return (y, squares_out) if emit_squares else y


# The counters of split launches (:func:`gemv` with ``split``), one a tile, by device: zero before a launch and
# set back to zero by the launch's last program, so calls one after the other reuse them as they are. Each
# call takes the next slots of the ring, so that calls running at once (other streams, graphs replayed side by
# side) do not share counters unless the ring has wrapped between them.
SPLIT_COUNTER_SLOTS = 1 << 16
_SPLIT_COUNTERS: dict[torch.device, list[Any]] = {}


def split_counters(device: torch.device, tiles: int) -> Tensor:
    """``tiles`` zeroed int32 counters on ``device`` for one split launch (the ring's next slots). The ring is
    made on the device's first split call, which therefore must not be inside a CUDA graph's capture (graph
    decoding warms every launch up before it captures)."""
    ring = _SPLIT_COUNTERS.get(device)
    if ring is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a split launch's first call on a device must come before a CUDA graph capture")
        ring = _SPLIT_COUNTERS[device] = [torch.zeros(SPLIT_COUNTER_SLOTS, dtype=torch.int32, device=device), 0]
    counters, start = ring
    if tiles > SPLIT_COUNTER_SLOTS:
        raise ValueError(f"a split launch of {tiles} tiles needs more than the {SPLIT_COUNTER_SLOTS} counters kept")
    if start + tiles > SPLIT_COUNTER_SLOTS:
        start = 0
    ring[1] = start + tiles
    return counters[start : start + tiles]


# The pipeline stages that fit the card's shared memory, by launch (device, dtype and the kernel's constexprs):
# the launches are measured at 32 rows, and a block of 64 rows needs more shared memory a stage than some have.
_FITTED_STAGES: dict[tuple[Any, ...], int] = {}


def _launch_rows(grid: tuple[int, int], arguments: tuple[Any, ...], options: dict[str, Any], x: Tensor) -> None:
    """The rows kernel's launch; where its stages do not fit the card's shared memory, one stage fewer at a
    time (as Triton's autotuner drops such configs), the number that fits remembered for the launch."""
    from triton.runtime.errors import OutOfResources

    key = (x.device, x.dtype, *sorted(options.items()))
    stages = _FITTED_STAGES.get(key, options["num_stages"])
    while True:
        try:
            _kernels().rows_kernel[grid](*arguments, **{**options, "num_stages": stages})
        except OutOfResources:
            if stages == 1:
                raise
            stages -= 1
            continue
        _FITTED_STAGES[key] = stages
        return


EMBED_BLOCK = 1024


def embed_rows(
    ids: Tensor, table: Tensor, scale: float = 1.0, trigger: bool = False, emit_squares: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """The embedding rows [B, 1, K] of ``ids`` [B, 1] in ``table`` [V, K] (rows contiguous; bf16, fp16 or fp32),
    times ``scale``: ``F.embedding(ids, table) * scale`` as one kernel (PyTorch's form is two). ``trigger``:
    the programmatic dependent launch after it (a GEMV with ``pdl``) may launch as soon as it starts.
    ``emit_squares``: also return the partial sums of squares of the rows [P, B] (fp32), which a normed
    :func:`gemv` of the rows reads as ``norm_squares``: ``(rows, squares)``."""
    if ids.dim() != 2 or ids.shape[1] != 1 or not ids.is_contiguous() or ids.dtype.is_floating_point:
        raise ValueError(f"ids must be a contiguous integer [B, 1], got {ids.dtype} {tuple(ids.shape)}")
    if table.dim() != 2 or table.stride(1) != 1 or table.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError("table must be [V, K] with contiguous rows, bf16, fp16 or fp32")
    rows, width = ids.shape[0], table.shape[1]
    blocks = _cdiv(width, EMBED_BLOCK)
    out = torch.empty(rows, 1, width, dtype=table.dtype, device=table.device)
    squares = torch.empty(blocks, rows, dtype=squares_dtype(table.dtype), device=table.device) if emit_squares else None
    _kernels().embed_kernel[(rows, blocks)](
        ids, table, out, squares if squares is not None else out, table.stride(0), width, rows, scale,
        SCALE=scale != 1.0, TRIGGER=trigger, SQUARES=emit_squares, BLOCK=EMBED_BLOCK,
    )  # fmt: skip
    return (out, squares) if squares is not None else out


def tma_addressable(matrix: Tensor, block_k: int) -> bool:
    """Whether the copy engine (TMA) can read ``matrix`` (a weight [N, K], x [M, K]) in steps of ``block_k``
    columns: its start and rows on 16 bytes, 16 bytes a step at least, on a CUDA card of sm_90 or later
    (elsewhere the kernels run under Triton's interpreter, which reads descriptors too). A launch with ``tma``
    reads other matrices through pointers."""
    size = matrix.element_size()
    aligned = matrix.data_ptr() % 16 == 0 and matrix.stride(0) * size % 16 == 0 and block_k * size >= 16
    if matrix.device.type == "cuda":
        return aligned and torch.cuda.get_device_capability(matrix.device)[0] >= 9
    return aligned


def prefetchable(weight: Tensor, block_k: int) -> bool:
    """Whether a launch with ``prefetch`` can ask for ``weight`` [N, K]'s rows in L2 in steps of ``block_k``
    columns: a CUDA card of sm_90 or later (the bulk prefetch; the interpreter has no inline assembly), the
    start, the rows, the steps and the row's end on 16 bytes. Elsewhere the launch runs without."""
    size = weight.element_size()
    # What the copy engine needs (start and rows on 16 bytes, an sm_90 card), and whole 16-byte steps and row ends.
    return (weight.is_cuda and tma_addressable(weight, block_k) and block_k * size % 16 == 0
            and weight.shape[1] * size % 16 == 0)


def pdl_supported(device: torch.device | str) -> bool:
    """Whether kernels on ``device`` can be programmatic dependent launches: a CUDA card of sm_90 or later and
    a Triton that has them (3.3 and later)."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        from tnlora.ops.gemv_triton import HAS_PDL
    except ImportError:  # no triton
        return False
    return HAS_PDL


def row_block(rows: int) -> int:
    """The rows kernel's block of rows for ``rows`` rows of x: their next power of two, 16 at least (the tensor
    cores' dot)."""
    return max(16, 1 << (rows - 1).bit_length())


def k_parts(k: int, block_k: int, split: int) -> tuple[int, int]:
    """(columns a part sums, parts) of K cut into ``split`` parts of whole steps of ``block_k`` columns: as many
    parts as that leaves, so that every part has columns."""
    k_part = _cdiv(_cdiv(k, block_k), split) * block_k
    return k_part, _cdiv(k, k_part)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemv_reference(
    x: Tensor,
    weight: Tensor,
    *,
    weight2: Tensor | None = None,
    residual: Tensor | None = None,
    norm_eps: float | None = None,
    gate: Tensor | None = None,
) -> Tensor:
    """What the model computes for the same step: SimpleRMSNorm (fp32, rounded; times the gate, rounded),
    Linear, the GLU's product, the residual add."""
    if norm_eps is not None:
        xf = x.float() if x.dtype != torch.float64 else x
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm_eps)).to(x.dtype)
        if gate is not None:
            x = gate * x
    y = F.linear(x, weight)
    if weight2 is not None:
        y = y * F.linear(x, weight2)
    return residual + y if residual is not None else y


__all__ = [
    "EMBED_BLOCK", "FP64_STEP", "PREFETCH_MIN_ROWS", "ROWS_MAX", "ROWS_TUNED", "SPLIT_COUNTER_SLOTS", "TUNED",
    "GemvConfig", "embed_rows", "gemv", "gemv_config", "gemv_reference", "k_parts", "pdl_supported", "prefetchable",
    "row_block", "split_counters", "squares_dtype", "tma_addressable",
]
