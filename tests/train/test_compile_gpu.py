"""torch_compile on CUDA in bf16 with the fla kernel: compiled decoder layers (whole layers, or their sub-blocks
under gradient checkpointing, with and without CPU offload, each checkpoint a whole layer or one mixer) give the
eager loss and LoRA gradients within bf16 tolerance. Skipped without CUDA and fla-core; run on a GPU with
``pytest -s -m gpu tests/train``.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("fla.ops.simple_gla", reason="needs fla-core (pip install 'tnlora[gpu]')")

from train_helpers import GEOMETRY_1B, assert_bf16_step_matches, batch, lora_model, loss_and_grads

from tnlora.train.compile import compile_decoder_layers

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("checkpointing", [None, "plain", "offload", "mixers"])
def test_compiled_layers_match_eager_in_bf16_with_fla(checkpointing: str | None) -> None:
    models = [lora_model(device="cuda", dtype=torch.bfloat16, impl="fla", **GEOMETRY_1B) for _ in range(2)]
    if checkpointing:
        kwargs = {"use_reentrant": False, "offload_to_cpu": checkpointing == "offload"}
        if checkpointing == "mixers":  # each mixer a checkpoint of its own
            kwargs["checkpoint_regions"] = "mixers"
        for model in models:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    compile_decoder_layers(models[1], checkpointing=checkpointing is not None)
    inputs = {name: t.cuda() for name, t in batch(1000).items()}  # packed rows: fla's varlen path
    results = []
    for model in models:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results.append(loss_and_grads(model, inputs))
    # bf16 autocast, and inductor fuses the casts differently from eager. Reference: the eager layers.
    assert_bf16_step_matches(results[1], results[0], f"compile, checkpointing={checkpointing}")


def test_compiled_layers_with_the_fused_lora_operators_match_eager_in_bf16() -> None:
    """FusedLoraLinear.compiled_op on CUDA: the compiled layers call tnlora's LoRA operators (cuBLAS GEMMs with
    the adapter accumulated in place) and give the eager loss and LoRA gradients within bf16 tolerance."""
    from tnlora.train.lora_fused import FusedLoraLinear

    models = [lora_model(device="cuda", dtype=torch.bfloat16, impl="fla", **GEOMETRY_1B) for _ in range(2)]
    for module in models[1].modules():
        if isinstance(module, FusedLoraLinear):
            module.compiled_op = True
    compile_decoder_layers(models[1])
    inputs = {name: t.cuda() for name, t in batch(1000).items()}
    results = []
    for model in models:
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.profiler.profile() as prof:
            results.append(loss_and_grads(model, inputs))
    assert "tnlora::lora_linear" in {event.name for event in prof.events()}
    assert_bf16_step_matches(results[1], results[0], "compile with the fused LoRA operators")
