"""The Triton kernels of :mod:`tnlora.ops.token_choice` (see there for what they compute).

This module imports triton at import; ``tnlora.ops.token_choice`` imports it on first use only.
"""

import triton
import triton.language as tl

from tnlora.ops.gemv_triton import gdc_launch_dependents, gdc_wait

_NO_INDEX = tl.constexpr(2147483647)  # larger than any index: loses every "first index" comparison


@triton.jit
def _first_max(values, indices, valid):
    """(value, index) of the first maximum of ``values`` where ``valid``, ``torch.argmax``'s order: a NaN
    counts as larger than anything, and among equals (NaNs among NaNs) the smallest index wins."""
    nan = (values != values) & valid
    has_nan = tl.max(nan.to(tl.int32), 0) > 0
    nan_index = tl.min(tl.where(nan, indices, _NO_INDEX), 0)
    largest = tl.max(tl.where(valid & ~nan, values, float("-inf")), 0)
    max_index = tl.min(tl.where(valid & (values == largest), indices, _NO_INDEX), 0)
    index = tl.where(has_nan, nan_index, max_index)
    value = tl.where(has_nan, float("nan"), largest)
    return value, index


@triton.jit
def pieces_kernel(
    logits_ptr, stride_row, words, eos_ptr, ban_below_ptr, length_ptr, values_ptr, indices_ptr, pieces,
    EOS: tl.constexpr, PIECE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (row, piece): the first maximum of the row's scores over the piece's words (fp32, the eos ids
    at -inf while the sequence is shorter than ban_below; EOS of them, a constant: the loop over them unrolls).
    With PDL (a programmatic dependent launch) the next kernel may launch at once; this one waits for the
    kernel before it (the logits' writer) before reading anything."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0)
    piece = tl.program_id(1)
    words_here = piece * PIECE + tl.arange(0, PIECE)
    inside = words_here < words
    scores = tl.load(logits_ptr + row * stride_row + words_here, mask=inside, other=float("-inf")).to(tl.float32)
    banned = tl.load(length_ptr) < tl.load(ban_below_ptr)
    for i in tl.static_range(EOS):
        scores = tl.where(banned & (words_here == tl.load(eos_ptr + i)), float("-inf"), scores)
    value, index = _first_max(scores, words_here, inside)
    tl.store(values_ptr + row * pieces + piece, value)
    tl.store(indices_ptr + row * pieces + piece, index)


@triton.jit
def finish_kernel(
    values_ptr, indices_ptr, pieces, eos_ptr, pad_ptr, out_ptr, rows, ids_ptr, position_ptr, length_ptr,
    EOS: tl.constexpr, PIECES: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program row: the first maximum over the row's pieces (a piece's words all come before the next's, so
    the smallest index among equal maxima is the first), the eos padding and flags, the token stored; program
    0 also moves the position and the length one on. With PDL, as pieces_kernel: waits before reading."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0)
    piece = tl.arange(0, PIECES)
    valid = piece < pieces
    values = tl.load(values_ptr + row * pieces + piece, mask=valid, other=float("-inf"))
    indices = tl.load(indices_ptr + row * pieces + piece, mask=valid, other=_NO_INDEX)
    _, index = _first_max(values, indices, valid)
    unfinished = tl.load(out_ptr + row)
    token = tl.where(unfinished != 0, index.to(tl.int64), tl.load(pad_ptr))
    ended = token != token  # False, as a tensor the loop can update
    for i in tl.static_range(EOS):
        ended = ended | (token == tl.load(eos_ptr + i))
    tl.store(out_ptr + row, tl.where(ended, 0, unfinished))
    tl.store(out_ptr + rows + row, token)
    tl.store(ids_ptr + row, token)
    if row == 0:
        tl.store(position_ptr, tl.load(position_ptr) + 1)
        tl.store(length_ptr, tl.load(length_ptr) + 1)
