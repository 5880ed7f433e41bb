"""The host-side planning of tnlora's fla backend (the kernels themselves: test_lightning_gpu.py)."""

from __future__ import annotations

import math

import torch

from tnlora.ops import fla


def test_num_splits_counts_every_examples_chunks() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(1, 300, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        for split in (64, 128):
            want = sum(math.ceil(n / split) for n in lengths.tolist())
            assert fla.num_splits(cu, split) == want


def test_host_copy_travels_with_its_tensor_until_it_changes() -> None:
    cu = torch.tensor([0, 5, 70, 71])
    fla.tag_host_copy(cu, cu.clone())
    assert torch.equal(fla.host_copy(cu), cu)
    assert fla.host_copy(cu.clone()) is None  # equal values, another tensor: fla's own path
    assert fla.host_copy(None) is None
    cu[3] = 72  # changed in place: the copy no longer describes it
    assert fla.host_copy(cu) is None
