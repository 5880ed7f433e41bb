"""The estimate behind the gradient_checkpointing default: its calibration points, the cards it decides on,
and how the default is picked from it."""

from __future__ import annotations

import pytest

from fixture_files import OFFICIAL_CONFIGS
from tnlora.config import RunConfig, load_run_config, resolve_defaults
from tnlora.model import config_from_preset
from tnlora.ops import select
from tnlora.train import memory
from tnlora.train.memory import (
    fits_without_checkpointing,
    memory_without_checkpointing,
    model_config,
    parameter_count,
)

GIB = 2**30
H100_80GB = 79.6 * GIB  # total_memory torch reports for the 80 GB cards
H200 = 139.8 * GIB


def gpu_config(model: str, *overrides: str) -> RunConfig:
    cfg = load_run_config(None, ["--model_name_or_path", model, "--dataset", "d", "--output_dir", "o", *overrides])
    return resolve_defaults(cfg, cuda=True, cuda_bf16=True)


def test_parameter_counts_are_the_benchmarks_n():
    assert parameter_count(config_from_preset("1B")) == 1_020_266_496
    assert parameter_count(config_from_preset("7B")) == 6_836_719_616


def test_model_config_reads_an_official_checkpoint_dir():
    official, preset = model_config(str(OFFICIAL_CONFIGS / "7B")), config_from_preset("7B")
    assert (official.decoder_embed_dim, official.decoder_layers, official.vocab_size) == (
        preset.decoder_embed_dim, preset.decoder_layers, preset.vocab_size,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("model", "compiled", "norms", "dropout", "measured_gib", "rows"),
    [
        ("1B", "true", "triton", "0", 24.3, 16),
        ("7B", "true", "triton", "0", 94.0, 16),
        ("1B", "true", "triton", "0", 46.6, 32),
        ("7B", "false", "triton", "0", 53.4, 8),
        ("1B", "false", "triton", "0", 45.7, 32),
        ("7B", "false", "triton", "0.1", 61.6, 8),
        ("7B", "true", "triton", "0.1", 61.7, 8),
        ("1B", "false", "torch", "0", 29.8, 16),
        ("1B", "false", "torch", "0", 54.1, 32),
        ("7B", "false", "torch", "0.1", 69.1, 8),
    ],
)  # peaks of benchmarks/RESULTS.md (dropout 0.1: `tnlora train` on huanhuan); compiled layers: the PyTorch norms
def test_estimate_is_a_little_above_the_measured_peaks(monkeypatch, model, compiled, norms, dropout, measured_gib, rows):
    monkeypatch.setattr(select, "triton_available", lambda: norms == "triton")
    cfg = gpu_config(
        model, "--torch_compile", compiled, "--per_device_train_batch_size", str(rows), "--lora_dropout", dropout
    )
    estimate = memory_without_checkpointing(config_from_preset(model), cfg) / GIB
    assert measured_gib <= estimate <= 1.12 * measured_gib


def test_only_7b_at_16k_tokens_needs_checkpointing_on_an_80gb_card():
    assert fits_without_checkpointing(gpu_config("1B"), H100_80GB)
    assert not fits_without_checkpointing(gpu_config("7B"), H100_80GB)
    assert fits_without_checkpointing(gpu_config("7B"), H200)  # measured: 94.0 GiB, it trained
    assert fits_without_checkpointing(gpu_config("7B", "--per_device_train_batch_size", "4"), H100_80GB)
    # Full fine-tuning keeps 16 bytes per parameter besides the activations.
    assert not fits_without_checkpointing(gpu_config("7B", "--finetuning_type", "full", "--cutoff_len", "128",
                                                     "--per_device_train_batch_size", "1"), H100_80GB)


def test_default_is_picked_from_the_estimate_only_when_unset():
    cfg = load_run_config(None, ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o"])
    assert cfg.gradient_checkpointing is None
    seen = []

    def fits(resolved: RunConfig) -> bool:
        seen.append((resolved.gradient_checkpointing, resolved.per_device_train_batch_size))
        return False

    assert resolve_defaults(cfg, cuda=True, cuda_bf16=True, fits=fits).gradient_checkpointing is True
    # Asked whether 32k, 16k, 8k tokens fit without checkpointing, then about the resolved (16k) batch.
    assert seen == [(False, 32), (False, 16), (False, 8), (False, 16)]
    assert resolve_defaults(cfg, cuda=True, cuda_bf16=True, fits=lambda c: True).gradient_checkpointing is False
    assert resolve_defaults(cfg, cuda=False, cuda_bf16=False, fits=fits).gradient_checkpointing is False
    mine = load_run_config(None, ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o",
                                  "--gradient_checkpointing", "false"])
    assert resolve_defaults(mine, cuda=True, cuda_bf16=True, fits=fits).gradient_checkpointing is False


def test_the_micro_batch_is_the_largest_that_fits_without_checkpointing():
    def picked(model: str, card: float) -> tuple[int, bool]:
        cfg = load_run_config(None, ["--model_name_or_path", model, "--dataset", "d", "--output_dir", "o"])
        cfg = resolve_defaults(
            cfg, cuda=True, cuda_bf16=True, fits=lambda c: fits_without_checkpointing(c, card)
        )
        return cfg.per_device_train_batch_size, cfg.gradient_checkpointing

    assert picked("1B", H100_80GB) == (32, False)  # 32 rows of 1,024 tokens
    assert picked("7B", H200) == (16, False)  # 32k would need checkpointing: 16k without it
    assert picked("7B", H100_80GB) == (8, False)  # 8k rows without checkpointing rather than 16k with it
    assert picked("7B", 40 * GIB) == (16, True)  # not even 8k fit: 16k rows with checkpointing
    chosen = load_run_config(None, ["--model_name_or_path", "1B", "--dataset", "d", "--output_dir", "o",
                                    "--gradient_checkpointing", "true"])  # fmt: skip
    on = resolve_defaults(chosen, cuda=True, cuda_bf16=True, fits=lambda c: True)
    assert on.per_device_train_batch_size == 16


def test_the_defaults_fit_the_share_of_the_card_the_process_may_use(monkeypatch):
    """A process capped by set_per_process_memory_fraction (tnlora bench --gpu_memory_gib) gets the defaults
    of the smaller card: on an H200 capped at an H100's 79.6 GiB, 7B gets 8 rows rather than 16."""
    import torch

    from tnlora.train import memory

    class Props:
        total_memory = int(H200)

    fraction = {"value": 1.0}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: fraction["value"])
    cfg = load_run_config(None, ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o"])
    assert memory.device_memory() == int(H200)
    assert resolve_defaults(cfg, cuda=True, cuda_bf16=True, fits=memory.gpu_fits()).per_device_train_batch_size == 16
    fraction["value"] = H100_80GB / H200
    assert abs(memory.device_memory() - H100_80GB) <= 1
    on_80gb = resolve_defaults(cfg, cuda=True, cuda_bf16=True, fits=memory.gpu_fits())
    assert (on_80gb.per_device_train_batch_size, on_80gb.gradient_checkpointing) == (8, False)


def test_compile_is_the_default_only_for_runs_long_enough_to_repay_it():
    from tnlora.config import COMPILE_MIN_TOKENS

    cfg = load_run_config(None, ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o"])

    def compiled(**kw) -> bool:
        return resolve_defaults(cfg, cuda=True, cuda_bf16=True, **kw).torch_compile

    assert compiled() is True  # length not known yet (preflight, bench): the fast steady state
    assert compiled(train_tokens=COMPILE_MIN_TOKENS) is True
    assert compiled(train_tokens=1_140_000) is False  # huanhuan's 3 epochs
    assert resolve_defaults(cfg, cuda=False, cuda_bf16=False, train_tokens=10**9).torch_compile is False
    chosen = load_run_config(None, ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o",
                                    "--torch_compile", "true"])
    assert resolve_defaults(chosen, cuda=True, cuda_bf16=True, train_tokens=1).torch_compile is True


def test_eager_layers_are_sized_with_their_own_memory_estimate(monkeypatch, capsys):
    """Re-resolved for a short run, the micro-batch and checkpointing follow the eager estimate (with the PyTorch
    norms, where triton is missing: 58 bytes, not 46): on a card where 8 x 1,024 7B tokens fit compiled but not
    eager, the eager run checkpoints; with the Triton norms both estimates are the same."""
    import torch

    from tnlora.train import run

    cfg = load_run_config(None, ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o"])
    card = 70 * GIB  # 0.9 x 70 = 63 GiB: 8k tokens need ~55.8 compiled, ~67.1 eager with the PyTorch norms
    monkeypatch.setattr(select, "triton_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(memory, "gpu_fits", lambda: lambda c: fits_without_checkpointing(c, card))
    first = run.resolve_for_this_machine(cfg)
    assert (first.torch_compile, first.per_device_train_batch_size, first.gradient_checkpointing) == (True, 8, False)
    short = run.resolve_for_this_machine(cfg, train_tokens=1_000_000)
    assert (short.torch_compile, short.per_device_train_batch_size, short.gradient_checkpointing) == (False, 16, True)
    assert "gradient_checkpointing: on" in capsys.readouterr().err
    monkeypatch.setattr(select, "triton_available", lambda: True)
    short = run.resolve_for_this_machine(cfg, train_tokens=1_000_000)
    assert (short.torch_compile, short.per_device_train_batch_size, short.gradient_checkpointing) == (False, 8, False)


def test_planned_train_tokens_count_epochs_or_max_steps():
    from tnlora.train.run import planned_train_tokens

    examples = [{"input_ids": [1] * 100} for _ in range(10)]
    base = ["--model_name_or_path", "tiny", "--dataset", "d", "--output_dir", "o", "--per_device_train_batch_size", "2"]
    assert planned_train_tokens(load_run_config(None, [*base, "--num_train_epochs", "3"]), examples) == 3_000
    # unpacked: a step is 2 examples of 100 tokens; 7 steps: 1,400
    assert planned_train_tokens(load_run_config(None, [*base, "--max_steps", "7", "--packing", "false"]), examples) == 1_400
    # packed rows of cutoff_len 128, 2 a micro-batch, 2 micro-batches a step, 3 steps
    packed = [*base, "--max_steps", "3", "--packing", "true", "--cutoff_len", "128", "--gradient_accumulation_steps", "2"]
    assert planned_train_tokens(load_run_config(None, packed), examples) == 3 * 2 * 2 * 128
    # the micro-batch left open, packed: the token budget the defaults start from, at most an epoch's tokens
    open_batch = ["--model_name_or_path", "tiny", "--dataset", "d", "--output_dir", "o", "--max_steps", "4",
                  "--packing", "true"]  # fmt: skip
    assert planned_train_tokens(load_run_config(None, open_batch), examples) == 4 * 1_000
