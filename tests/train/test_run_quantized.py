"""tnlora train with quantization_bit, on the CPU: the refusals that come before any model loads (no GPU, no
bitsandbytes, a resumed run whose quantization changed) and the recipe's choices for a quantized base. The
training itself runs on a GPU (tests/train/test_qlora_gpu.py)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import yaml

from tnlora.config import RUN_CONFIG_NAME, load_run_config, resolve_defaults
from tnlora.errors import ConfigError
from tnlora.train import run
from tnlora.train.run import train


@pytest.fixture
def a_gpu_with_bitsandbytes(monkeypatch):
    """As far as the checks before loading go: a CUDA GPU and an importable bitsandbytes."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))


def test_quantized_training_is_refused_on_a_cpu_only_machine_before_anything_is_written(make_config, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as info:
        train(make_config(out, "--quantization_bit", "4"))
    assert str(info.value) == (
        "quantization_bit: a quantized base needs a CUDA GPU (bitsandbytes), and this machine has none; leave "
        "quantization_bit unset to load the base in bf16 / fp32"
    )
    assert not out.exists()


def test_without_bitsandbytes_the_refusal_names_the_extra_to_install(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the first check: "a GPU"
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes → ImportError
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as info:
        train(make_config(out, "--quantization_bit", "8"))
    assert str(info.value) == (
        "quantization_bit: a quantized base needs bitsandbytes, which is not installed: pip install 'tnlora[qlora]'"
    )
    assert not out.exists()


def test_full_finetuning_and_other_widths_are_refused_before_training_starts(make_config, tmp_path):
    with pytest.raises(ConfigError, match=r"^quantization_bit: a quantized base trains LoRA adapters only"):
        make_config(tmp_path / "o", "--quantization_bit", "4", "--finetuning_type", "full")
    with pytest.raises(ConfigError, match=r"^quantization_bit: 4 \(QLoRA: NF4/FP4\) or 8 \(LLM.int8\(\)\)"):
        make_config(tmp_path / "o", "--quantization_bit", "2")


def test_a_quantized_layer_cannot_train_in_full_beside_the_adapter(make_config, tmp_path, a_gpu_with_bitsandbytes):
    cfg = make_config(tmp_path / "o", "--quantization_bit", "4", "--additional_target", "l1")
    with pytest.raises(ConfigError, match=r"^additional_target: 'l1' is \(or holds\) a linear layer that "):
        run.preflight(cfg)
    run.preflight(make_config(tmp_path / "o", "--quantization_bit", "4", "--additional_target", "embed_tokens"))


def test_a_quantized_base_is_loaded_onto_the_gpu_in_bf16_and_left_uncompiled(make_config, tmp_path, monkeypatch):
    """build_model asks load_base_model for the run's quantization on the GPU; the defaults keep its layers
    eager."""
    cfg = make_config(tmp_path / "o", "--quantization_bit", "4", "--quantization_type", "fp4",
                      "--double_quantization", "false")  # fmt: skip
    resolved = resolve_defaults(cfg, cuda=True, cuda_bf16=True)
    assert resolved.bf16 and resolved.torch_compile is False
    assert run.model_dtype(resolved) == torch.bfloat16
    seen = {}

    def load(name, dtype=None, device=None, attention_impl="auto", quantization=None):
        seen.update(dtype=dtype, device=device, quantization=quantization)
        raise RuntimeError("stop here")

    monkeypatch.setattr(run, "load_base_model", load)
    with pytest.raises(RuntimeError, match="stop here"):
        run.build_model(resolved, tokenizer=None)
    q = seen["quantization"]
    assert (q.bits, q.quant_type, q.double_quant, q.compute_dtype) == (4, "fp4", False, torch.bfloat16)
    assert (seen["dtype"], seen["device"]) == (torch.bfloat16, "cuda")
    assert run.quantization_of(make_config(tmp_path / "o")) is None


def test_a_resumed_run_keeps_the_quantization_it_trained_on(make_config, tmp_path, monkeypatch):
    """A QLoRA run's checkpoint (here: a CPU run whose saved config says quantization_bit: 4) resumes only with
    the same quantization keys, and an unquantized run's only without."""
    out = tmp_path / "out"
    train(make_config(out, "--max_steps", "2", "--save_steps", "2"))
    saved = yaml.safe_load((out / RUN_CONFIG_NAME).read_text())
    assert (saved["quantization_bit"], saved["quantization_type"], saved["double_quantization"]) == (None, "nf4", True)
    resume = ("--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "true")
    run.preflight(make_config(out, *resume))  # the same (no) quantization: fine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    with pytest.raises(ConfigError) as info:
        run.preflight(make_config(out, *resume, "--quantization_bit", "4"))
    assert str(info.value) == (
        f"resume_from_checkpoint: {out / 'checkpoint-2'} was trained with other settings, and these change what "
        f"it means: quantization_bit null → 4 (resume with the values in {out / RUN_CONFIG_NAME}, or start a new "
        "run in another output_dir)"
    )
    saved.update(quantization_bit=4, bf16=True)  # as a QLoRA run saves it
    (out / RUN_CONFIG_NAME).write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=r"these change what it means: quantization_bit 4 → null \("):
        run.preflight(make_config(out, *resume))
    with pytest.raises(ConfigError, match=r"these change what it means: quantization_type nf4 → fp4 \("):
        run.preflight(make_config(out, *resume, "--quantization_bit", "4", "--quantization_type", "fp4"))
    run.preflight(make_config(out, *resume, "--quantization_bit", "4"))


def test_offload_chosen_by_the_defaults_is_said_in_one_line(make_config, tmp_path, monkeypatch, capsys):
    from tnlora.train import memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(memory, "gpu_fits", lambda: lambda c: bool(c.use_unsloth_gc))
    cfg = load_run_config(None, ["--model_name_or_path", "7B", "--dataset", "d", "--output_dir", "o"])
    resolved = run.resolve_for_this_machine(cfg)
    assert (resolved.per_device_train_batch_size, resolved.gradient_checkpointing, resolved.use_unsloth_gc) == (
        16, True, True,
    )  # fmt: skip
    err = capsys.readouterr().err
    assert "use_unsloth_gc: on (micro-batches of 16 × 1024 tokens would not fit this GPU even with gradient " in err
    assert "gradient_checkpointing: on" not in err
