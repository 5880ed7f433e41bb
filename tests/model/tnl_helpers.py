"""Helpers for the model tests: small deterministic models, float64 unless a test says otherwise."""

from __future__ import annotations

from typing import Any

import torch

from tnlora.model import TransnormerForCausalLM, config_from_preset


def build_model(
    dtype: torch.dtype = torch.float64, seed: int = 0, **overrides: Any
) -> TransnormerForCausalLM:
    """The "tiny" preset with overrides, seeded, in eval mode.

    init_std defaults to 0.3 (not 0.02) so that a random model's next-token choices differ from step to step
    and from row to row; with 0.02 greedy decoding repeats one token and comparisons would prove little.
    """
    overrides.setdefault("init_std", 0.3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TransnormerForCausalLM(config_from_preset("tiny", **overrides))
    return model.to(dtype).eval()


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 384) -> torch.Tensor:
    """Seeded token ids [batch, length] drawn from 3…vocab−1 (above the pad, bos and eos ids)."""
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
