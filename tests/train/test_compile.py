"""torch_compile: regionally compiled decoder layers train exactly like eager ones (float32, CPU inductor).

The loss and every LoRA gradient match eager within 1e-5 relative, with packed rows (seq_ids) and with
gradient checkpointing; the lightning attention is a clean graph break; a new sequence length does not
recompile; the config key validates like any other. A last layer that trims to the labelled positions runs
eagerly and compiles nothing of its own.
"""

from __future__ import annotations

import copy
import inspect
import shutil

import pytest
import torch
from torch._dynamo.utils import counters
from train_helpers import batch, half_labelled, lora_model, loss_and_grads

from tnlora.config import load_run_config
from tnlora.errors import ConfigError
from tnlora.ops.fp8 import cpu_row_scaled_mm
from tnlora.ops.lightning import lightning_attention
from tnlora.train.compile import compile_decoder_layers, uncompile_decoder_layers


def _compile_usable() -> str | None:
    """Why torch.compile cannot run here (None when it can): CPU inductor needs a C++ compiler."""
    if not hasattr(torch.nn.Module, "compile") or not hasattr(torch, "compiler"):
        return "this torch has no nn.Module.compile / torch.compiler"
    if shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        return "no C++ compiler on PATH: CPU inductor cannot build its kernels"
    return None


pytestmark = pytest.mark.skipif(_compile_usable() is not None, reason=str(_compile_usable()))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts with empty dynamo caches and counters (compiled code is shared per code object)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def assert_close(eager: tuple[float, dict], compiled: tuple[float, dict]) -> None:
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    assert set(compiled[1]) == set(eager[1]) and any("lora_A" in n for n in eager[1])
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def eager_and_compiled(checkpointing: bool, dropout: float = 0.0, compiled_op: bool = False, regions: str = "layer"):
    """Two copies of the tiny LoRA model, the second's decoder layers compiled (the fused LoRA layers' custom
    operators in them with ``compiled_op``; ``regions``: what one checkpoint holds)."""
    from tnlora.train.lora_fused import FusedLoraLinear

    eager = lora_model(dropout)
    compiled = copy.deepcopy(eager)
    for model in (eager, compiled):
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False, "checkpoint_regions": regions}
            )
    for module in compiled.modules():
        if isinstance(module, FusedLoraLinear):
            module.compiled_op = compiled_op
    # The first layer (LRPE, an input without grad) stays eager: the tiny preset's second layer compiles.
    assert compile_decoder_layers(compiled, checkpointing=checkpointing) == 1
    return eager, compiled


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-ckpt"])
def test_compiled_layers_train_like_eager(checkpointing):
    eager, compiled = eager_and_compiled(checkpointing)
    layers = compiled.base_model.model.model.layers
    assert layers[0]._compiled_call_impl is None and "project" not in vars(layers[0].token_mixer)
    inputs = batch(48)
    assert_close(loss_and_grads(eager, inputs), loss_and_grads(compiled, inputs))
    # The layer really ran compiled. A compiled layer breaks its graph at the (disabled) attention step only:
    # two graphs -- not four as when the break sat inside the token mixer's own forward. Under checkpointing
    # the steps around it compile on their own.
    graphs, breaks = counters["stats"]["unique_graphs"], list(counters["graph_break"])
    if checkpointing:
        assert graphs > 0 and not breaks, breaks
    else:
        assert 0 < graphs <= 2 and breaks, breaks
        assert all("NormLinearAttention.attend" in reason for reason in breaks), breaks
    # A second step (the compiled code is reused) still matches.
    assert_close(loss_and_grads(eager, batch(48)), loss_and_grads(compiled, batch(48)))


@pytest.mark.parametrize(("dropout", "checkpointing"), [(0.0, False), (0.1, False), (0.1, True)])
def test_compiled_layers_with_the_fused_lora_operators_train_like_eager(dropout, checkpointing):
    """FusedLoraLinear.compiled_op: the compiled layer calls tnlora's custom LoRA operators (forward and
    backward, one per adapted layer) and trains exactly like the eager fused layers, dropout draws included
    (also when checkpointing recomputes the layer)."""
    eager, compiled = eager_and_compiled(checkpointing, dropout, compiled_op=True)
    inputs = batch(48)
    torch.manual_seed(5)
    want = loss_and_grads(eager, inputs)
    torch.manual_seed(5)
    with torch.profiler.profile() as prof:
        got = loss_and_grads(compiled, inputs)
    assert_close(want, got)
    names = {event.name for event in prof.events()}
    assert {"tnlora::lora_linear", "tnlora::lora_linear_backward"} <= names


@pytest.mark.skipif(not cpu_row_scaled_mm(), reason="this PyTorch's CPU build has no row-scaled torch._scaled_mm")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-ckpt"])
def test_compiled_layers_with_an_fp8_base_train_like_eager(checkpointing):
    """fp8: true: the compiled layers pass the fp8 copies to the custom operators and train like the eager fp8
    layers (and not like the bf16 ones: the copies are used). Inductor's fused norms differ from eager ones in
    the last bits, and where such a value sits on an e4m3 rounding boundary it rounds the other way (a 6 % step
    of that one element): the loss agrees to 1e-5, the gradients to 1e-2 of their norm (measured ~5e-3)."""
    from tnlora.train.lora_fused import set_base_fp8

    eager, compiled = eager_and_compiled(checkpointing, 0.1, compiled_op=True)
    plain = loss_and_grads(eager, batch(48))
    assert set_base_fp8(eager, True) == set_base_fp8(compiled, True) == 10
    torch.manual_seed(5)
    want = loss_and_grads(eager, batch(48))
    torch.manual_seed(5)
    got = loss_and_grads(compiled, batch(48))
    assert got[0] == pytest.approx(want[0], rel=1e-5) and want[0] != plain[0]
    assert set(got[1]) == set(want[1]) and len(want[1]) == 20
    for name, grad in want[1].items():
        assert float((got[1][name] - grad).norm() / grad.norm()) < 1e-2, name


@pytest.mark.parametrize("regions", ["layer", "mixers"])
def test_compiled_recompute_leaves_out_the_output_projection(monkeypatch, regions):
    """Under checkpointing the compiled channel mixer's recompute calls l3's custom operator with
    ``output_needed`` False (a graph of its own), and the step still equals the un-checkpointed eager one; with
    the mixers checkpointed apart the token mixer's recompute does the same for out_proj."""
    from tnlora.ops import lora as lora_ops

    reference = lora_model(0.1)
    _, compiled = eager_and_compiled(True, 0.1, compiled_op=True, regions=regions)
    calls: list[tuple[int, bool]] = []
    forward_gemms = lora_ops._forward_gemms

    def recording(x, *args):
        calls.append((x.shape[1], inspect.signature(forward_gemms).bind(x, *args).arguments["output_needed"]))
        return forward_gemms(x, *args)

    monkeypatch.setattr(lora_ops, "_forward_gemms", recording)
    inputs = batch(48)
    torch.manual_seed(5)
    want = loss_and_grads(reference, inputs)
    torch.manual_seed(5)
    calls.clear()
    assert_close(want, loss_and_grads(compiled, inputs))
    layers = compiled.base_model.model.model.layers
    glu, dim = layers[1].channel_mixer.l3.in_features, layers[1].token_mixer.out_proj.in_features
    # five adapted projections a layer, in the forward and again in the recompute; l3's recomputed output (and
    # out_proj's with the mixers apart, recomputed after the channel mixer's) is not needed (the eager first
    # layer and the compiled second)
    assert len(calls) == 2 * 5 * len(layers)
    unread = [glu] if regions == "layer" else [glu, dim]
    assert [width for width, needed in calls if not needed] == unread * len(layers)
    assert all(layer.channel_mixer.l3.output_needed for layer in layers)
    assert all(layer.token_mixer.out_proj.output_needed for layer in layers)
    # the forward's and the recompute's graphs are compiled once: a second step compiles nothing
    graphs = counters["stats"]["unique_graphs"]
    torch.manual_seed(6)
    loss_and_grads(compiled, batch(56))
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize(("checkpointing", "regions"), [(False, "layer"), (True, "layer"), (True, "mixers")])
def test_a_trimmed_last_layer_runs_eagerly_and_compiles_nothing(checkpointing, regions):
    """trim_last_layer with compiled layers: the last layer, trimming to the labelled positions, runs eagerly
    (forward and recompute) instead of compiling graphs for its shapes; after an untrimmed step a trimmed one
    compiles nothing, and both train like the eager untrimmed model."""
    eager = lora_model(decoder_layers=3, linear_use_lrpe_list=[1, 0, 0])
    compiled = copy.deepcopy(eager)
    for model in (eager, compiled):
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False, "checkpoint_regions": regions}
            )
    assert compile_decoder_layers(compiled, checkpointing=checkpointing) == 2
    inputs = half_labelled(batch(48))
    eager.config.trim_last_layer = compiled.config.trim_last_layer = False
    want = loss_and_grads(eager, inputs)
    assert_close(want, loss_and_grads(compiled, inputs))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    compiled.config.trim_last_layer = True
    rows: list[int] = []
    l3 = compiled.base_model.model.model.layers[-1].channel_mixer.l3
    l3.register_forward_hook(lambda m, args, out: rows.append(args[0].reshape(-1, m.in_features).shape[0]))
    assert_close(want, loss_and_grads(compiled, inputs))
    assert rows and set(rows) == {int((inputs["labels"][:, 1:] != -100).sum())}
    assert counters["stats"]["unique_graphs"] == graphs


def test_new_sequence_lengths_do_not_recompile():
    model = lora_model()
    compile_decoder_layers(model)
    loss_and_grads(model, batch(40))
    first = counters["stats"]["unique_graphs"]
    assert first > 0
    # Longer than a lightning chunk (64) too: the attention output's layout must not change the guards.
    for length in (56, 72):
        loss_and_grads(model, batch(length))
    # dynamic=True: batch and length are symbolic from the first compile (at most one recompile allowed).
    assert counters["stats"]["unique_graphs"] - first <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [40, 64, 72])
def test_lightning_attention_output_is_contiguous(length, dtype):
    """One layout for every length: the compiled code after the attention guards on it."""
    q, k, v = (torch.randn(2, length, 2, 8).to(dtype) for _ in range(3))
    o, _ = lightning_attention(q, k, v, torch.tensor([-0.1, -0.5]), impl="chunked", chunk_size=64)
    assert o.is_contiguous() and o.dtype == dtype


def test_uncompile_restores_eager_calls():
    model = lora_model()
    compile_decoder_layers(model)
    uncompile_decoder_layers(model)
    loss_and_grads(model, batch(24))
    assert counters["stats"]["unique_graphs"] == 0


def test_torch_compile_config_key():
    base = ["--model_name_or_path", "tiny", "--dataset", "d.json", "--output_dir", "out"]
    assert load_run_config(None, base).torch_compile is None  # resolved later: on with CUDA, off on CPU
    assert load_run_config(None, [*base, "--torch_compile"]).torch_compile is True
    assert load_run_config(None, [*base, "--torch_compile", "false"]).torch_compile is False
    with pytest.raises(ConfigError) as info:
        load_run_config(None, [*base, "--torch_compile", "maybe"])
    message = str(info.value)
    assert "\n" not in message and message.startswith("torch_compile: expected true or false")


def test_evaluation_runs_compiled_layers_eagerly(tmp_path):
    """Trainer.evaluate compiles nothing (no no-grad variants of the layers' graphs); training still does."""
    from tnlora.bench.train import synthetic_examples
    from tnlora.config import RunConfig, resolve_defaults
    from tnlora.model import load_model
    from tnlora.model.tokenizer import ByteTokenizer
    from tnlora.train.run import bundle_from_examples, prepare_for_training
    from tnlora.train.trainer import build_trainer

    cfg = RunConfig(
        model_name_or_path="tiny", dataset="d", output_dir=str(tmp_path), overwrite_output_dir=True,
        lora_rank=4, cutoff_len=64, packing=False, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        max_steps=1, torch_compile=True, bf16=False, logging_steps=10**6, save_steps=10**6, report_to="none",
    )  # fmt: skip
    cfg = resolve_defaults(cfg, cuda=False, cuda_bf16=False)
    base = load_model("tiny")
    # The tiny model's one compiled layer is its last (the first stays eager), which the trimming runs eagerly.
    base.config.trim_last_layer = False
    model = prepare_for_training(base, cfg)  # LoRA, and the layers compiled
    examples = synthetic_examples([(5, 20)] * 6, model.config.vocab_size)
    data = bundle_from_examples(cfg, examples, examples[:4], pad_token_id=0)
    trainer = build_trainer(cfg, model, ByteTokenizer(), data)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0
    assert counters["stats"]["unique_graphs"] == 0
    trainer.train()
    assert counters["stats"]["unique_graphs"] > 0
