"""Helpers for the tests: small deterministic models (float64 unless a test says otherwise) and a short
training run's output to load."""

from __future__ import annotations

from pathlib import Path
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


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) [len(rows), longest]: each row right-aligned behind pad id 0 with mask 0."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def train_tiny_adapter(out: Path, system: str) -> Path:
    """The output dir of a 30-step LoRA run on the tiny preset and the bundled sample data (chatml, the given
    system prompt): what the inference and serve tests load."""
    from tnlora.config import load_run_config
    from tnlora.train.run import train

    cfg = load_run_config(
        None,
        [
            "--model_name_or_path", "tiny",
            "--dataset", "quickstart_alpaca,quickstart_chat",
            "--dataset_dir", str(EXAMPLES / "data"),
            "--template", "chatml",
            "--system", system,
            # the chunked attention everywhere: on a GPU, fla would first autotune for the tiny shapes (minutes)
            "--attention_impl", "chunked",
            "--cutoff_len", "256",
            "--output_dir", str(out),
            "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-2",
            "--max_steps", "30",
            "--save_steps", "1000",
            "--report_to", "none",
            "--plot_loss", "false",
            "--seed", "0",
        ],
    )  # fmt: skip
    train(cfg)
    return out
