"""The estimate behind the gradient_checkpointing default: its calibration points, the cards it decides on,
and how the default is picked from it."""

from __future__ import annotations

import pytest

from fixture_files import OFFICIAL_CONFIGS
from tnlora.config import RunConfig, load_run_config, resolve_defaults
from tnlora.errors import ConfigError
from tnlora.model import config_from_preset
from tnlora.ops import select
from tnlora.train import memory
from tnlora.train.memory import (
    fits_in_memory,
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

    with pytest.raises(ConfigError, match=r"^quantization_bit: 7B does not fit this GPU even with one 1,024-token "
                       r"row a micro-batch and offloaded checkpointing; set quantization_bit: 4"):
        resolve_defaults(cfg, cuda=True, cuda_bf16=True, fits=fits)
    # Asked whether 32k, 16k, 8k tokens fit without checkpointing, 16k to 4k with it, then offloaded down to one
    # 1,024-token row.
    assert seen == [(False, 32), (False, 16), (False, 8), (True, 16), (True, 8), (True, 4),
                    (True, 16), (True, 8), (True, 4), (True, 2), (True, 1)]  # fmt: skip
    seen.clear()
    checkpointed = resolve_defaults(cfg, cuda=True, cuda_bf16=True, fits=lambda c: bool(c.gradient_checkpointing))
    assert (checkpointed.per_device_train_batch_size, checkpointed.gradient_checkpointing) == (16, True)
    assert checkpointed.use_unsloth_gc is False
    assert resolve_defaults(cfg, cuda=True, cuda_bf16=True, fits=lambda c: True).gradient_checkpointing is False
    assert resolve_defaults(cfg, cuda=False, cuda_bf16=False, fits=fits).gradient_checkpointing is False
    mine = load_run_config(None, ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o",
                                  "--gradient_checkpointing", "false"])
    with pytest.raises(ConfigError, match=r"^gradient_checkpointing: .*set gradient_checkpointing: true"):
        resolve_defaults(mine, cuda=True, cuda_bf16=True, fits=fits)  # not even one row fits without it
    given = load_run_config(None, ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o",
                                   "--gradient_checkpointing", "false", "--per_device_train_batch_size", "4"])
    assert resolve_defaults(given, cuda=True, cuda_bf16=True, fits=fits).gradient_checkpointing is False


def test_the_micro_batch_is_the_largest_that_fits_without_checkpointing():
    def picked(model: str, card: float) -> tuple[int, bool]:
        cfg = load_run_config(None, ["--model_name_or_path", model, "--dataset", "d", "--output_dir", "o"])
        cfg = resolve_defaults(cfg, cuda=True, cuda_bf16=True, fits=lambda c: fits_in_memory(c, card))
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
    monkeypatch.setattr(memory, "gpu_fits", lambda: lambda c: fits_in_memory(c, card))
    first = run.resolve_for_this_machine(cfg)
    assert (first.torch_compile, first.per_device_train_batch_size, first.gradient_checkpointing) == (True, 8, False)
    short = run.resolve_for_this_machine(cfg, train_tokens=1_000_000)
    assert (short.torch_compile, short.per_device_train_batch_size, short.gradient_checkpointing) == (False, 16, True)
    said = capsys.readouterr().err
    assert "gradient_checkpointing: on" in said
    # the memory left under checkpointing went to less recompute, and the run says so
    assert (short.checkpoint_regions, short.uncheckpointed_layers) != ("layer", 0)
    assert f"checkpoint_regions: {short.checkpoint_regions}, uncheckpointed_layers: {short.uncheckpointed_layers}" in said
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


def test_quantized_linear_layers_are_counted_at_about_half_a_byte_a_parameter():
    """4-bit: half a byte per parameter of the decoder's linear layers plus the block scales (one fp32 per 64, or
    with double quantization one byte per 64 and an fp32 per 256 blocks); the embedding stays bf16; LoRA A and B
    of every linear layer at rank 8 train (16 bytes each)."""
    config = config_from_preset("7B")
    cfg = gpu_config("7B", "--quantization_bit", "4")
    counts = memory.parameter_counts(config, cfg)
    assert (counts.total, counts.linear, counts.lora, counts.additional) == (
        6_836_719_616, 6_574_571_520, 17_756_160, 0,
    )  # fmt: skip
    rest = 2 * (counts.total - counts.linear) + 16 * counts.lora
    assert memory.weight_bytes(config, cfg) == pytest.approx((0.5 + 1 / 64 + 4 / 16384) * counts.linear + rest)
    single = gpu_config("7B", "--quantization_bit", "4", "--double_quantization", "false")
    assert memory.weight_bytes(config, single) == pytest.approx((0.5 + 1 / 16) * counts.linear + rest)
    assert memory.weight_bytes(config, gpu_config("7B", "--quantization_bit", "8")) == pytest.approx(counts.linear + rest)
    assert memory.weight_bytes(config, gpu_config("7B")) == pytest.approx(2 * counts.total + 16 * counts.lora)
    assert memory.weight_bytes(config, cfg) / GIB == pytest.approx(3.91, abs=0.01)  # 12.7 GiB in bf16


def test_fp8_adds_a_byte_for_each_adapted_weight():
    """fp8: true keeps an e4m3 copy of every adapted layer's frozen weight beside the bf16 one; only the adapted
    ones (lora_target)."""
    config = config_from_preset("7B")
    plain, fp8 = gpu_config("7B"), gpu_config("7B", "--fp8", "true")
    counts = memory.parameter_counts(config, fp8)
    assert counts.adapted == counts.linear == 6_574_571_520
    assert memory.weight_bytes(config, fp8) - memory.weight_bytes(config, plain) == counts.adapted
    some = gpu_config("7B", "--fp8", "true", "--lora_target", "qkvu_proj")
    assert memory.parameter_counts(config, some).adapted == config.decoder_layers * 4 * 4096 * 4096  # 30 layers


def test_checkpointing_keeps_each_layers_input_and_offload_keeps_two(monkeypatch):
    monkeypatch.setattr(select, "triton_available", lambda: True)  # the GPU's forms
    config = config_from_preset("7B")

    def activations(*keys: str) -> int:
        cfg = gpu_config("7B", "--per_device_train_batch_size", "8", *keys)
        return memory.activation_bytes(config, cfg)

    tokens_width = 8 * 1024 * 4096
    per_unit = 46
    buffers = memory.RECOMPUTE_BUFFER_BYTES  # compiled layers (gpu_config's default)
    assert activations("--gradient_checkpointing", "false") == per_unit * tokens_width * 30
    checkpointed = int((1.05 * per_unit + 2 * 30) * tokens_width + buffers)
    assert activations("--gradient_checkpointing", "true", "--checkpoint_regions", "layer",
                       "--uncheckpointed_layers", "0") == checkpointed  # fmt: skip
    eager = activations("--gradient_checkpointing", "true", "--checkpoint_regions", "layer", "--uncheckpointed_layers",
                        "0", "--torch_compile", "false")  # fmt: skip
    assert eager == int((1.05 * per_unit + 2 * 30) * tokens_width)
    assert activations("--use_unsloth_gc", "true") == (2 * per_unit + 2 * 2) * tokens_width
    # the mixers checkpointed apart: each layer's middle residual too, and the larger step recomputed
    apart = activations("--gradient_checkpointing", "true", "--checkpoint_regions", "mixers",
                        "--uncheckpointed_layers", "0")  # fmt: skip
    assert apart == int((0.9 * per_unit + 2 * 2 * 30) * tokens_width + buffers)
    # the last layers un-checkpointed: their inputs are not kept apart, their activations are; the first one
    # in the place of the recompute
    for regions, inputs in (("layer", 1), ("mixers", 2)):
        for kept in (1, 3):
            fewer = activations("--gradient_checkpointing", "true", "--checkpoint_regions", regions,
                                "--uncheckpointed_layers", str(kept))  # fmt: skip
            assert fewer == int(((kept + 0.05) * per_unit + 2 * inputs * (30 - kept)) * tokens_width + buffers)


# 7B on one 131,072-token row, compiled, dropout 0: the peaks of benchmarks/RESULTS.md ("Long sequences", 00b6473),
# regions and layers kept as (checkpoint_regions, uncheckpointed_layers); None: ran out of memory. Measured with
# the activation's forward operator, which kept u as a copy (2 bytes per token and unit of width more than the
# forward since e7c57c8, where u is a view): the estimates below count those 2 bytes.
LONG_ROW_PEAKS = [
    ("layer", 0, 67.8), ("mixers", 0, 94.0), ("layer", 3, 111.3), ("mixers", 1, 98.2), ("mixers", 2, 118.2),
    ("layer", 4, None), ("mixers", 3, None),
]  # fmt: skip


def long_row(*keys: str) -> RunConfig:
    return gpu_config("7B", "--cutoff_len", "131072", "--packing", "false", "--per_device_train_batch_size", "1",
                      "--lora_dropout", "0", *keys)  # fmt: skip


@pytest.mark.parametrize(("regions", "kept", "measured_gib"), LONG_ROW_PEAKS)
def test_checkpointed_estimates_lie_a_little_above_the_long_row_peaks(monkeypatch, regions, kept, measured_gib):
    monkeypatch.setattr(select, "triton_available", lambda: True)
    monkeypatch.setattr(memory, "ACTIVATION_BYTES", memory.ACTIVATION_BYTES + 2)  # u's copy, as measured
    cfg = long_row("--gradient_checkpointing", "true", "--use_unsloth_gc", "false", "--checkpoint_regions", regions,
                   "--uncheckpointed_layers", str(kept))  # fmt: skip
    estimate = memory.memory_estimate(config_from_preset("7B"), cfg) / GIB
    if measured_gib is None:  # out of memory on the H200: refused by the estimate too
        assert not memory.fits_in_memory(cfg, H200)
    else:
        assert measured_gib <= estimate <= 1.05 * measured_gib


def test_the_defaults_give_the_memory_left_to_less_recompute(monkeypatch):
    """Under checkpointing without offload, the first of recompute_plans that fits: on the H200 one 131,072-token
    7B row gets the mixers apart with 2 layers kept (the fastest of the measured plans that ran: 14,534
    tokens/s against 13,981 for whole layers all checkpointed); where the memory is short, whole layers."""
    from tnlora.config import recompute_plans

    monkeypatch.setattr(select, "triton_available", lambda: True)
    argv = ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o", "--cutoff_len", "131072",
            "--packing", "false", "--lora_dropout", "0"]  # fmt: skip

    def resolved(card_gib: float, *keys: str) -> tuple:
        out = resolve_defaults(load_run_config(None, [*argv, *keys]), cuda=True, cuda_bf16=True,
                               fits=memory.MemoryFit(int(card_gib * GIB)))  # fmt: skip
        return out.per_device_train_batch_size, out.use_unsloth_gc, out.checkpoint_regions, out.uncheckpointed_layers

    assert resolved(139.8) == (1, False, "mixers", 2)
    assert resolved(139.8, "--checkpoint_regions", "layer") == (1, False, "layer", 3)
    assert resolved(139.8, "--uncheckpointed_layers", "0") == (1, False, "mixers", 0)
    assert resolved(139.8, "--use_unsloth_gc", "true") == (1, True, "layer", 0)  # offloaded: not searched
    assert resolved(139.8, "--fsdp", "full_shard auto_wrap") == (1, False, "layer", 0)  # not under FSDP
    assert resolved(79.6) == (1, False, "layer", 1)  # the first kept layer costs no memory
    # ranked by the layer forwards left out: the mixers apart leave out out_proj, h / (5h + 3g) of a layer
    plans = [(p.checkpoint_regions, p.uncheckpointed_layers) for p in recompute_plans(load_run_config(None, argv))]
    assert plans[:4] == [("mixers", 29), ("layer", 29), ("mixers", 28), ("layer", 28)]
    # the measured order: mixers 1 (14,408 tokens/s), layer 3 (14,362), mixers 0 (14,310), layer 0 (13,981)
    assert plans.index(("mixers", 1)) < plans.index(("layer", 3)) < plans.index(("mixers", 0)) < plans.index(("layer", 0))
    assert plans[-1] == ("layer", 0) and len(plans) == 60
    # without a GPU decision (CPU): the plain regions
    cpu = resolve_defaults(load_run_config(None, argv), cuda=False, cuda_bf16=False)
    assert (cpu.checkpoint_regions, cpu.uncheckpointed_layers) == ("layer", 0)


@pytest.mark.parametrize(
    ("model", "card_gib", "keys", "expected"),
    [
        ("7B", 24, [], (8, True, False)),  # bf16 weights 12.7 GiB: 8 × 1,024 tokens checkpointed
        ("7B", 12, ["--quantization_bit", "4"], (8, True, False)),  # 4-bit weights 3.9 GiB
        ("7B", 8, ["--quantization_bit", "4"], (4, True, False)),
        ("7B", 6, ["--quantization_bit", "4"], (2, True, True)),  # only offloaded checkpointing fits
        ("1B", 12, [], (16, True, False)),
        ("7B", 79.6, [], (8, False, False)),  # the 80 GB card's choice is unchanged
        ("7B", 24, ["--cutoff_len", "4096"], (2, True, False)),  # cutoff_len stays; the rows shrink
    ],
)
def test_small_cards_get_a_micro_batch_and_checkpointing_that_fit(model, card_gib, keys, expected):
    cfg = load_run_config(None, ["--model_name_or_path", model, "--dataset", "d", "--output_dir", "o", *keys])
    fit = memory.MemoryFit(int(card_gib * GIB))
    resolved = resolve_defaults(cfg, cuda=True, cuda_bf16=True, fits=fit)
    assert (resolved.per_device_train_batch_size, resolved.gradient_checkpointing, resolved.use_unsloth_gc) == expected
    assert fit(resolved)
    assert resolved.cutoff_len == cfg.cutoff_len


@pytest.mark.parametrize(
    ("keys", "card_gib", "expected"),
    [
        (["--cutoff_len", "1024"], 139.8, (8, False, False)),  # short rows: the eight rows of before
        # not one 1,024-token row without checkpointing (it would fit): 8,192 tokens at least, as packed
        (["--cutoff_len", "1024"], 24, (8, True, False)),
        (["--cutoff_len", "131072"], 139.8, (1, True, False)),  # one checkpointed row before any offload
        (["--cutoff_len", "131072"], 79.6, (1, True, False)),  # estimate 70.2 GiB; 67.8 measured on the H200
        (["--cutoff_len", "131072", "--gradient_checkpointing", "false"], 139.8, None),  # refused
        (["--cutoff_len", "131072", "--per_device_train_batch_size", "8"], 139.8, (8, True, True)),  # given: kept
    ],
)  # fmt: skip
def test_unpacked_long_rows_get_fewer_rows_that_fit(keys, card_gib, expected):
    """Unpacked rows (sized by cutoff_len) halve from eight by the packed plans' rules until a checkpointing
    mode fits the card, as packed micro-batches shrink; a micro-batch the user gives is left as it is."""
    argv = ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o", "--packing", "false", *keys]
    cfg, fit = load_run_config(None, argv), memory.MemoryFit(int(card_gib * GIB))
    if expected is None:
        with pytest.raises(ConfigError, match=r"^gradient_checkpointing: 7B does not fit this GPU even with one "
                                               r"131,072-token row a micro-batch and no checkpointing"):
            resolve_defaults(cfg, cuda=True, cuda_bf16=True, fits=fit)
        return
    resolved = resolve_defaults(cfg, cuda=True, cuda_bf16=True, fits=fit)
    assert (resolved.per_device_train_batch_size, resolved.gradient_checkpointing, resolved.use_unsloth_gc) == expected
    assert resolved.cutoff_len == cfg.cutoff_len


@pytest.mark.parametrize(
    ("keys", "card_gib", "expected"),
    [
        ([], 12, r"^quantization_bit: 7B does not fit this GPU even with one 1,024-token row a micro-batch and "
                 r"offloaded checkpointing \(estimated 13\.9 GiB, 10\.8 GiB usable of 12\.0\); set quantization_bit: 4"),
        (["--quantization_bit", "4"], 4, r"^cutoff_len: 7B does not fit .*; set a smaller cutoff_len"),
        (["--quantization_bit", "4", "--use_unsloth_gc", "false"], 5.2,
         r"^use_unsloth_gc: 7B does not fit this GPU even with one 1,024-token row a micro-batch and gradient "
         r"checkpointing .*; set use_unsloth_gc: true"),
        (["--finetuning_type", "full"], 24, r"^finetuning_type: 7B does not fit .*; use finetuning_type: lora"),
    ],
)  # fmt: skip
def test_a_run_that_cannot_fit_is_refused_naming_the_key_to_change(keys, card_gib, expected):
    cfg = load_run_config(None, ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o", *keys])
    with pytest.raises(ConfigError, match=expected):
        resolve_defaults(cfg, cuda=True, cuda_bf16=True, fits=memory.MemoryFit(int(card_gib * GIB)))


def test_no_fit_with_the_mixers_apart_names_checkpoint_regions():
    cfg = load_run_config(None, ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o",
                                 "--checkpoint_regions", "mixers"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"^checkpoint_regions: 7B does not fit this GPU even with one 1,024-token "
                       r"row a micro-batch and gradient checkpointing .* with the mixers apart; set "
                       r"checkpoint_regions: layer \(or leave it unset\)$"):  # fmt: skip
        resolve_defaults(cfg, cuda=True, cuda_bf16=True, fits=memory.MemoryFit(12 * GIB))


def test_the_plans_try_only_what_the_user_left_open():
    from tnlora.config import memory_plans

    def plans(*keys: str) -> list[tuple[int, bool, bool]]:
        cfg = load_run_config(None, ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o", *keys])
        return [(p.per_device_train_batch_size, p.gradient_checkpointing, p.use_unsloth_gc) for p in memory_plans(cfg)]

    assert plans("--gradient_checkpointing", "true", "--use_unsloth_gc", "false") == [
        (16, True, False), (8, True, False), (4, True, False), (2, True, False), (1, True, False),
    ]  # fmt: skip
    assert plans("--use_unsloth_gc", "true") == [(16, True, True), (8, True, True), (4, True, True), (2, True, True),
                                                 (1, True, True)]  # fmt: skip
    # rows of 16,384 tokens: one row is the smallest micro-batch, whatever the budget
    assert plans("--cutoff_len", "16384") == [(2, False, False), (1, False, False), (1, True, False), (1, True, True)]
    # the mixers checkpointed apart keep their inputs on the GPU: no offloaded plans
    assert plans("--cutoff_len", "16384", "--checkpoint_regions", "mixers") == [
        (2, False, False), (1, False, False), (1, True, False),
    ]  # fmt: skip


def test_a_given_micro_batch_gets_the_least_checkpointing_that_fits():
    cfg = load_run_config(None, ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o",
                                 "--quantization_bit", "4", "--per_device_train_batch_size", "16"])  # fmt: skip

    def resolved(card_gib: float) -> tuple[bool, bool]:
        out = resolve_defaults(cfg, cuda=True, cuda_bf16=True, fits=memory.MemoryFit(int(card_gib * GIB)))
        assert out.per_device_train_batch_size == 16
        return out.gradient_checkpointing, out.use_unsloth_gc

    assert resolved(139.8) == (False, False)
    assert resolved(24) == (True, False)
    assert resolved(12) == (True, True)
    assert resolved(4) == (True, True)  # nothing fits: the most saving, and the out-of-memory advice if it fails
    with pytest.raises(ConfigError, match=r"^quantization_bit: a quantized base needs a CUDA GPU"):
        resolve_defaults(cfg, cuda=False, cuda_bf16=False)
    plain = load_run_config(None, ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o"])
    assert resolve_defaults(plain, cuda=False, cuda_bf16=False).use_unsloth_gc is False
