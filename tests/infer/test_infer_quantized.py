"""chat / generate / eval / merge of an adapter trained on a quantized base (its tnlora_run.yaml records
quantization_bit), on the CPU: which quantization the base gets, and the refusals before anything loads. Loading
and merging on a GPU: tests/train/test_qlora_gpu.py."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from tnlora.config import RUN_CONFIG_NAME, load_run_config
from tnlora.errors import TnloraError
from tnlora.infer.loading import inference_quantization, load_for_inference
from tnlora.infer.merge import merge_adapter


@pytest.fixture
def qlora_dir(adapter_dir, tmp_path) -> Path:
    """The shared adapter's run dir, its run config saying it trained on a 4-bit base (as a QLoRA run's does)."""
    out = tmp_path / "qlora"
    shutil.copytree(adapter_dir, out)
    saved = yaml.safe_load((out / RUN_CONFIG_NAME).read_text())
    saved.update(quantization_bit=4, quantization_type="fp4", double_quantization=False, bf16=True)
    (out / RUN_CONFIG_NAME).write_text(yaml.safe_dump(saved))
    return out


def _run(*keys: str):
    return load_run_config(None, ["--model_name_or_path", "tiny", "--dataset", "d", "--output_dir", "o", *keys])


def test_the_base_is_quantized_as_the_run_was_unless_told_otherwise():
    qlora = _run("--quantization_bit", "4", "--quantization_type", "fp4", "--double_quantization", "false")
    q = inference_quantization(qlora)
    assert (q.bits, q.quant_type, q.double_quant) == (4, "fp4", False)
    assert inference_quantization(qlora, 0) is None  # --quantization_bit none
    q8 = inference_quantization(qlora, 8)
    assert q8.bits == 8
    q4 = inference_quantization(_run(), 4)  # a bf16-trained adapter on a 4-bit base: LLaMA-Factory's defaults
    assert (q4.bits, q4.quant_type, q4.double_quant) == (4, "nf4", True)
    assert inference_quantization(qlora, None, "nf4", True).quant_type == "nf4"
    assert inference_quantization(None) is None and inference_quantization(_run()) is None


def test_a_qlora_adapter_on_a_cpu_only_machine_is_refused_naming_the_way_out(qlora_dir, cpu_only):
    with pytest.raises(TnloraError) as info:
        load_for_inference(None, qlora_dir)
    assert str(info.value) == (
        "--quantization_bit: a quantized base needs a CUDA GPU (bitsandbytes), and this machine has none; pass "
        f"--quantization_bit none to load the base in bf16 / fp32 here (as the adapter's run trained: "
        f"{qlora_dir / RUN_CONFIG_NAME})"
    )


def test_with_quantization_bit_none_the_adapter_loads_on_an_unquantized_base_and_merges(qlora_dir, adapter_dir):
    loaded = load_for_inference(None, qlora_dir, quantization_bit=0, merge_adapter=None, device="cpu")
    assert loaded.quantization is None and not hasattr(loaded.model, "peft_config")  # merged: merge_adapter None
    plain = load_for_inference(None, adapter_dir, merge_adapter=True, device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, plain.model(ids).logits, rtol=0, atol=0)


def test_an_adapter_is_never_merged_into_quantized_weights(qlora_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setattr("tnlora.model.loading.load_base_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(TnloraError) as info:
        load_for_inference(None, qlora_dir, merge_adapter=True)
    assert str(info.value) == (
        "--merge_adapter: the base is quantized (4-bit fp4), and an adapter folded into its weights would be "
        "rounded away; leave the adapter unmerged (--merge_adapter false), or export a merged bf16 model with "
        "tnlora merge"
    )


def test_a_quantized_base_runs_on_the_gpu_only(qlora_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setattr("tnlora.model.loading.load_base_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(TnloraError, match=r"^--device: a quantized base \(4-bit fp4\) runs on a CUDA GPU, not cpu$"):
        load_for_inference(None, qlora_dir, device="cpu")


def test_merging_a_qlora_adapter_needs_a_gpu_and_writes_nothing_without_one(qlora_dir, tmp_path, cpu_only):
    out = tmp_path / "merged"
    with pytest.raises(TnloraError) as info:
        merge_adapter(None, qlora_dir, out)
    assert str(info.value) == (
        "--adapter: a quantized base needs a CUDA GPU (bitsandbytes), and this machine has none; this adapter was "
        f"trained on a 4-bit fp4 base ({qlora_dir / RUN_CONFIG_NAME}), and tnlora merge quantizes the base as "
        "training did to merge onto its dequantized weights"
    )
    assert not out.exists()


def test_merge_loads_the_base_quantized_then_dequantized(qlora_dir, tmp_path, monkeypatch):
    """On a GPU machine merge asks for the run's quantization and ``dequantize``: the adapter is folded into the
    dequantized weights, in fp32."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    seen = {}

    def load(model, adapter, **kwargs):
        seen.update(kwargs)
        raise TnloraError("stop here")

    monkeypatch.setattr("tnlora.infer.merge.load_for_inference", load)
    with pytest.raises(TnloraError, match="stop here"):
        merge_adapter(None, qlora_dir, tmp_path / "merged")
    assert seen["dequantize"] is True and seen["dtype"] == "float32"


def test_run_yamls_pass_quantization_bit_to_chat_and_refuse_it_for_merge(tmp_path, qlora_dir):
    from tnlora.cli import build_parser, expand_verb_argv

    chat = tmp_path / "chat.yaml"
    chat.write_text(f"adapter_name_or_path: {qlora_dir}\nquantization_bit: 8\nquantization_method: bnb\n")
    args = build_parser().parse_args(expand_verb_argv(build_parser(), ["chat", str(chat)]))
    assert args.quantization_bit == 8 and args.merge_adapter is None
    none = build_parser().parse_args(["chat", "--adapter", "a", "--quantization_bit", "none"])
    assert none.quantization_bit == 0
    merge = tmp_path / "merge.yaml"
    merge.write_text(f"adapter_name_or_path: {qlora_dir}\nexport_dir: {tmp_path / 'm'}\nquantization_bit: 4\n")
    with pytest.raises(TnloraError, match=r"^quantization_bit: a quantized export \(a QLoRA adapter is merged onto "):
        expand_verb_argv(build_parser(), ["merge", str(merge)])
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(f"adapter_name_or_path: {qlora_dir}\nquantization_method: gptq\n")
    with pytest.raises(TnloraError, match=r"^quantization_method: this quantization method .* tnlora chat; got 'gptq'"):
        expand_verb_argv(build_parser(), ["chat", str(wrong)])


def test_the_cli_refuses_a_qlora_chat_on_the_cpu_in_one_line(qlora_dir, capsys, cpu_only):
    from tnlora.cli import main

    assert main(["chat", "--adapter", str(qlora_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --quantization_bit: a quantized base needs a CUDA GPU")

