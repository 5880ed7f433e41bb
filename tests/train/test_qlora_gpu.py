"""QLoRA on CUDA (bitsandbytes): a 4-bit base computes what its dequantized weights compute and stays within
NF4's error of the bf16 base; LoRA gradients through 4-bit layers are finite and those of the dequantized base;
a short QLoRA run lowers the loss, resumes, chats with the adapter unmerged (CUDA graphs captured), and
`tnlora merge` onto the dequantized base equals the unmerged adapter on the 4-bit base. Skipped without CUDA or
bitsandbytes; each test takes seconds.

Tolerances. NF4 puts each weight on one of 16 levels spaced for a normal distribution, scaled per block of 64
by the block's largest magnitude: for Gaussian weights (the random presets) the relative error of a weight
matrix is ~9 % (measured 9.0-9.2 % on these geometries; FP4 12 %). A layer's output error is about as large,
and the token mixer multiplies q, k, v and the gate u, then out_proj: five quantized factors, √5 · 9 % ≈ 20 %
at most. The logits (the embedding and head are not quantized) stay below that: measured 4.4 % on the tiny
geometry and 13.3 % on the 1B's (two layers, width 2,048), hence ``NF4_LOGIT_ERROR = 0.2``. LLM.int8()'s 8-bit
rows err ~0.6-0.8 % a weight, hence 4 % for the logits. Against the dequantized weights in ordinary bf16 layers
(the exact reference: what the 4-bit layers compute with) only the kernels' bf16 rounding differs: 2 %.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install 'tnlora[qlora]')")

from train_helpers import (
    GEOMETRY_1B,
    StopAtStep,
    assert_bf16_step_matches,
    batch,
    loss_and_grads,
    randomize_lora,
)

from tnlora.config import RunConfig
from tnlora.model import TransnormerForCausalLM, config_from_preset, load_model
from tnlora.model.loading import set_attention_impl
from tnlora.model.quantization import Quantization, dequantize_linears, is_quantized, quantize_linears
from tnlora.train.lora import apply_finetuning, set_adapter_input_casts
from tnlora.train.run import train, upcast_trainable

pytestmark = pytest.mark.gpu

GEOMETRIES = {"tiny": {}, "1B": GEOMETRY_1B}
NF4_LOGIT_ERROR = 0.2
INT8_LOGIT_ERROR = 0.04
BF16_ROUNDING = 2e-2


def _base(geometry: str, kind: str, quantization: Quantization | None = None) -> torch.nn.Module:
    """The seeded random model of ``geometry`` on the GPU: "bf16", "quantized", or "dequantized" (quantized, then
    its layers back as nn.Linear with the dequantized weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TransnormerForCausalLM(config_from_preset("tiny", **GEOMETRIES[geometry])).to(torch.bfloat16)
    if kind == "bf16":
        model.cuda()
    else:
        quantize_linears(model, quantization or Quantization(4), "cuda")
        if kind == "dequantized":
            dequantize_linears(model, "cuda", torch.bfloat16)
    set_attention_impl(model, "chunked")
    model.config.use_cache = False
    return model


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 300, (2, 96), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("geometry", ["tiny", "1B"])
def test_4bit_logits_are_those_of_the_dequantized_weights_within_nf4_error_of_bf16(geometry):
    bf16 = _logits(_base(geometry, "bf16"))
    quantized = _base(geometry, "quantized")
    assert is_quantized(quantized)
    got = _logits(quantized)
    reference = _logits(_base(geometry, "dequantized"))
    error, rounding = _relative(got, bf16), _relative(got, reference)
    print(f"{geometry}: 4-bit nf4 logits vs bf16 {error:.4f}, vs the dequantized weights {rounding:.2e}")
    assert rounding < BF16_ROUNDING
    assert 0.01 < error < NF4_LOGIT_ERROR  # quantized (not the bf16 weights), within NF4's error
    int8 = _relative(_logits(_base(geometry, "quantized", Quantization(8))), bf16)
    print(f"{geometry}: 8-bit logits vs bf16 {int8:.4f}")
    assert int8 < INT8_LOGIT_ERROR


def test_the_tiny_preset_loads_quantized_on_the_gpu_with_the_same_weights_as_bf16():
    quantized = load_model("tiny", quantization=Quantization(4))
    assert quantized.model.embed_tokens.weight.is_cuda and is_quantized(quantized)
    bf16 = load_model("tiny", dtype=torch.bfloat16, device="cuda")
    set_attention_impl(quantized, "chunked")
    set_attention_impl(bf16, "chunked")
    assert _relative(_logits(quantized), _logits(bf16)) < NF4_LOGIT_ERROR


def _lora(geometry: str, kind: str) -> torch.nn.Module:
    """LoRA (rank 4, every linear layer) on ``_base(geometry, kind)``, trainable weights fp32, peft's input casts
    off (as bf16 training runs them), random adapters (a zero B would make every lora_A gradient zero)."""
    model = _base(geometry, kind)
    cfg = RunConfig(model_name_or_path="tiny", dataset="d", output_dir="o", lora_rank=4, lora_alpha=8.0, bf16=True)
    model = apply_finetuning(model, cfg)
    upcast_trainable(model)
    set_adapter_input_casts(model, False)
    return randomize_lora(model).train()


@pytest.mark.parametrize("geometry", ["tiny", "1B"])
def test_lora_gradients_through_4bit_layers_are_those_of_the_dequantized_base_and_close_to_bf16(geometry):
    inputs = {name: t.cuda() for name, t in batch(200).items()}
    steps = {}
    for kind in ("quantized", "dequantized", "bf16"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            steps[kind] = loss_and_grads(_lora(geometry, kind), inputs)
    loss, grads = steps["quantized"]
    assert torch.isfinite(torch.tensor(loss)) and len(grads) == 2 * 5 * 2  # A and B of 5 layers × 2 decoder layers
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert_bf16_step_matches(steps["quantized"], steps["dequantized"], f"{geometry} 4-bit vs dequantized")
    bf16 = steps["bf16"][1]
    cosines = {n: torch.nn.functional.cosine_similarity(g.float().flatten(), bf16[n].float().flatten(), dim=0).item()
               for n, g in grads.items()}  # fmt: skip
    flat = torch.cat([grads[n].float().flatten() for n in sorted(grads)])
    want = torch.cat([bf16[n].float().flatten() for n in sorted(bf16)])
    overall = torch.nn.functional.cosine_similarity(flat, want, dim=0).item()
    print(f"{geometry}: LoRA gradients vs the bf16 base: cosine {overall:.4f} (worst tensor {min(cosines.values()):.4f})")
    assert overall > 0.9 and min(cosines.values()) > 0.8


def test_a_short_qlora_run_learns_resumes_chats_unmerged_and_merges_onto_the_dequantized_base(make_config, tmp_path):
    from tnlora.infer.decode_graph import installed_graphs
    from tnlora.infer.generate import GenerationOptions, generate_replies
    from tnlora.infer.loading import load_for_inference
    from tnlora.infer.merge import merge_adapter

    out = tmp_path / "qlora"
    # chunked attention: bitsandbytes touches the linear layers only, and fla would autotune for the tiny shapes
    keys = ("--quantization_bit", "4", "--max_steps", "30", "--save_steps", "15", "--attention_impl", "chunked")
    first = train(make_config(out, *keys), callbacks=[StopAtStep(15)])
    assert first.global_step == 15 and is_quantized(first.model)
    result = train(make_config(out, *keys, "--resume_from_checkpoint", "true"))
    assert result.global_step == 30 and result.config.quantization_bit == 4
    losses = [h["loss"] for h in first.log_history + result.log_history if "loss" in h]
    print(f"QLoRA tiny: loss {losses[0]:.3f} → {losses[-1]:.3f}")
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) / 3 < losses[0] - 0.3

    # chat / generate: the run's quantization, the adapter unmerged, decode steps as captured CUDA graphs
    loaded = load_for_inference(None, out, merge_adapter=None)
    assert loaded.quantization is not None and is_quantized(loaded.model) and hasattr(loaded.model, "peft_config")
    conversations = [[{"role": "user", "content": "Hello there"}], [{"role": "user", "content": "1 + 1 ="}]]
    options = GenerationOptions(max_new_tokens=12)
    graphed = generate_replies(loaded.model, loaded.tokenizer, loaded.template, conversations, options)
    graphs = installed_graphs(loaded.model)
    assert not graphs.failed and any(r.graph is not None for r in graphs.runners.values())
    eager = load_for_inference(None, out, graph_decoding=False)
    assert generate_replies(eager.model, eager.tokenizer, eager.template, conversations, options) == graphed

    # merged onto the dequantized base (fp32 merge) == the unmerged adapter on the 4-bit base
    merged_dir = merge_adapter(None, out, tmp_path / "merged", dtype="float32")
    merged = load_model(str(merged_dir), dtype=torch.float32, device="cuda")
    assert not is_quantized(merged)
    onto_original = load_for_inference(None, out, quantization_bit=0, merge_adapter=True, dtype="float32").model
    ids = torch.randint(3, 300, (2, 64), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        unmerged = eager.model.eval()(ids).logits.float()
        ours = _relative(merged.eval()(ids).logits, unmerged)
        control = _relative(onto_original.eval()(ids).logits, unmerged)
    print(f"merged onto the dequantized base vs unmerged on 4-bit: {ours:.2e} (onto the original bf16: {control:.2e})")
    assert ours < BF16_ROUNDING and ours < control / 2
