"""The Triton kernel of :mod:`tnlora.ops.gemv` (see there for what it computes).

This module imports triton at import; ``tnlora.ops.gemv`` imports it on first use only.
"""

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = True
except ImportError:  # Triton before 3.3: no programmatic dependent launches (the PDL branches never compile)
    HAS_PDL = False

    @triton.jit
    def gdc_launch_dependents():
        """Stands in for Triton 3.3's, never called (kernels take PDL only where HAS_PDL)."""

    @triton.jit
    def gdc_wait():
        """Stands in for Triton 3.3's, never called."""


@triton.jit
def _weight_tile(w_ptr, row_offsets, stride_w, row_ok, cols, K: tl.constexpr, EVEN_K: tl.constexpr):
    """Rows ``row_offsets`` × columns ``cols`` of W (zeros outside it)."""
    ptrs = w_ptr + row_offsets * stride_w + cols[None, :]
    # One return at the end: the compiler carries on past a return inside a constant branch (the CPU
    # interpreter does not), and the code after it then no longer fits.
    if EVEN_K:
        w = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        w = tl.load(ptrs, mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
    return w


@triton.jit
def _rows_weight(w, row_offsets, stride_w, row_ok, col0, K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """The rows kernel's weight tile at BLOCK_K columns from ``col0``: with TMA ``w`` is a tensor descriptor of
    W [N, K] read by the copy engine (zeros outside W), else a pointer (:func:`_weight_tile`)."""
    if TMA:
        tile = w.load([tl.program_id(0) * BLOCK_N, col0])
    else:
        tile = _weight_tile(w, row_offsets, stride_w, row_ok, col0 + tl.arange(0, BLOCK_K), K, EVEN_K)
    return tile


@triton.jit
def _prefetch_rows(w_ptr, rows, stride_w, row_ok, col_from, col_to):
    """Asks the copy engine to bring W's rows ``rows``, columns [col_from, col_to), into L2 (sm_90's bulk
    prefetch, one request a row: a hint; nothing is read into this program and nothing waits for it). Rows
    outside W and an empty range ask for nothing. The range's start and length must lie on 16 bytes."""
    nbytes = (col_to - col_from) * (w_ptr.dtype.element_ty.primitive_bitwidth // 8)
    ptrs = w_ptr + rows.to(tl.int64) * stride_w + col_from
    ask = (row_ok & (nbytes > 0)).to(tl.int32)
    # The result is a dummy: the request is the point (not pure, so it is kept).
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.b32 $0, 0; }",
        "=r,l,r,r", [ptrs, ask, nbytes + tl.zeros_like(ask)], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def _vector_tile(ptr, cols, K: tl.constexpr, EVEN_K: tl.constexpr):
    """Entries ``cols`` of a vector of K (zeros past its end)."""
    if EVEN_K:  # noqa: SIM108 (the form of _weight_tile)
        v = tl.load(ptr + cols)
    else:
        v = tl.load(ptr + cols, mask=cols < K, other=0.0)
    return v


@triton.jit
def _input_tile(x_ptr, gate_ptr, cols, K: tl.constexpr, EVEN_K: tl.constexpr, GATE: tl.constexpr,
                FP64: tl.constexpr):
    """x over ``cols`` (widened to fp32, fp64 for fp64), and the input the products read: x, or gate ⊙ x
    with GATE."""
    acc_dtype = tl.float64 if FP64 else tl.float32
    x = _vector_tile(x_ptr, cols, K, EVEN_K).to(acc_dtype)
    xin = x
    if GATE:
        xin = _vector_tile(gate_ptr, cols, K, EVEN_K).to(acc_dtype) * x
    return x, xin


@triton.jit
def _accumulate(acc, w, x, ROW_SUM: tl.constexpr):
    """acc + W x over one tile: the [BLOCK_N] row sums with ROW_SUM, else the [BLOCK_N, BLOCK_K] products
    summed once at the end (more registers, no reduction in the loop)."""
    products = w.to(x.dtype) * x[None, :]
    if ROW_SUM:  # noqa: SIM108 (a constant branch: only the taken side is compiled, shapes differ)
        acc = acc + tl.sum(products, axis=1)
    else:
        acc = acc + products
    return acc


@triton.jit
def gemv_kernel(
    x_ptr,
    gate_ptr,
    w_ptr,
    w2_ptr,
    residual_ptr,
    y_ptr,
    N,
    stride_w,
    stride_w2,
    eps,
    K: tl.constexpr,
    NORM: tl.constexpr,
    GATE: tl.constexpr,
    GLU: tl.constexpr,
    RESIDUAL: tl.constexpr,
    EVEN_K: tl.constexpr,
    FP64: tl.constexpr,
    ROW_SUM: tl.constexpr,
    PDL: tl.constexpr,
    EARLY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """BLOCK_N rows of y = W x (x one vector of K), streaming W once in BLOCK_K-column steps; with NORM the
    same pass sums x² for x's RMS norm, applied to the dot products at the end; with GATE the products read
    gate ⊙ x (the norm still of x). K is a constant (one compiled kernel per row width; a model has two or
    three), so the loop's trip count is known.

    With PDL (launched as a programmatic dependent launch) the kernel reads its first weight tile before it
    waits for the kernel before it (the weights are not that kernel's output, so their first reads overlap
    its tail; with BLOCK_K = K that is the program's whole weight), and lets the next kernel start launching
    once its own loop is done, or with EARLY as soon as it starts (the next kernel is then launched once every
    program of this one has started, and its programs take the places this one's last programs leave).
    Everything it writes comes after the wait, so a kernel launched early never writes before the ones
    before it have finished."""
    if PDL and EARLY:
        gdc_launch_dependents()
    acc_dtype = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_offsets = rows[:, None].to(tl.int64)
    if ROW_SUM:
        acc = tl.zeros((BLOCK_N,), dtype=acc_dtype)
        acc2 = tl.zeros((BLOCK_N,), dtype=acc_dtype)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=acc_dtype)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=acc_dtype)
    squares = tl.zeros((BLOCK_K,), dtype=acc_dtype)
    # The first step apart: its weight tiles are read before the wait.
    cols = tl.arange(0, BLOCK_K)
    w = _weight_tile(w_ptr, row_offsets, stride_w, row_ok, cols, K, EVEN_K)
    if GLU:
        w2 = _weight_tile(w2_ptr, row_offsets, stride_w2, row_ok, cols, K, EVEN_K)
    if PDL:
        gdc_wait()
    x, xin = _input_tile(x_ptr, gate_ptr, cols, K, EVEN_K, GATE, FP64)
    acc = _accumulate(acc, w, xin, ROW_SUM)
    if GLU:
        acc2 = _accumulate(acc2, w2, xin, ROW_SUM)
    if NORM:
        squares += x * x
    for start in range(BLOCK_K, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x, xin = _input_tile(x_ptr, gate_ptr, cols, K, EVEN_K, GATE, FP64)
        w = _weight_tile(w_ptr, row_offsets, stride_w, row_ok, cols, K, EVEN_K)
        acc = _accumulate(acc, w, xin, ROW_SUM)
        if GLU:
            w2 = _weight_tile(w2_ptr, row_offsets, stride_w2, row_ok, cols, K, EVEN_K)
            acc2 = _accumulate(acc2, w2, xin, ROW_SUM)
        if NORM:
            squares += x * x
    if PDL and not EARLY:
        gdc_launch_dependents()
    out = acc if ROW_SUM else tl.sum(acc, axis=1)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        out = out * rstd
    # Each product is rounded to the output dtype where the model's Linear would round it.
    y = out.to(y_ptr.dtype.element_ty)
    if GLU:
        out2 = acc2 if ROW_SUM else tl.sum(acc2, axis=1)
        if NORM:
            out2 = out2 * rstd
        y = (y.to(acc_dtype) * out2.to(y_ptr.dtype.element_ty).to(acc_dtype)).to(y_ptr.dtype.element_ty)
    if RESIDUAL:
        residual = tl.load(residual_ptr + rows, mask=row_ok, other=0.0)
        y = (residual.to(acc_dtype) + y.to(acc_dtype)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows, y, mask=row_ok)


@triton.jit
def embed_kernel(ids_ptr, table_ptr, out_ptr, squares_ptr, stride_table, K, M, scale, SCALE: tl.constexpr,
                 TRIGGER: tl.constexpr, SQUARES: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, block): BLOCK entries of the embedding row of ``ids[row]``, times ``scale`` where SCALE
    (in fp32, rounded to the table's dtype, as PyTorch's ``tensor * float`` rounds). With SQUARES the sum of
    squares of those entries as stored (fp32) goes to ``squares[block, row]`` of [blocks, M]: what the first
    layer's normed projection of several rows reads instead of summing them itself. With TRIGGER the dependent
    launch after it (the first GEMV) may launch at once and read its weights while this one runs; this kernel
    itself is a plain launch, which waits for everything before it."""
    if TRIGGER:
        gdc_launch_dependents()
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < K
    token = tl.load(ids_ptr + row).to(tl.int64)
    x = tl.load(table_ptr + token * stride_table + cols, mask=inside, other=0.0)
    if SCALE:
        x = (x.to(tl.float32) * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row.to(tl.int64) * K + cols, x, mask=inside)
    if SQUARES:
        xf = x.to(tl.float32)  # zeros outside K (the masked load's other)
        tl.store(squares_ptr + tl.program_id(1) * M + row, tl.sum(xf * xf, axis=0))


@triton.jit
def _rows_input(x_ptr, gate_ptr, m, m_ok, col0, stride_x, stride_gate, K: tl.constexpr, EVEN_K: tl.constexpr,
                GATE: tl.constexpr, TMA_X: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """x [BLOCK_M, BLOCK_K] over BLOCK_K columns from ``col0`` of rows ``m`` (zeros outside), and the input the
    products read: x, or gate ⊙ x rounded to x's dtype with GATE (the dot's operands are of one dtype). With
    TMA_X ``x_ptr`` and ``gate_ptr`` are tensor descriptors of x and the gate [M, K] with blocks [BLOCK_M,
    BLOCK_K] (zeros outside them)."""
    cols = col0 + tl.arange(0, BLOCK_K)
    if TMA_X:
        x = x_ptr.load([0, col0])
    else:
        ok = m_ok[:, None] if EVEN_K else m_ok[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + m[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    xin = x
    if GATE:
        if TMA_X:
            gate = gate_ptr.load([0, col0])
        else:
            gate = tl.load(gate_ptr + m[:, None] * stride_gate + cols[None, :], mask=ok, other=0.0)
        if x.dtype == tl.float64:  # noqa: SIM108 (a constant branch: only the taken side is compiled)
            xin = gate * x
        else:
            xin = (gate.to(tl.float32) * x.to(tl.float32)).to(x.dtype)
    return x, xin


@triton.jit
def _rows_squares(squares, x, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """The sums of squares of x's rows, one tile more: with DOT as the Gram matrix x xᵀ [BLOCK_M, BLOCK_M] on
    the tensor cores (its diagonal the sums; x then stays a dot operand only: summing x² in registers made the
    normed forms twice as slow), else (fp64) the [BLOCK_M] sums themselves."""
    if DOT:
        squares = tl.dot(x, tl.trans(x), squares, input_precision=PRECISION)
    else:
        squares += tl.sum(x * x, axis=1)
    return squares


@triton.jit
def _rows_accumulate(acc, xin, w, DOT: tl.constexpr, PRECISION: tl.constexpr, SWAP: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + x Wᵀ over one tile: on the tensor cores with DOT (with SWAP acc is [BLOCK_N,
    BLOCK_M] plus W xᵀ: the weight tile the dot's first operand), else (fp64) as products summed over the
    tile."""
    if SWAP:
        acc = tl.dot(w, tl.trans(xin), acc, input_precision=PRECISION)
    elif DOT:
        acc = tl.dot(xin, tl.trans(w), acc, input_precision=PRECISION)
    else:
        acc = acc + tl.sum(xin[:, None, :] * w[None, :, :], axis=2)
    return acc


@triton.jit
def _rows_finish(acc, acc2, y_ptr, residual_ptr, squares_in_ptr, squares_out_ptr, rows, row_ok, m, m_ok, M, N,
                 stride_residual, eps, P_IN, squares, acc_dtype: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr,
                 GLU: tl.constexpr, RESIDUAL: tl.constexpr, DOT: tl.constexpr, SQUARES_IN: tl.constexpr,
                 SQUARES_OUT: tl.constexpr, BLOCK_P: tl.constexpr):  # fmt: skip
    """The rows kernel's epilogue on this tile's whole sums acc (and acc2 with GLU) [BLOCK_M, BLOCK_N]: each row's
    norm applied, the GLU's product, the residual added, Y stored, and with SQUARES_OUT the tile's sums of
    squares of Y's rows written to row ``program_id(0)`` of [tiles, M]."""
    out = acc
    if NORM:
        if SQUARES_IN:
            p = tl.arange(0, BLOCK_P)
            parts = tl.load(squares_in_ptr + p[:, None] * M + m[None, :], mask=(p < P_IN)[:, None] & m_ok[None, :],
                            other=0.0)
            squares = tl.sum(parts.to(acc_dtype), axis=0)
        elif DOT:
            squares = tl.sum(tl.where(m[:, None] == m[None, :], squares, 0.0), axis=1)
        rstd = 1.0 / tl.sqrt(squares / K + eps)
        out = out * rstd[:, None]
    # Each product is rounded to the output dtype where the model's Linear would round it.
    y = out.to(y_ptr.dtype.element_ty)
    if GLU:
        out2 = acc2
        if NORM:
            out2 = out2 * rstd[:, None]
        y = (y.to(acc_dtype) * out2.to(y_ptr.dtype.element_ty).to(acc_dtype)).to(y_ptr.dtype.element_ty)
    ok = m_ok[:, None] & row_ok[None, :]
    if RESIDUAL:
        residual = tl.load(residual_ptr + m[:, None] * stride_residual + rows[None, :], mask=ok, other=0.0)
        y = (residual.to(acc_dtype) + y.to(acc_dtype)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + m[:, None] * N + rows[None, :], y, mask=ok)
    if SQUARES_OUT:
        rounded = tl.where(ok, y.to(acc_dtype), 0.0)
        tl.store(squares_out_ptr + tl.program_id(0) * M + m, tl.sum(rounded * rounded, axis=1), mask=m_ok)


@triton.jit
def rows_kernel(
    x_ptr,
    gate_ptr,
    w_ptr,
    w2_ptr,
    residual_ptr,
    y_ptr,
    M,
    N,
    stride_x,
    stride_gate,
    stride_residual,
    stride_w,
    stride_w2,
    eps,
    squares_in_ptr,
    squares_out_ptr,
    P_IN,
    part_ptr,
    count_ptr,
    K: tl.constexpr,
    NORM: tl.constexpr,
    GATE: tl.constexpr,
    GLU: tl.constexpr,
    RESIDUAL: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
    EARLY: tl.constexpr,
    SQUARES_IN: tl.constexpr,
    SQUARES_OUT: tl.constexpr,
    SWAP: tl.constexpr,
    SPLIT: tl.constexpr,
    K_PART: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    TMA: tl.constexpr = False,
    TMA_X: tl.constexpr = False,
    PREFETCH: tl.constexpr = 0,
):
    """BLOCK_N columns of Y = X Wᵀ for all M (≤ BLOCK_M) rows of X at once: :func:`gemv_kernel` for a few rows,
    each weight tile read once for every row (a tensor-core dot of the rows and the tile). NORM, GATE, GLU
    and RESIDUAL as there, each row with its own norm; PDL and EARLY as there (the first weight tiles read
    before the wait, everything written after it). Y's rows are contiguous.

    With SQUARES_IN the norm's sums of squares are not summed here: they are the P_IN partial sums [P_IN, M]
    at ``squares_in_ptr`` that the kernel producing x wrote (summing x² beside the dot made the normed forms
    ~1.6–2× the plain one). With SQUARES_OUT each tile writes its columns' sums of squares of Y's rows
    (as rounded to Y's dtype: what the next norm reads) to row ``program_id(0)`` of [tiles, M] at
    ``squares_out_ptr``. With SWAP (DOT only) the products are accumulated transposed, W xᵀ, and turned back
    once after the loop.

    K_PART: the columns a program sums, a multiple of BLOCK_K (K rounded up to one unsplit). With SPLIT > 1 the
    columns of K are split into SPLIT parts of K_PART (axis 1 of the grid; the last may be shorter): each sums
    its part's products, writes them to its slot of ``part_ptr`` [SPLIT, (2 with GLU,) M, N] (the accumulator's
    dtype), and adds one to its tile's counter at ``count_ptr`` (zero before the launch); the program that
    arrives last sums the parts in their order (the same bits whichever arrives last), sets the counter back to
    zero and finishes the tile. A norm then reads its sums of squares (SQUARES_IN): a part has only its own
    columns of x.

    With TMA ``w_ptr`` and ``w2_ptr`` are tensor descriptors of the weights [N, K] with blocks [BLOCK_N,
    BLOCK_K]: the tiles come by the Hopper copy engine (TMA) straight into shared memory, several steps ahead
    (the loop's stages); with TMA_X also x and the gate (``x_ptr``, ``gate_ptr``: [M, K], blocks [BLOCK_M,
    BLOCK_K]).

    With PREFETCH > 0 (sm_90, pointers, not TMA) each program asks for its weight rows' columns of the PREFETCH
    steps after the first to be brought into L2 before it waits (:func:`_prefetch_rows`), so that the weight
    reads of a dependent launch start while the kernel before it ends rather than after (rows and steps on 16
    bytes)."""
    tl.static_assert(SPLIT == 1 or not NORM or SQUARES_IN, "a split launch's norm reads its sums of squares")
    if PDL and EARLY:
        gdc_launch_dependents()
    acc_dtype = tl.float32 if DOT else tl.float64
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_offsets = rows[:, None].to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    if SWAP:  # a constant branch: only the taken side is compiled, shapes differ
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=acc_dtype)
        acc2 = tl.zeros((BLOCK_N, BLOCK_M), dtype=acc_dtype)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    if DOT:  # noqa: SIM108 (a constant branch: only the taken side is compiled, shapes differ)
        squares = tl.zeros((BLOCK_M, BLOCK_M), dtype=acc_dtype)
    else:
        squares = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    # This program's columns of K: K_PART from k_first (all of them unsplit, in whole steps; the loop's trip
    # count a constant either way, a short last part's steps past K masked: its launch is not EVEN_K).
    k_first = tl.program_id(1) * K_PART if SPLIT > 1 else 0
    # The first step apart: its weight tiles are read before the wait.
    w = _rows_weight(w_ptr, row_offsets, stride_w, row_ok, k_first, K, EVEN_K, TMA, BLOCK_N, BLOCK_K)
    if GLU:
        w2 = _rows_weight(w2_ptr, row_offsets, stride_w2, row_ok, k_first, K, EVEN_K, TMA, BLOCK_N, BLOCK_K)
    if PREFETCH > 0:  # the next steps' weight columns on their way to L2 while the kernel before ends
        k_end = tl.minimum(tl.minimum(k_first + K_PART, K), k_first + (PREFETCH + 1) * BLOCK_K)
        _prefetch_rows(w_ptr, rows, stride_w, row_ok, k_first + BLOCK_K, k_end)
        if GLU:
            _prefetch_rows(w2_ptr, rows, stride_w2, row_ok, k_first + BLOCK_K, k_end)
    if PDL:
        gdc_wait()
    x, xin = _rows_input(x_ptr, gate_ptr, m, m_ok, k_first, stride_x, stride_gate, K, EVEN_K, GATE, TMA_X, BLOCK_K)
    acc = _rows_accumulate(acc, xin, w, DOT, PRECISION, SWAP)
    if GLU:
        acc2 = _rows_accumulate(acc2, xin, w2, DOT, PRECISION, SWAP)
    if NORM and not SQUARES_IN:
        squares = _rows_squares(squares, x, DOT, PRECISION)
    for start in range(BLOCK_K, K_PART, BLOCK_K):
        col0 = k_first + start
        x, xin = _rows_input(x_ptr, gate_ptr, m, m_ok, col0, stride_x, stride_gate, K, EVEN_K, GATE, TMA_X, BLOCK_K)
        w = _rows_weight(w_ptr, row_offsets, stride_w, row_ok, col0, K, EVEN_K, TMA, BLOCK_N, BLOCK_K)
        acc = _rows_accumulate(acc, xin, w, DOT, PRECISION, SWAP)
        if GLU:
            w2 = _rows_weight(w2_ptr, row_offsets, stride_w2, row_ok, col0, K, EVEN_K, TMA, BLOCK_N, BLOCK_K)
            acc2 = _rows_accumulate(acc2, xin, w2, DOT, PRECISION, SWAP)
        if NORM and not SQUARES_IN:
            squares = _rows_squares(squares, x, DOT, PRECISION)
    if PDL and not EARLY:
        gdc_launch_dependents()
    if SWAP:
        acc = tl.trans(acc)
        acc2 = tl.trans(acc2)
    if SPLIT == 1:
        _rows_finish(acc, acc2, y_ptr, residual_ptr, squares_in_ptr, squares_out_ptr, rows, row_ok, m, m_ok, M, N,
                     stride_residual, eps, P_IN, squares, acc_dtype, K, NORM, GLU, RESIDUAL, DOT, SQUARES_IN,
                     SQUARES_OUT, BLOCK_P)  # fmt: skip
    else:
        kinds: tl.constexpr = 1 + GLU  # sums a tile: 2 with the GLU's second product
        slot = m[:, None] * N + rows[None, :]
        ok = m_ok[:, None] & row_ok[None, :]
        part = part_ptr + tl.program_id(1) * kinds * M * N
        tl.store(part + slot, acc, mask=ok)
        if GLU:
            tl.store(part + M * N + slot, acc2, mask=ok)
        # Release: this program's part is visible before its arrival counts; acquire: the last one sees them all.
        arrived = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
            total2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
            for j in tl.static_range(SPLIT):
                # .cg: from L2, where the other programs' stores are (this SM's L1 is not kept coherent).
                total += tl.load(part_ptr + j * kinds * M * N + slot, mask=ok, other=0.0, cache_modifier=".cg")
                if GLU:
                    total2 += tl.load(part_ptr + (j * kinds + 1) * M * N + slot, mask=ok, other=0.0,
                                      cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + tl.program_id(0), 0, sem="relaxed", scope="gpu")
            _rows_finish(total, total2, y_ptr, residual_ptr, squares_in_ptr, squares_out_ptr, rows, row_ok, m, m_ok,
                         M, N, stride_residual, eps, P_IN, squares, acc_dtype, K, NORM, GLU, RESIDUAL, DOT,
                         SQUARES_IN, SQUARES_OUT, BLOCK_P)  # fmt: skip
