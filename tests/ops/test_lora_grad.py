"""The LoRA backward's two products of dy from one read of it (``tnlora.ops.lora_grad``) against PyTorch's two
GEMMs, and its launch grid.

The kernel tests need triton and a CUDA device, or Triton's CPU interpreter (see tests/ops/test_recurrent.py):

    TRITON_INTERPRET=1 PYTHONPATH=<dir holding triton> pytest -q tests/ops/test_lora_grad.py
"""

from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE, INTERPRET, needs_kernel

from tnlora.ops import lora_grad
from tnlora.ops.lora_grad import BLOCK_N, BLOCK_T, MAX_ROWS_PER_PROGRAM, Launch, launch_grid, lora_dy_products

# fp64: the same sums grouped differently; fp32 likewise (no TF32); bf16: both round one fp32 sum at the end.
TOLERANCE = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 2**-7}
# Under the interpreter bf16 is left to CUDA: Triton 3.6's interpreter computes a bf16 dot wrongly (it reads the
# operands' bits as another type; tests/ops/test_gemv.py).
DTYPES = [torch.float64, torch.float32] + ([] if INTERPRET else [torch.bfloat16])


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()
    assert err <= TOLERANCE[dtype], err


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rank", "per_processor", "grid"), [(8, 4, (4, 3, BLOCK_T)), (5, 4, (4, 3, BLOCK_T)), (8, 0, (1, 3, 4096))])
def test_one_read_of_dy_gives_both_products(dtype: torch.dtype, rank: int, per_processor: int, grid: tuple) -> None:
    # three column splits, the last ending mid-block; four row programs of one tile, the last short, or one
    # program walking all the rows and then tiles wholly past the end: every mask is exercised
    launch = Launch(programs_per_sm=per_processor)
    rows, cols = 3 * BLOCK_T + 7, 2 * BLOCK_N + 45
    assert launch_grid(rows, cols, 8, launch) == grid
    gen = torch.Generator().manual_seed(rank)
    dy, b, hs = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
                 for shape in ((rows, cols), (cols, rank), (rows, rank)))  # fmt: skip
    got = lora_dy_products(dy, b, hs, launch)
    # the reference in float64 from the same (rounded) inputs, rounded to dtype once
    want = [t.to(dtype) for t in lora_grad.lora_dy_products_reference(dy.double(), b.double(), hs.double())]
    for g, w in zip(got, want, strict=True):
        _close(g, w, dtype)


@needs_kernel
def test_strided_inputs_are_read_as_they_are_and_bad_shapes_refused() -> None:
    dy = torch.randn(96, 40, dtype=torch.float64, device=DEVICE).t()  # [40, 96], not contiguous
    b = torch.randn(96, 8, dtype=torch.float64, device=DEVICE)
    hs = torch.randn(8, 40, dtype=torch.float64, device=DEVICE).t()
    for g, w in zip(lora_dy_products(dy, b, hs), lora_grad.lora_dy_products_reference(dy, b, hs), strict=True):
        _close(g, w, torch.float64)
    with pytest.raises(ValueError, match=r"shapes do not match: dy \(40, 96\), lora_b \(95, 8\), hs \(40, 8\)"):
        lora_dy_products(dy, b[:95], hs)


def test_launch_grid_covers_every_row_and_column_and_fills_the_processors() -> None:
    for rows, cols, processors in ((131072, 16384, 132), (16384, 4096, 132), (32768, 2048, 132), (100, 30, 8)):
        row_programs, splits, rows_each = launch_grid(rows, cols, processors)
        assert row_programs * rows_each >= rows > (row_programs - 1) * rows_each
        assert splits * BLOCK_N >= cols > (splits - 1) * BLOCK_N
        tiles = rows_each // BLOCK_T
        assert rows_each % BLOCK_T == 0 and tiles & (tiles - 1) == 0 and rows_each <= MAX_ROWS_PER_PROGRAM
        # enough programs for every processor where there are enough tiles
        wanted = lora_grad.PROGRAMS_PER_SM * processors
        assert row_programs * splits >= min(wanted, splits * -(-rows // BLOCK_T))
    assert launch_grid(16384, 16384, 132) == (16, 64, 1024)
    assert launch_grid(131072, 16384, 132) == (32, 64, 4096)  # long rows: the most rows a program


@needs_kernel
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_the_lora_layers_backward_with_one_read_equals_the_two_gemms(dropout: float) -> None:
    """tnlora.ops.lora's autograd function and its custom operators, with ``one_read``: the same gradients as
    with the two GEMMs (fp64), the same dropout mask drawn in both."""
    from tnlora.ops.lora import _lora_linear_op_call, _LoraLinear

    gen = torch.Generator().manual_seed(1)
    x, weight, lora_a, lora_b = (torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE)
                                 for shape in ((3, 50, 24), (40, 24), (8, 24), (40, 8)))  # fmt: skip
    dy = torch.randn(3, 50, 40, generator=gen, dtype=torch.float64).to(DEVICE)
    grads = {}
    for form, one_read in (("function", False), ("function", True), ("operator", False), ("operator", True)):
        leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
        torch.manual_seed(2)
        if form == "function":
            # the trailing Nones: no fp8 copy of the base (weight_q, weight_scale); False: PyTorch's dropout
            y = _LoraLinear.apply(
                leaves[0], weight, None, leaves[1], leaves[2], 2.0, dropout, True, one_read, None, None, False
            )
        else:
            y = _lora_linear_op_call(leaves[0], weight, None, leaves[1], leaves[2], 2.0, dropout, True, one_read)
        grads[form, one_read] = torch.autograd.grad(y, leaves, dy)
    for key, got in grads.items():
        for g, w in zip(got, grads["function", False], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=str(key))


@needs_kernel
def test_the_backward_operator_with_one_read_passes_torch_library_checks() -> None:
    gen = torch.Generator().manual_seed(0)
    dy, weight, lora_a, lora_b, x = (torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE)
                                     for shape in ((6, 20), (20, 12), (4, 12), (20, 4), (6, 12)))  # fmt: skip
    empty = torch.empty(0, 12, dtype=torch.bool, device=DEVICE)
    torch.library.opcheck(
        torch.ops.tnlora.lora_linear_backward.default,
        (dy, weight, lora_a, lora_b, x, x @ lora_a.t(), empty, 2.0, 0.0, True, True, *[None] * 5, False),  # no fp8 base
    )
