"""The fused one-row projections (``tnlora.ops.gemv``) against the model's composition of PyTorch ops
(``gemv_reference``): plain, RMS-normed input, GLU, residual add; fp64 / fp32 / bf16; uneven widths.

Needs triton and a CUDA device, or Triton's CPU interpreter:

    TRITON_INTERPRET=1 PYTHONPATH=<dir holding triton> pytest -q tests/ops/test_gemv.py
"""

from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE, INTERPRET, needs_kernel

from tnlora.ops import gemv as gemv_module
from tnlora.ops.gemv import (
    EMBED_BLOCK,
    ROWS_MAX,
    ROWS_TUNED,
    TUNED,
    GemvConfig,
    embed_rows,
    gemv,
    gemv_config,
    gemv_reference,
    pdl_supported,
)

pytestmark = needs_kernel
# fp64 / fp32: the order of the sums (and the normed x kept exact instead of rounded: exact in fp64 up to
# rounding, too); bf16: the output's rounding, and the normed x's.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-6}
CASES = {
    "plain": {},
    "norm": {"norm_eps": 1e-6},
    "glu": {"norm_eps": 1e-6, "weight2": True},
    "residual": {"residual": True},
    "gated norm": {"norm_eps": 1e-6, "gate": True, "residual": True},
}
# Launches other than the default: the row-sum accumulator, one-row and wide blocks, an uneven last block,
# dependents launched early (what a plain launch ignores).
CONFIGS = [GemvConfig(1, 32, 1, 1, True), GemvConfig(8, 64, 2, 2, False), GemvConfig(4, 128, 4, 3, True),
           GemvConfig(2, 64, 4, 1, False, True)]


def _inputs(n: int, k: int, dtype: torch.dtype, seed: int = 0, rows: tuple[int, ...] = ()):
    """x [*rows, K], W and W₂ [N, K], a residual [*rows, N]."""
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*rows, k, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=gen, dtype=torch.float64) / k**0.5).to(dtype).to(DEVICE)
    w2 = (torch.randn(n, k, generator=gen, dtype=torch.float64) / k**0.5).to(dtype).to(DEVICE)
    residual = torch.randn(*rows, n, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    return x, w, w2, residual


def _options(case: str, n: int, k: int, dtype: torch.dtype, w2, residual, rows: tuple[int, ...] = ()) -> dict:
    """The keyword arguments of ``case`` with its tensors (the gate: [*rows, k] values of its own)."""
    options = dict(CASES[case])
    if options.pop("weight2", False):
        options["weight2"] = w2
    if options.pop("residual", False):
        options["residual"] = residual
    if options.pop("gate", False):
        gen = torch.Generator().manual_seed(k)
        options["gate"] = torch.randn(*rows, k, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    return options


def _relative_error(got, x, w, options) -> float:
    """max |got − the model's ops| over max |the exact product| (fp64)."""
    want = gemv_reference(x, w, **options)
    assert got.dtype == want.dtype and got.shape == want.shape
    exact = gemv_reference(*(t.double() for t in (x, w)), **{
        key: (value.double() if isinstance(value, torch.Tensor) else value) for key, value in options.items()
    })
    return ((got.double() - want.double()).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("n", "k"), [(24, 64), (37, 200)])  # even and uneven widths (masked rows, columns)
def test_gemv_equals_the_model_ops(dtype: torch.dtype, case: str, n: int, k: int) -> None:
    x, w, w2, residual = _inputs(n, k, dtype)
    options = _options(case, n, k, dtype, w2, residual)
    got = gemv(x, w, **options)
    assert got.dtype == dtype and got.shape == (n,)
    err = _relative_error(got, x, w, options)
    assert err <= TOLERANCE[dtype], err


# Several rows: the rows kernel (the tensor cores' dot; in fp64 products summed). Under the interpreter bf16 is
# left to CUDA: Triton 3.6's interpreter computes a bf16 dot wrongly (it reads the operands' bits as another
# type; an fp32 dot of the same values is right).
ROW_DTYPES = [torch.float64, torch.float32] + ([] if INTERPRET else [torch.bfloat16])
ROW_CONFIGS = [GemvConfig(16, 64, 4, 1, False, True), GemvConfig(32, 128, 4, 3, False, False),
               GemvConfig(64, 32, 2, 2, False, True), GemvConfig(16, 64, 4, 1, False, True, True),
               GemvConfig(64, 32, 4, 3, False, False, True)]


@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rows", [2, 17])  # a block of 16 rows with 14 masked, of 32 with 15
def test_several_rows_equal_the_model_ops(dtype: torch.dtype, case: str, rows: int) -> None:
    """x [M, K]: every row as the model computes it, each normed by itself; uneven widths."""
    n, k = 37, 200
    x, w, w2, residual = _inputs(n, k, dtype, seed=rows, rows=(rows,))
    options = _options(case, n, k, dtype, w2, residual, rows=(rows,))
    got = gemv(x, w, **options)
    assert got.dtype == dtype and got.shape == (rows, n) and got.is_contiguous()
    assert _relative_error(got, x, w, options) <= TOLERANCE[dtype]
    # Row by row, the same as one row alone (up to the order of the sums).
    for i in (0, rows - 1):
        one = gemv(x[i], w, **{key: value[i] if key in ("gate", "residual") else value
                               for key, value in options.items()})
        torch.testing.assert_close(got[i], one, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("rows", [2, 17, 64])
def test_fp64_rows_take_short_column_steps(rows: int) -> None:
    """fp64 sums a step's products in registers: a launch's column step is cut to ``FP64_STEP`` values of x (a
    longer one spills to local memory, gigabytes of it reserved on a large card), so a long step sums in the
    order of the short one, and the sums stay the model's."""
    n, k = 37, 200
    x, w, w2, _ = _inputs(n, k, torch.float64, seed=rows, rows=(rows,))
    options = {"norm_eps": 1e-6, "weight2": w2}
    block_m = max(16, 1 << (rows - 1).bit_length())
    short = GemvConfig(32, gemv_module.FP64_STEP // block_m, 4, 1, False, True)
    got = gemv(x, w, config=short._replace(block_k=256), **options)
    assert torch.equal(got, gemv(x, w, config=short, **options))
    assert _relative_error(got, x, w, options) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("config", ROW_CONFIGS, ids=str)
@pytest.mark.parametrize("case", ["plain", "glu", "gated norm"])
def test_every_launch_of_several_rows_computes_the_same(config: GemvConfig, case: str) -> None:
    """Row blocks of 16 to 64 weight rows, column steps shorter and longer than an uneven K, pipelined or not,
    the products as x Wᵀ or W xᵀ (``swap``; the normed cases sum their own squares, so they run as x Wᵀ): the
    model's results in fp64 and fp32, and in fp32 those of the default launch."""
    n, k, rows = 37, 200, 5
    for dtype in (torch.float64, torch.float32):
        x, w, w2, residual = _inputs(n, k, dtype, seed=4, rows=(rows,))
        options = _options(case, n, k, dtype, w2, residual, rows=(rows,))
        got = gemv(x, w, config=config, **options)
        assert _relative_error(got, x, w, options) <= TOLERANCE[dtype]
        if dtype == torch.float32:
            torch.testing.assert_close(got, gemv(x, w, **options), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["norm", "glu"])
@pytest.mark.parametrize("rows", [2, 17])
def test_a_norm_reads_the_squares_its_input_s_projection_wrote(dtype: torch.dtype, case: str, rows: int) -> None:
    """A residual projection's partial sums of squares of its output rows (``emit_squares``: one row of sums per
    program, 13 programs of 16 columns over 200) feed the next normed projection (``norm_squares``): its
    results are the model's, as when it sums x² itself, with the products taken either way."""
    gen = torch.Generator().manual_seed(rows)
    x_in = torch.randn(rows, 64, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    w_in = (torch.randn(200, 64, generator=gen, dtype=torch.float64) / 8).to(dtype).to(DEVICE)
    before = torch.randn(rows, 200, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    x, squares = gemv(x_in, w_in, residual=before, emit_squares=True, config=GemvConfig(16, 64, 4, 1, False, True))
    assert squares.shape == (13, rows) and squares.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(squares.double().sum(0), (x.double() ** 2).sum(1), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(x, gemv(x_in, w_in, residual=before), rtol=0.0, atol=0.0)
    n, k = 37, 200
    _, w, w2, residual = _inputs(n, k, dtype, seed=rows, rows=(rows,))
    options = _options(case, n, k, dtype, w2, residual, rows=(rows,))
    for config in (None, GemvConfig(16, 64, 4, 1, False, True, True)):  # the products as X Wᵀ and as W xᵀ
        got = gemv(x, w, norm_squares=squares, config=config, **options)
        assert _relative_error(got, x, w, options) <= TOLERANCE[dtype]
        torch.testing.assert_close(got, gemv(x, w, **options), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def _squares_read_in(case: str, dtype: torch.dtype, seed: int, rows: int) -> tuple:
    """x [rows, 200], W [37, 200] and ``case``'s options, a norm reading x's sums of squares (one partial sum)."""
    n, k = 37, 200
    x, w, w2, residual = _inputs(n, k, dtype, seed=seed, rows=(rows,))
    options = _options(case, n, k, dtype, w2, residual, rows=(rows,))
    if "norm_eps" in options:
        options["norm_squares"] = (x.double() ** 2).sum(1, keepdim=True).T.to(gemv_module.squares_dtype(dtype))
    return x, w, options


@pytest.mark.parametrize("split", [2, 3, 5])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("case", ["plain", "residual", "norm", "glu", "gated norm"])
def test_a_split_launch_equals_the_unsplit_one(split: int, swap: bool, case: str) -> None:
    """``split``: K's columns in parts (200 in steps of 32: 4 + 3, 3 + 3 + 1, and 2 + 2 + 2 + 1 steps, so 5
    parts leave 4), each program's sums added up by the tile's last one: the unsplit launch's results (fp32: the
    sums in another order; fp64 and fp32 against the model's ops), the same sums of squares of the output rows
    (one row a tile), the same bits call after call, and every counter back at zero. The norms read the squares
    of their input, as a split launch's must."""
    rows = 5
    for dtype in (torch.float64, torch.float32):
        x, w, options = _squares_read_in(case, dtype, split, rows)
        unsplit = GemvConfig(16, 32, 4, 2, False, True, swap)
        want, want_squares = gemv(x, w, config=unsplit, emit_squares=True, **options)
        config = unsplit._replace(split=split)
        got, squares = gemv(x, w, config=config, emit_squares=True, **options)
        reference = {key: value for key, value in options.items() if key != "norm_squares"}
        assert _relative_error(got, x, w, reference) <= TOLERANCE[dtype]
        tolerance = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
        assert squares.shape == want_squares.shape == (3, rows)
        torch.testing.assert_close(squares, want_squares, rtol=tolerance, atol=0.0)
        assert torch.equal(gemv(x, w, config=config, **options), got)
    for counters, _ in gemv_module._SPLIT_COUNTERS.values():
        assert counters.count_nonzero() == 0


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("case", ["plain", "residual", "norm", "glu", "gated norm"])
def test_a_tma_launch_equals_the_pointer_one(split: int, swap: bool, case: str) -> None:
    """``tma``: the weight tiles through tensor descriptors (zeros past W's 37 rows and 200 columns, as the
    pointer loads' masks give): the pointer launch's bits in fp32 (the same products in the same order), the
    same sums of squares of the output rows, whole and split, the products either way. fp64 has no dot and reads
    through pointers: the same bits too."""
    for dtype in (torch.float32, torch.float64):
        x, w, options = _squares_read_in(case, dtype, split, rows=5)
        pointers = GemvConfig(16, 32, 4, 2, False, True, swap, split)
        want, want_squares = gemv(x, w, config=pointers, emit_squares=True, **options)
        got, squares = gemv(x, w, config=pointers._replace(tma=True), emit_squares=True, **options)
        assert torch.equal(got, want) and torch.equal(squares, want_squares), dtype
    reference = {key: value for key, value in options.items() if key != "norm_squares"}
    assert _relative_error(got, x, w, reference) <= TOLERANCE[torch.float64]


def test_tma_reads_only_weights_it_can_address() -> None:
    """The copy engine needs 16-byte rows and steps: a weight or x whose rows are 37 fp32 values apart, or a step
    of 2 fp32 columns, is read through pointers by a ``tma`` launch (x so while the weight comes by descriptor),
    with the same results."""
    x, w, _, _ = _inputs(24, 36, torch.float32, seed=3, rows=(4,))

    def unaligned(t: torch.Tensor) -> torch.Tensor:  # the same values, rows 148 bytes apart
        padded = torch.zeros(t.shape[0], 37, dtype=t.dtype, device=DEVICE)
        padded[:, :36] = t
        return padded[:, :36]

    assert gemv_module.tma_addressable(w, 32) and not gemv_module.tma_addressable(unaligned(w), 32)
    assert not gemv_module.tma_addressable(w, 2)
    config = GemvConfig(16, 32, 4, 1, False, True, False, 1, True)
    want = gemv(x, w, config=config._replace(tma=False))
    for inputs in ((x, unaligned(w)), (unaligned(x), w), (x, w)):
        assert torch.equal(gemv(*inputs, config=config), want)


def test_a_prefetch_launch_asks_only_where_it_can() -> None:
    """``prefetch`` asks sm_90's bulk copies for whole rows of the weight on 16 bytes: never off a CUDA card of
    sm_90 (the interpreter has no inline assembly), nor for rows, steps or a start off 16 bytes; where it cannot,
    the launch runs without, with the same bits."""
    x, w, _, _ = _inputs(37, 64, torch.float32, seed=5, rows=(3,))
    odd = torch.zeros(37 * 64 + 1, dtype=w.dtype, device=w.device)[1:].view(37, 64)
    odd.copy_(w)  # rows of 256 bytes from a start 4 bytes past the allocation's
    on_sm90 = w.is_cuda and torch.cuda.get_device_capability(w.device)[0] >= 9
    assert gemv_module.prefetchable(w, 32) == on_sm90
    assert not gemv_module.prefetchable(odd, 32)
    assert not gemv_module.prefetchable(w, 2)  # 8 bytes a step
    assert not gemv_module.prefetchable(w[:, :62], 32)  # rows of 248 bytes
    config = GemvConfig(16, 32, 4, 2, False, True)
    want = gemv(x, w, config=config)
    for weight in (w, odd):
        for steps in (1, 5):  # the second past the weight's end
            assert torch.equal(gemv(x, weight, config=config._replace(prefetch=steps)), want)


def test_tuned_launches_ask_for_their_prefetch_from_the_rows_they_were_chosen_at() -> None:
    """``ROWS_TUNED``'s prefetch counts were chosen at 32 rows; under ``PREFETCH_MIN_ROWS`` the same launches run
    without (at 8 rows they slowed the 7B step), everything else about them the same."""
    fetching = {key: launch for key, launch in ROWS_TUNED.items() if launch.prefetch}
    assert fetching  # the entries this test is about
    for (n, k, glu), launch in fetching.items():
        assert gemv_config(n, k, glu, rows=gemv_module.PREFETCH_MIN_ROWS) == launch
        assert gemv_config(n, k, glu, rows=32) == launch
        assert gemv_config(n, k, glu, rows=gemv_module.PREFETCH_MIN_ROWS - 1) == launch._replace(prefetch=0)
        assert gemv_config(n, k, glu, rows=4) == launch._replace(prefetch=0)


def test_a_split_launch_whose_norm_sums_its_own_squares_runs_unsplit() -> None:
    """A part of K has only its columns of x, so a norm without ``norm_squares`` runs the launch unsplit: the
    unsplit launch's bits."""
    x, w, w2, _ = _inputs(37, 200, torch.float32, seed=9, rows=(3,))
    config = GemvConfig(16, 32, 4, 2, False, True)
    for options in ({"norm_eps": 1e-6}, {"norm_eps": 1e-6, "weight2": w2}):
        want = gemv(x, w, config=config, **options)
        assert torch.equal(gemv(x, w, config=config._replace(split=4), **options), want)


def test_split_counters_come_from_a_ring() -> None:
    """Each split launch takes the ring's next slots, starting again at the front when they run out."""
    device = torch.device(DEVICE)
    first = gemv_module.split_counters(device, 5)
    second = gemv_module.split_counters(device, 5)
    assert first.data_ptr() + 5 * first.element_size() == second.data_ptr()
    ring = gemv_module._SPLIT_COUNTERS[device]
    ring[1] = gemv_module.SPLIT_COUNTER_SLOTS - 2
    assert gemv_module.split_counters(device, 5).data_ptr() == ring[0].data_ptr()
    with pytest.raises(ValueError, match="counters kept"):
        gemv_module.split_counters(device, gemv_module.SPLIT_COUNTER_SLOTS + 1)


def test_squares_are_checked() -> None:
    x, w, _, _ = _inputs(8, 32, torch.float32, rows=(3,))
    squares = torch.ones(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="needs norm_eps"):
        gemv(x, w, norm_squares=squares)
    with pytest.raises(ValueError, match=r"contiguous \[P, 3\] of torch.float32"):
        gemv(x, w, norm_eps=1e-6, norm_squares=squares.double())
    with pytest.raises(ValueError, match="several rows"):
        gemv(x[0], w, emit_squares=True)


def test_several_rows_are_read_through_their_strides() -> None:
    """Rows of x and of the gate that are slices of wider rows (the decode step's u is a quarter of each row
    of the projection's output), and a residual with a row stride of its own, are read in place."""
    n, k, rows = 24, 64, 3
    x, w, _, residual = _inputs(n, k, torch.float32, seed=7, rows=(rows,))
    wide = torch.randn(rows, 4 * k, device=DEVICE)
    wide[:, :k] = x
    gate = wide[:, 3 * k:]
    wide_residual = torch.zeros(rows, n + 8, device=DEVICE)
    wide_residual[:, 8:] = residual
    options = {"norm_eps": 1e-6, "gate": gate, "residual": wide_residual[:, 8:]}
    got = gemv(wide[:, :k], w, **options)
    want = gemv_reference(x, w, norm_eps=1e-6, gate=gate.contiguous(), residual=residual)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("case", ["plain", "glu", "gated norm"])
def test_every_launch_computes_the_same(config: GemvConfig, case: str) -> None:
    """Other block shapes and the row-sum accumulator: the same results as the model's ops (fp64: up to the
    order of the sums), and in float32 within rounding of the default launch."""
    n, k = 37, 200
    for dtype in (torch.float64, torch.float32):
        x, w, w2, residual = _inputs(n, k, dtype, seed=3)
        options = _options(case, n, k, dtype, w2, residual)
        got = gemv(x, w, config=config, **options)
        assert _relative_error(got, x, w, options) <= TOLERANCE[dtype]
        if dtype == torch.float32:
            torch.testing.assert_close(got, gemv(x, w, **options), rtol=1e-5, atol=1e-5)


def test_a_strided_weight_view_is_read_in_place() -> None:
    """A weight whose rows are a slice of wider rows (stride(0) > K) is read without a copy."""
    x, w, _, _ = _inputs(16, 128, torch.float32)
    wide = torch.zeros(16, 160, device=DEVICE)
    wide[:, 16:144] = w
    torch.testing.assert_close(gemv(x, wide[:, 16:144]), gemv_reference(x, w), rtol=1e-5, atol=1e-5)


def test_arguments_are_checked() -> None:
    x, w, w2, residual = _inputs(8, 32, torch.float32)
    with pytest.raises(ValueError, match="one contiguous vector"):
        gemv(x[None, None], w)
    with pytest.raises(ValueError, match=f"1 to {ROWS_MAX} rows"):
        gemv(x.expand(ROWS_MAX + 1, 32), w)
    with pytest.raises(ValueError, match="1 to"):
        gemv(torch.zeros(2, 64, device=DEVICE)[:, ::2], w)
    with pytest.raises(ValueError, match="block_n >= 16"):
        gemv(x.expand(2, 32), w, config=GemvConfig(8, 32))
    for launch in (GemvConfig(8, 32, swap=True), GemvConfig(8, 32, split=2), GemvConfig(8, 32, tma=True),
                   GemvConfig(8, 32, prefetch=2)):
        with pytest.raises(ValueError, match="swap, split, tma or prefetch is for x of several rows"):
            gemv(x, w, config=launch)
    with pytest.raises(ValueError, match="prefetch must be 0 or more"):
        gemv(x.expand(2, 32), w, config=GemvConfig(16, 32, prefetch=-1))
    with pytest.raises(ValueError, match="split must be at least 1"):
        gemv(x.expand(2, 32), w, config=GemvConfig(16, 32, split=0))
    with pytest.raises(ValueError, match=r"residual must be \[2, 8\]"):
        gemv(x.expand(2, 32), w, residual=residual)
    with pytest.raises(ValueError, match=r"gate must be \[2, 32\]"):
        gemv(x.expand(2, 32), w, norm_eps=1e-6, gate=x)
    with pytest.raises(ValueError, match="x has 31 values"):
        gemv(x[:31], w)
    with pytest.raises(ValueError, match="weight2 must be"):
        gemv(x, w, weight2=w2[:4])
    with pytest.raises(ValueError, match="residual must be"):
        gemv(x, w, residual=residual.double())
    with pytest.raises(ValueError, match="gate must be"):
        gemv(x, w, norm_eps=1e-6, gate=x[:4])
    with pytest.raises(ValueError, match="gate needs norm_eps"):
        gemv(x, w, gate=x)


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device (model-sized shapes)")
@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k"), sorted({(n, k) for n, k, _ in TUNED}))
def test_cuda_gemv_at_model_shapes(n: int, k: int) -> None:
    """bf16 at every 7B / 1B projection shape with a tuned launch (masked and unmasked row and column blocks),
    each fused form."""
    x, w, w2, residual = _inputs(n, k, torch.bfloat16, seed=n)
    pdl = pdl_supported("cuda")
    for case in CASES:
        options = _options(case, n, k, torch.bfloat16, w2, residual)
        got = gemv(x, w, **options)
        want = gemv_reference(x, w, **options)
        err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
        assert err <= TOLERANCE[torch.bfloat16], (case, err)
        # A programmatic dependent launch computes the same bits, its dependents launched late or early.
        config = gemv_config(n, k, glu="weight2" in options)
        for early in (False, True):
            launch = config._replace(early=early)
            assert not pdl or torch.equal(gemv(x, w, pdl=True, config=launch, **options), got), (case, early)


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device (model-sized shapes)")
@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k", "glu"), sorted(ROWS_TUNED))
def test_cuda_rows_at_model_shapes(n: int, k: int, glu: bool) -> None:
    """bf16, 32 rows, at every 7B / 1B projection shape with a tuned launch of several rows: the tuned launch and
    the same with the products taken the other way (``swap``; at most 128 columns a step and 2 stages, which fit
    the shared memory either way), the norm's sums of squares summed in the kernel and read in (the decode
    step's form), each as close to the model's ops as bf16 allows. A swapped launch whose norm sums its own
    squares runs as X Wᵀ (the two dots' race, ``gemv``): the same bits as the unswapped launch."""
    x, w, w2, _ = _inputs(n, k, torch.bfloat16, seed=n, rows=(32,))
    options = {"norm_eps": 1e-6, "weight2": w2} if glu else {"norm_eps": 1e-6}
    want = gemv_reference(x, w, **options).double()
    squares = x.float().square().sum(-1)[None, :].contiguous()  # one partial sum [1, M]
    tuned = ROWS_TUNED[n, k, glu]
    other = tuned._replace(swap=not tuned.swap, block_k=min(tuned.block_k, 128), stages=2)
    for launch in (tuned, other):
        for read_in in (False, True):
            got = gemv(x, w, config=launch, norm_squares=squares if read_in else None, **options)
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            assert err <= TOLERANCE[torch.bfloat16], (launch, read_in, err)
        if launch.swap:
            plain = gemv(x, w, config=launch._replace(swap=False), **options)
            assert torch.equal(gemv(x, w, config=launch, **options), plain), launch


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device (model-sized shapes)")
@pytest.mark.gpu
@pytest.mark.parametrize("variant", [{"split": 2}, {"split": 3}, {"split": 1, "tma": True}, {"split": 2, "tma": True},
                                     {"split": 1, "prefetch": 2}, {"split": 2, "prefetch": 4}], ids=str)
@pytest.mark.parametrize(("n", "k", "glu"), sorted(ROWS_TUNED))
def test_cuda_launch_variants_at_model_shapes(n: int, k: int, glu: bool, variant: dict) -> None:
    """bf16, 32 rows, each shape's tuned launch with K split into parts, with its tiles through tensor
    descriptors (``tma``; a card before sm_90 reads through pointers) and with its weight rows prefetched to L2
    (``prefetch``), in the decode step's forms (the norm's squares read in, the residual projections' squares
    written): as close to the model's ops as bf16 allows, the same bits call after call and replayed in a CUDA
    graph (the split counters set back to zero by each call), every counter zero afterwards, and with ``tma`` or
    ``prefetch`` the bits of the same launch without."""
    x, w, w2, residual = _inputs(n, k, torch.bfloat16, seed=n, rows=(32,))
    if glu or n == 64000 or (n, k) in ((16384, 4096), (8192, 2048)):  # the normed projections
        options = {"norm_eps": 1e-6, "weight2": w2} if glu else {"norm_eps": 1e-6}
        options["norm_squares"] = x.float().square().sum(-1)[None, :].contiguous()
    else:
        options = {"residual": residual}
    reference = {key: value for key, value in options.items() if key != "norm_squares"}
    launch = ROWS_TUNED[n, k, glu]._replace(**variant)
    got = gemv(x, w, config=launch, **options)
    assert _relative_error(got, x, w, reference) <= TOLERANCE[torch.bfloat16]
    assert torch.equal(gemv(x, w, config=launch, **options), got)
    if variant.get("tma") or variant.get("prefetch"):
        assert torch.equal(gemv(x, w, config=launch._replace(tma=False, prefetch=0), **options), got)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = gemv(x, w, config=launch, **options)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, got)
    for counters, _ in gemv_module._SPLIT_COUNTERS.values():
        assert counters.count_nonzero() == 0


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device (model-sized shapes)")
@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k", "glu"), sorted(ROWS_TUNED))
def test_cuda_rows_of_64_fit_the_card(n: int, k: int, glu: bool) -> None:
    """bf16, 64 rows (the rows kernel's limit) with each shape's tuned launch, measured at 32 rows: where its
    stages need more shared memory than the card has at 64, fewer run, and the result is as close as bf16
    allows (the residual and the sums of squares written, as the decode step calls the residual projections)."""
    x, w, w2, residual = _inputs(n, k, torch.bfloat16, seed=n, rows=(64,))
    options = {"norm_eps": 1e-6, "weight2": w2} if glu else {"residual": residual}
    got = gemv(x, w, emit_squares=not glu, **options)
    if not glu:
        got, squares = got
        torch.testing.assert_close(squares.sum(0), got.float().square().sum(-1), rtol=1e-5, atol=0)
    assert _relative_error(got, x, w, options) <= TOLERANCE[torch.bfloat16]


def test_a_rows_launch_drops_stages_the_shared_memory_cannot_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows kernel's launch with more stages than fit (Triton's OutOfResources, raised before it launches)
    runs again with one fewer until one fits, and the next call of that launch starts there."""
    from triton.runtime.errors import OutOfResources

    real = gemv_module._kernels()
    tried: list[int] = []

    class Kernel:
        fits = 2  # the most stages the "card" holds

        def __getitem__(self, grid):
            def launch(*args, **options):
                tried.append(options["num_stages"])
                if options["num_stages"] > self.fits:
                    raise OutOfResources(4096 * options["num_stages"], 4096 * self.fits, "shared memory")
                return real.rows_kernel[grid](*args, **options)
            return launch

    class Kernels:
        rows_kernel = Kernel()

    monkeypatch.setattr(gemv_module, "_kernels", lambda: Kernels())
    monkeypatch.setattr(gemv_module, "_FITTED_STAGES", {})
    x, w, _, residual = _inputs(40, 64, torch.float32, seed=2, rows=(3,))
    launch = GemvConfig(16, 32, 4, 4)
    got = gemv(x, w, residual=residual, config=launch)
    assert tried == [4, 3, 2]
    assert _relative_error(got, x, w, {"residual": residual}) <= TOLERANCE[torch.float32]
    assert torch.equal(gemv(x, w, residual=residual, config=launch), got) and tried == [4, 3, 2, 2]
    Kernels.rows_kernel.fits = 0
    tried.clear()
    with pytest.raises(OutOfResources):  # none fits: the error stands
        gemv(x, w, config=launch._replace(block_k=64))
    assert tried == [4, 3, 2, 1]


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not pdl_supported("cuda"), reason="needs sm_90+ and Triton 3.3+")
def test_a_graph_of_dependent_launches_equals_the_plain_chain() -> None:
    """A chain in which each GEMV reads the one before's output (and a residual from two before), captured
    in a CUDA graph as programmatic dependent launches, each letting the next launch after its loop or as
    soon as it starts (``early``): replayed, bitwise the chain launched plainly. Each waits for the kernel
    before it before reading its input; only its first weight tile (here its whole weight row) is read
    earlier."""
    width, depth = 4096, 12
    gen = torch.Generator().manual_seed(5)
    weights = [(torch.randn(width, width, generator=gen) / width**0.5).to("cuda", torch.bfloat16)
               for _ in range(depth)]
    x = torch.randn(width, generator=gen).to("cuda", torch.bfloat16)

    def chain(pdl: bool, early: bool = False) -> torch.Tensor:
        hidden = x.clone()
        config = GemvConfig(4, width, 4, 1, False, early)
        for i, w in enumerate(weights):
            options = {"norm_eps": 1e-6} if i % 2 else {"residual": hidden}
            hidden = gemv(hidden, w, pdl=pdl, config=config, **options)
        return hidden

    want = chain(False)
    for early in (False, True):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            chain(True, early)  # compile outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = chain(True, early)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(got, want), early


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 2048**0.5])
def test_embed_rows_equal_the_scaled_embedding(dtype: torch.dtype, scale: float) -> None:
    """The decode step's embedding kernel: ``F.embedding(ids, table) * scale``, rows of an uneven width (a
    masked last block), several rows."""
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(50, 1100, generator=gen).to(dtype).to(DEVICE)
    ids = torch.tensor([[7], [0], [49]], device=DEVICE)
    got = embed_rows(ids, table, scale, trigger=pdl_supported(DEVICE))
    want = torch.nn.functional.embedding(ids, table)
    want = want * scale if scale != 1.0 else want
    assert got.shape == want.shape == (3, 1, 1100) and got.dtype == dtype
    if INTERPRET and dtype == torch.bfloat16:  # the interpreter truncates where CUDA rounds to nearest
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
    else:
        assert torch.equal(got, want)
    # The partial sums of squares a normed projection of these rows reads: one a block of the kernel's columns
    # (1,100 = a whole block and a masked one), of the rows as stored.
    rows, squares = embed_rows(ids, table, scale, emit_squares=True)
    assert torch.equal(rows, got) and squares.shape == (2, 3) and squares.dtype == torch.float32
    parts = rows[:, 0].float().pow(2).split(EMBED_BLOCK, dim=1)
    torch.testing.assert_close(squares, torch.stack([p.sum(1) for p in parts]), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="ids"):
        embed_rows(ids[:, 0], table)
    with pytest.raises(ValueError, match="ids"):
        embed_rows(ids.float(), table)
    with pytest.raises(ValueError, match="table"):
        embed_rows(ids, table.double())
