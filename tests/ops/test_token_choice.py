"""The greedy token choice of a decode step (``tnlora.ops.token_choice``) against transformers' greedy loop
written out in plain PyTorch: the PyTorch form on the CPU, the Triton kernels where they run (CUDA, or the CPU
interpreter: ``TRITON_INTERPRET=1 PYTHONPATH=<dir holding triton> pytest -q tests/ops/test_token_choice.py``).
"""

from __future__ import annotations

import functools

import pytest
import torch
from kernel_device import DEVICE, needs_kernel

from tnlora.ops.gemv import pdl_supported
from tnlora.ops.token_choice import PIECE, choose_greedy, row_argmax


def _scores(rows: int, words: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Scores with many ties (small integers), a tie for a row's maximum across pieces, a NaN row, an all -inf
    row, and a maximum in the last word."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(-40, 40, (rows, words), generator=gen).to(dtype)
    far = min(words - 1, PIECE + 17)
    scores[1 % rows, 5] = scores[1 % rows, far] = 1000
    if rows > 2:
        scores[2, words // 3] = float("nan")
        scores[2, words // 2] = float("nan")
    if rows > 3:
        scores[3] = float("-inf")
    if rows > 4:
        scores[4, -1] = 2000
    return scores


def _expected(logits, eos, ban_below, length, pad, unfinished):
    """transformers' greedy loop for one step: the min-length ban, argmax, eos padding, the eos criterion."""
    scores = logits.float().clone()
    if length < ban_below and eos:
        scores[:, eos] = float("-inf")
    tokens = torch.argmax(scores, dim=-1)
    tokens = tokens * unfinished + pad * (1 - unfinished)
    ended = torch.isin(tokens, torch.tensor(eos, dtype=torch.long))
    return tokens, unfinished & ~ended


def _buffers(rows: int, eos: list[int], ban_below: int, length: int, pad: int, unfinished: list[int], device):
    long = {"dtype": torch.long, "device": device}
    out = torch.zeros(2, rows, **long)
    out[0] = torch.tensor(unfinished)
    return {
        "eos": torch.tensor(eos, **long),
        "ban_below": torch.tensor(ban_below, **long),
        "length": torch.tensor(length, **long),
        "pad": torch.tensor(pad, **long),
        "out": out,
        "ids": torch.full((rows, 1), -7, **long),
        "position": torch.tensor(41, **long),
    }


SETTINGS = [
    # eos ids, ban_below, length, pad, unfinished flags
    ([], 0, 10, 0, [1, 1, 1, 1, 1, 1]),  # no eos: nothing padded or finished
    ([7, 5], 0, 10, 0, [1, 1, 1, 1, 1, 0]),  # eos ids (5: row 1's first maximum), a finished row
    ([5], 30, 10, 2, [1, 1, 1, 1, 1, 1]),  # the ban in force: row 1's tied maximum at word 5 is banned
    ([5], 10, 10, 2, [0, 1, 1, 0, 1, 1]),  # the ban just over; finished rows padded with 2
]


def _check(choose, words: int, dtype: torch.dtype, device) -> None:
    for seed, (eos, ban_below, length, pad, unfinished) in enumerate(SETTINGS):
        logits = _scores(6, words, dtype, seed).to(device)
        buffers = _buffers(6, eos, ban_below, length, pad, unfinished, device)
        choose(logits, **buffers)
        tokens, flags = _expected(logits.cpu(), eos, ban_below, length, pad, torch.tensor(unfinished))
        assert torch.equal(buffers["out"][1].cpu(), tokens), (eos, ban_below, length)
        assert torch.equal(buffers["out"][0].cpu(), flags)
        assert torch.equal(buffers["ids"][:, 0].cpu(), tokens)
        assert int(buffers["position"]) == 42 and int(buffers["length"]) == length + 1


@pytest.mark.parametrize("words", [384, 64000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_choice_equals_transformers_loop(words: int, dtype: torch.dtype) -> None:
    _check(choose_greedy, words, dtype, "cpu")


@needs_kernel
@pytest.mark.parametrize("words", [384, 3 * PIECE + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_choice_equals_transformers_loop(words: int, dtype: torch.dtype) -> None:
    _check(functools.partial(choose_greedy, kernel="triton"), words, dtype, DEVICE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_triton_choice_at_the_vocabulary_of_tnl() -> None:
    _check(functools.partial(choose_greedy, kernel="triton"), 64000, torch.bfloat16, "cuda")
    if pdl_supported("cuda"):  # as programmatic dependent launches (what the decode step's graph records)
        _check(functools.partial(choose_greedy, kernel="triton", pdl=True), 64000, torch.bfloat16, "cuda")


def test_wrong_buffers_are_refused() -> None:
    logits = torch.zeros(2, 16)
    buffers = _buffers(2, [1], 0, 3, 0, [1, 1], "cpu")
    with pytest.raises(ValueError, match="out must be"):
        choose_greedy(logits, **{**buffers, "out": torch.zeros(2, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="int64"):
        choose_greedy(logits, **{**buffers, "eos": torch.tensor([1], dtype=torch.int32)})


@pytest.mark.parametrize("words", [64000, 384])
def test_row_argmax_equals_torch_argmax_on_ties_and_nan(words: int) -> None:
    scores = _scores(6, words, torch.float32, words)
    scores[0, 12345 % words] = float("nan")
    assert torch.equal(row_argmax(scores), torch.argmax(scores, dim=-1))
