"""The host-side planning of tnlora's fla backend (the kernels themselves: test_attention_gpu.py)."""

from __future__ import annotations

import gc
import math

import torch

from tnlora.model import fla_backend


def test_num_splits_counts_every_examples_chunks() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(1, 300, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        for split in (64, 128):
            want = sum(math.ceil(n / split) for n in lengths.tolist())
            assert fla_backend.num_splits(cu, split) == want


def test_host_copy_is_found_by_identity_and_lives_with_its_tensor() -> None:
    cu = torch.tensor([0, 5, 70, 71])
    fla_backend.remember_host_copy(cu, cu.clone())
    assert torch.equal(fla_backend.host_copy(cu), cu)
    assert fla_backend.host_copy(cu.clone()) is None  # equal values, another tensor: fla's own path
    assert fla_backend.host_copy(None) is None
    del cu
    gc.collect()
    assert len(fla_backend._host_copies) == 0
