"""``tnlora bench train`` / ``decode`` on the CPU: real LoRA steps through the training path, generate() through
the decoding path, one parseable table row each."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixture_files import OFFICIAL_CONFIGS, SAMPLE_DATA
from tnlora import bench
from tnlora.bench import common, decode
from tnlora.bench import train as train_bench
from tnlora.ops.fp8 import cpu_row_scaled_mm


def _row(out: str) -> list[str]:
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert len(rows) == 1, out
    return [cell.strip() for cell in rows[-1].strip("|").split("|")]


def test_bench_trains_tiny_and_prints_one_row(capsys, monkeypatch):
    seen = {}
    from tnlora.train import run

    prepare = run.prepare_for_training

    def spy(model, cfg, **kw):
        out = prepare(model, cfg, **kw)
        seen["dtypes"] = {p.dtype for p in out.parameters() if p.requires_grad}
        return out

    monkeypatch.setattr(run, "prepare_for_training", spy)
    code = bench.main(["train", "--model", "tiny", "--attention_impl", "chunked", "--seq_len", "64",
                       "--per_device_train_batch_size", "2", "--steps", "2", "--warmup", "1", "--name", "tiny smoke"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^config: tiny .*attention_impl=chunked", out, re.M)
    assert "resolved: 2 x 64 tokens a micro-batch, 1 a step, packing False" in out
    name, tps, mfu, _peak, step_s, loss = _row(out)
    assert name == "tiny smoke"
    assert float(tps.replace(",", "")) > 0 and float(step_s) > 0
    assert mfu.endswith("%")
    # Random weights over a 384-token vocabulary start near ln(384) = 5.95.
    assert 4.0 < float(loss) < 8.0
    # The bench went through the same preparation as `tnlora train` (the spy ran): fp32 LoRA weights.
    assert seen["dtypes"] == {torch.float32}


def test_bench_one_long_sequence_is_one_row_unless_the_micro_batch_is_given(capsys):
    """--seq_len: one sequence a micro-batch (not the unpacked default of 8 rows, which a long row would not fit)."""
    code = bench.main(["train", "--model", "tiny", "--attention_impl", "chunked", "--seq_len", "48",
                       "--steps", "1", "--warmup", "0"])
    assert code == 0
    assert "resolved: 1 x 48 tokens a micro-batch, 1 a step, packing False" in capsys.readouterr().out


def test_bench_trims_the_last_layer_when_told_to(capsys, monkeypatch):
    """--trim_last_layer (config trim_last_layer, the default): huanhuan-shaped rows, a quarter of them labelled,
    take the trimming last layer; --no-trim_last_layer runs every position, to the same loss."""
    from tnlora.model.modeling import TransnormerDecoderLayer

    trims: list[int] = []
    forward_kept = TransnormerDecoderLayer.forward_kept
    monkeypatch.setattr(TransnormerDecoderLayer, "forward_kept", lambda self, *a: trims.append(1) or forward_kept(self, *a))
    losses = {}
    for trim in ("--trim_last_layer", "--no-trim_last_layer"):
        trims.clear()
        code = bench.main(["train", "--model", "tiny", "--attention_impl", "chunked", "--cutoff_len", "128",
                           "--per_device_train_batch_size", "2", "--steps", "1", "--warmup", "1", trim])  # fmt: skip
        out = capsys.readouterr().out
        config = next(line for line in out.splitlines() if line.startswith("config:"))
        assert code == 0 and (" no-trim_last_layer" in config) == (trim == "--no-trim_last_layer")
        assert bool(trims) == (trim == "--trim_last_layer")
        losses[trim] = float(_row(out)[-1])
    assert losses["--trim_last_layer"] == pytest.approx(losses["--no-trim_last_layer"], rel=1e-4)


@pytest.mark.skipif(not cpu_row_scaled_mm(), reason="this PyTorch's CPU build has no row-scaled torch._scaled_mm")
def test_bench_trains_with_the_fp8_base(capsys):
    """--fp8 true (a run-config key): the bench's trainer makes the fp8 copies as tnlora train's does."""
    code = bench.main(["train", "--model", "tiny", "--attention_impl", "chunked", "--seq_len", "48", "--steps", "1",
                       "--warmup", "0", "--fp8", "true"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "quantization_bit None, fp8" in out
    assert "fp8: the frozen weights of 10 adapted layers in fp8" in out


@pytest.mark.parametrize(("steps", "warmup"), [(1, 1), (3, 0)])
def test_bench_trace_writes_a_timeline(tmp_path, capsys, steps: int, warmup: int):
    """One step in the timeline: the last one, whether or not warm-up steps come first."""
    trace = tmp_path / "step.json"
    code = bench.main(["train", "--model", "tiny", "--attention_impl", "chunked", "--seq_len", "32",
                       "--per_device_train_batch_size", "1", "--steps", str(steps), "--warmup", str(warmup),
                       "--trace", str(trace)])
    assert code == 0 and "timeline:" in capsys.readouterr().out
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)
    # One step recorded: the step before it, which the profiler also ran (its own set-up), is not in the timeline.
    assert sum(e.get("name", "").startswith("Optimizer.step#") for e in events) == 1


def test_trace_gaps_blames_the_launch_that_ended_a_gap(tmp_path):
    """benchmarks/trace_gaps.py on a two-kernel timeline: 90 us idle, ended by a kernel aten::add launched."""
    events = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50, "tid": 1},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 10, "dur": 5, "tid": 1,
         "args": {"correlation": 1}},
        {"ph": "X", "cat": "kernel", "name": "nvjet_tst_128x8", "ts": 20, "dur": 10, "tid": 7,
         "args": {"correlation": 1}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 90, "dur": 5, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 100, "dur": 50, "tid": 1},
        {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernelEx", "ts": 110, "dur": 5, "tid": 1,
         "args": {"correlation": 2}},
        {"ph": "X", "cat": "kernel", "name": "add", "ts": 120, "dur": 10, "tid": 7,
         "args": {"correlation": 2}},
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    script = Path(__file__).parents[1] / "benchmarks" / "trace_gaps.py"
    run = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, check=True)
    out = run.stdout
    assert "busy 0.0 ms (18%)" in out and "1 gaps >= 20 us" in out
    assert re.search(r"90 us at .* before add\s+<- aten::add", out)
    assert "cudaStreamSynchronize" in out
    # the kernel table: one GEMM and one other kernel, 10 us each
    assert re.search(r"0\.01 ms\s+50\.0%\s+GEMM", out) and re.search(r"0\.01 ms\s+50\.0%\s+other", out)
    assert re.search(r"1 x\s+10\.0 us\s+nvjet_tst_128x8\n\s+0\.01 ms from aten::mm\n", out)


def test_trace_gaps_lists_what_the_host_ran_during_a_gap(tmp_path):
    """A 120 us host operator overlapping the 90 us gap is listed under it, a 60 us one is not; a 70 us runtime
    call is, a 5 us one is not."""
    events = [
        {"ph": "X", "cat": "kernel", "name": "first", "ts": 20, "dur": 10, "tid": 7},
        {"ph": "X", "cat": "cpu_op", "name": "slow_host_step", "ts": 35, "dur": 120, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "short_host_step", "ts": 40, "dur": 60, "tid": 1},
        {"ph": "X", "cat": "cuda_driver", "name": "cuLibraryLoadData", "ts": 36, "dur": 70, "tid": 1},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 110, "dur": 5, "tid": 1,
         "args": {"correlation": 2}},
        {"ph": "X", "cat": "kernel", "name": "second", "ts": 120, "dur": 10, "tid": 7, "args": {"correlation": 2}},
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    script = Path(__file__).parents[1] / "benchmarks" / "trace_gaps.py"
    out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, check=True).stdout
    detail = out.split("what the launching thread ran")[1].split("synchronising")[0]
    assert "gap of 90 us" in detail and re.search(r"120 us .* slow_host_step", detail)
    assert re.search(r"70 us .* cuLibraryLoadData", detail)
    assert "short_host_step" not in detail and "cudaLaunchKernel" not in detail


def test_sync_audit_counts_sync_warnings_by_site_and_first_caller_outside_torch():
    audit = train_bench.SyncAudit(0)

    def caller():  # stands in for code calling a torch function that synchronises
        audit._show("called a synchronizing CUDA operation", UserWarning, "/torch/cuda/__init__.py", 1270)

    caller()
    audit._show("an unrelated warning", UserWarning, "x.py", 1)
    assert audit.sites == {"/torch/cuda/__init__.py:1270": 1}
    ((site, n),) = audit.callers.items()
    assert n == 1 and site.endswith(f"test_bench.py:{caller.__code__.co_firstlineno + 1}")
    assert "first callers outside torch" in audit.report()


def test_bench_passes_run_config_keys_through_and_refuses_bad_ones():
    from tnlora.errors import ConfigError

    args, keys = train_bench.parse_args(["--model", "tiny", "--gradient_checkpointing", "true", "--lora_rank=4"])
    assert args.model == "tiny" and keys == {"gradient_checkpointing": "true", "lora_rank": "4"}
    # a run-config key that begins a bench option's name is the key, not that option abbreviated
    other, other_keys = train_bench.parse_args(["--lora_dropout", "0.1", "--lora_dropout_kernel", "torch"])
    assert other.lora_dropout_kernel == "torch" and other_keys == {"lora_dropout": "0.1"}
    cfg = train_bench.run_config(args, keys, [(3, 4)], "out")
    assert cfg.gradient_checkpointing is True and cfg.lora_rank == 4 and cfg.lora_alpha == 8.0
    with pytest.raises(ConfigError, match="unknown config key 'lora_rnak'"):
        train_bench.run_config(args, {"lora_rnak": "4"}, [(3, 4)], "out")
    with pytest.raises(ConfigError, match="--max_steps: set by the bench"):
        train_bench.run_config(args, {"max_steps": "3"}, [(3, 4)], "out")


def test_the_default_lengths_are_package_data_not_a_repository_path(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing of the repository around
    lengths = train_bench.read_lengths(None)
    assert len(lengths) > 100 and all(p > 0 and learned > 0 for p, learned in lengths)


def test_bench_train_defaults_resolve_as_tnlora_train_does(capsys):
    """On the CPU: 16 packed rows of train's default cutoff_len (1,024), one micro-batch a step, not compiled."""
    code = bench.main(["train", "--model", "tiny", "--attention_impl", "chunked", "--packing", "true", "--steps", "1",
                       "--warmup", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert ("resolved: 16 x 1024 tokens a micro-batch, 1 a step, packing True, gradient_checkpointing False, "
            "use_unsloth_gc False, torch_compile False, attention chunked, quantization_bit None") in out
    assert re.search(r"^config: tiny data-shaped", out, re.M)
    # Without warm-up steps the timed step starts with training (it was once timed from the clock's zero).
    _name, tps, _mfu, _peak, step_s, _loss = _row(out)
    assert float(tps.replace(",", "")) > 0 and 0 < float(step_s) < 600


def test_bench_refuses_a_quantized_base_without_a_gpu():
    from tnlora.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^quantization_bit: a quantized base needs a CUDA GPU"):
        bench.main(["train", "--model", "tiny", "--quantization_bit", "4", "--steps", "1", "--warmup", "0"])


@pytest.mark.skipif(not __import__("importlib").util.find_spec("bitsandbytes"), reason="bitsandbytes is not installed")
def test_the_bench_builds_a_quantized_preset_from_the_meta_device():
    """7B on a 12 GiB card: the model is built on the meta device, each linear weight drawn where it is
    quantized (here bitsandbytes' CPU backend stands in for the GPU)."""
    from tnlora.model.quantization import Quantization, is_quantized

    model = common.random_model("tiny", "chunked", "cpu", quantization=Quantization(4))
    assert is_quantized(model) and not any(p.is_meta for p in model.parameters())
    assert model.config.use_cache is False and model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_gpu_memory_cap_is_refused_without_a_gpu_or_beyond_the_card(monkeypatch):
    import pytest

    from tnlora.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--gpu_memory_gib needs a CUDA GPU"):
        bench.main(["train", "--model", "tiny", "--gpu_memory_gib", "80"])

    class Props:
        total_memory = 80 * 2**30

    set_to = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_to.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"not within this card.s 80\.0 GiB"):
        common.cap_gpu_memory(96)
    assert common.cap_gpu_memory(40) == " gpu_memory=40GiB of 80.0" and set_to == [0.5]


def test_decode_bench_prints_the_step_alone_and_its_traffic(capsys):
    code = bench.main(["decode", "--model", "tiny", "--batch", "2", "--new_tokens", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert " step=layers" in out  # the GEMV step (the default where it applies) needs graphs and triton
    rows = [line for line in out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 1, out
    model, graphs, kernel, batch, tps, ms, step_ms, rate, share = (c.strip() for c in rows[0].strip("|").split("|"))
    assert (model, graphs, kernel, batch, share) == ("tiny", "False", "torch", "2", "–")  # no copy figure on CPU
    assert float(tps.replace(",", "")) > 0 and float(ms) > 0
    # The step alone is a difference of two timings (the whole call less a 1-token call): at 8 tokens of the tiny
    # model on a busy CPU it can come out below zero (seen beside other test runs), so only its form is checked.
    assert math.isfinite(float(step_ms)) and math.isfinite(float(rate.replace(",", "")))


def test_decode_bench_host_profile_and_prefill_attention(capsys):
    code = bench.main(["decode", "--model", "tiny", "--batch", "1", "--new_tokens", "4", "--host_profile", "5",
                       "--lightning_impl", "chunked"])
    out = capsys.readouterr().out
    assert code == 0 and " prefill=chunked" in out
    # A 1-token and a 4-token call, each by cumulative and by own time, five functions each.
    assert out.count("host profile, batch 1, a ") == 2 and "a 4-token call" in out
    assert out.count("due to restriction <5>") == 4 and "generate" in out


def test_decode_bench_refuses_gemv_without_graphs_and_the_triton_kernel():
    from tnlora.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--gemv needs CUDA-graph decoding with the triton kernel"):
        bench.main(["decode", "--model", "tiny", "--no-graphs", "--gemv"])


def test_decode_step_bytes_are_the_weights_once_and_the_states_twice():
    from tnlora.infer.decode_graph import DecodeStepRunner

    model = common.random_model("tiny", "auto", "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: counted once below
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    row = model.config.decoder_embed_dim * model.lm_head.weight.element_size()
    states = DecodeStepRunner(model, 3, torch.device("cpu"), capture=False).states
    state_bytes = sum(s.numel() * s.element_size() for s in states)
    expected = weights + 3 * row + 2 * state_bytes
    assert decode.decode_step_bytes(model, 3) == expected
    # written back every 4th step: one read and a quarter of a write a step
    assert decode.decode_step_bytes(model, 3, 0.25) == weights + 3 * row + round(1.25 * state_bytes)


@pytest.mark.parametrize("mode", ["unmerged", "merged"])
def test_decode_adapter_is_random_lora_kept_or_merged(mode):
    from peft import PeftModel

    base = common.random_model("tiny", "auto", "cpu")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    net = decode.with_adapter(base, mode, 4, "tiny")
    if mode == "unmerged":
        assert isinstance(net, PeftModel)
        ranks = {p.shape[0] for n, p in net.named_parameters() if "lora_A" in n}
        assert ranks == {4} and all(p.abs().sum() > 0 for n, p in net.named_parameters() if "lora_B" in n)
        # The bytes a step moves: the base's, plus the adapter's weights.
        lora = sum(p.numel() * p.element_size() for n, p in net.named_parameters() if "lora_" in n)
        assert decode.decode_step_bytes(net, 2) == decode.decode_step_bytes(common.random_model("tiny", "auto", "cpu"), 2) + lora
    else:
        assert not isinstance(net, PeftModel) and not any("lora_" in n for n, _ in net.named_parameters())
        changed = [n for n, p in net.named_parameters() if not torch.equal(p, before[n])]
        assert changed and all(n.endswith(("qkvu_proj.weight", "out_proj.weight", ".l1.weight", ".l2.weight",
                                           ".l3.weight")) for n in changed)  # fmt: skip
    assert decode.with_adapter(base, "none", 4, "tiny") is base


def test_e2e_train_script_runs_a_recipe_on_a_random_official_checkpoint(tmp_path, sp_model_file):
    """benchmarks/e2e_train.py, shrunk to 2 layers: a checkpoint in the official layout (the 7B configuration
    files, the sample SentencePiece model), the recipe's dataset registered, `tnlora train` run and timed, its
    host profiled and its lines stamped with their seconds."""
    model_files = tmp_path / "model_files"
    model_files.mkdir()
    for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(OFFICIAL_CONFIGS / "7B" / name, model_files / name)
    shutil.copy(sp_model_file, model_files / "tokenizer.model")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "e2e_train.py"), "--recipe",
         str(root / "examples" / "huanhuan_7b_lora_fast.yaml"), "--model_files", str(model_files), "--data",
         str(SAMPLE_DATA / "quickstart_alpaca.json"), "--work", str(tmp_path / "work"), "--shrink", "--profile_host", "5",
         "--timeline", "--", "--max_steps", "1", "--val_size", "0", "--sample_prompts", "null"],
        capture_output=True, text=True, timeout=300, cwd=root,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^tnlora train: exit 0, [\d.]+ s wall", out.stdout, re.M), out.stdout
    # --profile_host: the command's host profile, by cumulative and by own time
    assert "Ordered by: cumulative time" in out.stdout and "Ordered by: internal time" in out.stdout
    # --timeline: the command's own lines behind their seconds, in order; the script's own lines unstamped
    stamps = [float(t) for t in re.findall(r"^\[ *([\d.]+) s\] data: \d+ records", out.stderr, re.M)]
    stamps += [float(t) for t in re.findall(r"^\[ *([\d.]+) s\] saved to ", out.stderr, re.M)]
    assert len(stamps) == 2 and stamps[0] <= stamps[1], out.stderr[-2000:]
    assert not re.search(r"^\[ *[\d.]+ s\] tnlora train: exit", out.stdout, re.M)
    assert (tmp_path / "work" / "ckpt" / "model.safetensors").is_file()
    assert (tmp_path / "work" / "ckpt" / "tokenizer.model").is_file()
    assert (tmp_path / "work" / "out" / "adapter_model.safetensors").is_file()


def test_gemv_bench_kernel_equals_fp32_products_under_the_triton_interpreter():
    """benchmarks/gemv.py --check: its Triton GEMV and skinny GEMM (split-K parts included) on small ragged
    shapes against an fp32 product, run by Triton's interpreter on the CPU (skips where triton is not
    installed: the gpu extra)."""
    pytest.importorskip("triton", reason="triton is not installed (it comes with the gpu extra / CUDA torch)")
    script = Path(__file__).parents[1] / "benchmarks" / "gemv.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    # 3 shapes x 3 configs of the GEMV; the same shapes at 2 row counts x 3 configs of the skinny GEMM
    assert sum(line.endswith(": ok") and "skinny" not in line for line in lines) == 9
    assert sum(line.endswith(": ok") and "skinny" in line for line in lines) == 18
    assert "WRONG" not in result.stdout


@pytest.mark.parametrize(("steps", "warmup"), [(1, 0), (1, 2), (4, 2)])
def test_step_profiler_records_the_last_step_after_one_lead_step(monkeypatch, steps: int, warmup: int):
    from types import SimpleNamespace

    from tnlora.bench import train as bench_train

    log: list[tuple[str, int]] = []
    state = SimpleNamespace(global_step=0, max_steps=warmup + steps)

    class FakeProfiler:
        def __init__(self, lead: int) -> None:
            log.append(("start", state.global_step + 1))  # the step beginning now
            self.lead = lead

        def __enter__(self):
            return self

        def step(self) -> None:
            log.append(("lead ends", state.global_step))

        def __exit__(self, *exc) -> None:
            log.append(("recorded", state.global_step))

    monkeypatch.setattr(bench_train, "profile_region", FakeProfiler)
    monkeypatch.setattr(bench_train, "print_profile", lambda prof, trace: None)
    profiler = bench_train.StepProfiler()
    for _ in range(state.max_steps):
        profiler.on_step_begin(None, state, None)
        state.global_step += 1
        profiler.on_step_end(None, state, None)
    last = warmup + steps
    if last == 1:
        assert log == [("start", 1), ("recorded", 1)]
    else:
        assert log == [("start", last - 1), ("lead ends", last - 1), ("recorded", last)]


def _benchmark_module(name: str):
    """A script of benchmarks/ imported as a module."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gemv_step_descent_keeps_the_fastest_launch_per_projection_and_restores_tuned():
    """benchmarks/gemv_step.py's coordinate descent, with a made-up step time (each projection's cost a
    function of its launch, one best launch each): it finds each projection's best, reports the first and
    last time, and leaves ``TUNED`` as it found it."""
    from tnlora.ops import gemv as gemv_ops

    step = _benchmark_module("gemv_step")
    shapes = step.step_shapes(common.random_model("tiny", "auto", "cpu"))
    assert set(shapes) == {"qkvu", "out_proj", "l1 / l2 (GLU)", "l3", "lm_head"}
    assert shapes["l1 / l2 (GLU)"][2] and not shapes["qkvu"][2]
    for batch, candidates in ((1, step.CANDIDATES), (32, step.ROW_CANDIDATES)):
        best = {key: candidates[(3 * i + 1) % len(candidates)] for i, key in enumerate(shapes.values())}

        def measure(batch: int = batch, best: dict = best) -> float:
            launches = [gemv_ops.gemv_config(*key, rows=batch) for key in shapes.values()]
            return sum(0.0 if launch == best[key] else 1.0 + launch.block_n
                       for key, launch in zip(shapes.values(), launches, strict=True))

        tables = dict(gemv_ops.TUNED), dict(gemv_ops.ROWS_TUNED)
        start, end, chosen = step.coordinate_descent(shapes, measure, log=lambda line: None, batch=batch)
        assert chosen == best and end == 0.0 < start, batch
        assert tables == (gemv_ops.TUNED, gemv_ops.ROWS_TUNED)
    # --prefetch_only: each projection's launch of now with each count; here 2 steps pay for qkvu only
    now = {key: gemv_ops.gemv_config(*key, rows=32) for key in shapes.values()}
    want = {key: launch._replace(prefetch=2 if key == shapes["qkvu"] else 0) for key, launch in now.items()}

    def fetched(want: dict = want) -> float:
        return sum(abs(gemv_ops.gemv_config(*key, rows=32).prefetch - launch.prefetch) for key, launch in want.items())

    variants = functools.partial(step.prefetch_variants, prefetch=[1, 2])
    start, end, chosen = step.coordinate_descent(shapes, fetched, log=lambda line: None, batch=32, candidates=variants)
    assert chosen == want and (start, end) == (2, 0)
    assert dict(gemv_ops.ROWS_TUNED) == tables[1]
    # below PREFETCH_MIN_ROWS the table's counts are dropped, but not while a search measures them
    key, launch = next((key, launch) for key, launch in gemv_ops.ROWS_TUNED.items() if launch.prefetch)
    assert gemv_ops.gemv_config(*key, rows=8).prefetch == 0
    with step.prefetch_at_every_batch():
        assert gemv_ops.gemv_config(*key, rows=8) == launch
    assert gemv_ops.gemv_config(*key, rows=8).prefetch == 0


def test_gemv_step_launches_of_now_measures_each_change_and_restores_the_table():
    """gemv_step.py's launches_of_now: every projection's launch of now changed by each labelled change while
    the step is measured (here the count of early launches in the table), the table as it was afterwards."""
    from tnlora.ops import gemv as gemv_ops

    step = _benchmark_module("gemv_step")
    shapes = {"l3": (4096, 11008, False), "out_proj": (4096, 4096, False)}
    saved = dict(gemv_ops.ROWS_TUNED)

    def measure() -> float:
        return sum(gemv_ops.ROWS_TUNED[key].early + 10 * gemv_ops.ROWS_TUNED[key].tma for key in shapes.values())

    times = step.launches_of_now(shapes, measure, 32, {"late": {"early": False}, "tma": {"tma": True}})
    assert times == {"late": 0.0, "tma": 22.0}
    assert saved == gemv_ops.ROWS_TUNED


def test_gemv_step_search_options_choose_launches_and_projections():
    """gemv_step.py's --splits / --split_only / --tma / --prefetch / --projections: the split launches beside the
    row ones or alone, each with a TMA twin and a prefetching one, one row's candidates untouched; the projections
    named by their first word."""
    step = _benchmark_module("gemv_step")
    assert step.search_candidates(1, [2], tma=True) == step.CANDIDATES
    assert step.search_candidates(32) == step.ROW_CANDIDATES
    split = step.search_candidates(32, [2, 4], split_only=True)
    assert split and {c.split for c in split} == {2, 4} and all(c.block_n >= 64 and not c.tma for c in split)
    both = step.search_candidates(32, [2], tma=True)
    plain = step.ROW_CANDIDATES + step.split_candidates([2])
    assert both == plain + [c._replace(tma=True) for c in plain]
    fetched = step.search_candidates(32, [2], tma=True, prefetch=[2, 4])
    asked = [c._replace(prefetch=steps) for steps in (2, 4) for c in plain]
    assert fetched == both + asked  # no TMA launch asks for a prefetch
    shapes = {"qkvu": (1, 2, False), "l1 / l2 (GLU)": (3, 4, True), "l3": (4, 3, False)}
    assert step.searched_shapes(shapes, ["l1", "l3"]) == {"l1 / l2 (GLU)": (3, 4, True), "l3": (4, 3, False)}
    assert step.searched_shapes(shapes, []) == shapes


def test_gemm_bench_forms_compute_the_products_they_name():
    """benchmarks/gemm.py's four forms on CPU float64 operands: x Wᵀ and dy W written fresh, and added in place to
    what the accumulators held (β = 1); each form's FLOPs are 2 · M · N · K."""
    gemm = _benchmark_module("gemm")
    t = gemm.operands(6, 5, 4, device="cpu", dtype=torch.float64)
    y0, dx0 = t["y"].clone(), t["dx"].clone()
    got = {name: (fn(), flops) for name, (fn, flops) in gemm.forms(t).items()}
    x, w, dy = t["x"], t["w"], t["dy"]
    expected = [x @ w.T, y0 + x @ w.T, dy @ w, dx0 + dy @ w]
    assert len(got) == 4
    for (name, (out, flops)), want in zip(got.items(), expected, strict=True):
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12, msg=name)
        assert flops == 2 * 6 * 5 * 4
    torch.testing.assert_close(t["y"], y0 + x @ w.T)  # in place


def test_gemm_bench_stacked_forms_equal_the_two_gemms():
    """benchmarks/gemm.py --stacked on CPU float64 operands: one β = 1 GEMM over [W₁; W₂] adds what the two β = 1
    GEMMs add, forward ([y₁ y₂]) and input gradient (dx): each form's increment over two calls."""
    gemm = _benchmark_module("gemm")
    forms = gemm.stacked_forms(6, 5, 4, device="cpu", dtype=torch.float64)
    assert {name: flops for name, (_, flops) in forms.items()} == dict.fromkeys(forms, 2 * 2 * 6 * 5 * 4)

    def call(fn) -> torch.Tensor:
        out = fn()
        return torch.cat(out, dim=1) if isinstance(out, tuple) else out.clone()

    added = {}
    for name, (fn, _) in forms.items():
        first = call(fn)
        added[name] = call(fn) - first  # what one call adds, whatever the accumulator held
    for kind in ("fwd", "dgrad"):
        torch.testing.assert_close(added[f"{kind}, stacked"], added[f"{kind}, two GEMMs"], rtol=1e-12, atol=1e-12)
        assert added[f"{kind}, stacked"].abs().max() > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    ("script", "measures"),
    [("gemm", "a CUDA GPU's GEMMs"), ("act", "CUDA kernels"), ("lora_grad", "CUDA kernels"),
     ("lora_dropout", "CUDA kernels"), ("recurrence", "CUDA kernels")],
)  # fmt: skip
def test_gpu_benchmarks_refuse_without_a_gpu(script: str, measures: str):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / f"{script}.py")], capture_output=True, text=True,
                         timeout=120, cwd=root)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: benchmarks/{script}.py measures {measures}; this machine has none"]


def test_gemv_step_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    script = Path(__file__).parents[1] / "benchmarks" / "gemv_step.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == "gemv_step.py: needs a CUDA GPU"


def test_act_bench_backward_gives_the_activations_gradient_and_counts_bytes_alike():
    """benchmarks/act.py on CPU float64 with PyTorch's form: the backward it times is the gradient of the four
    outputs against the given incoming gradients (q, k through SiLU's derivative, v zero where padded, u as is),
    repeatable on the kept graph; the bytes counted are 6 and 10 parts of tokens × hidden."""
    from tnlora.ops.qkvu_act import qkvu_act_reference

    act = _benchmark_module("act")
    qkvu, keep, grads = act.inputs(100, 4, device="cpu", dtype=torch.float64)
    assert keep.sum().item() == 97 and not keep[97:].any()
    forward, backward = act.step_fns(qkvu_act_reference, qkvu, keep, grads)
    assert [tuple(o.shape) for o in forward()] == [(100, 4)] * 4
    x = qkvu.detach()
    dsilu = lambda t: torch.sigmoid(t) * (1 + t * (1 - torch.sigmoid(t)))  # noqa: E731
    want = torch.cat([grads[0] * dsilu(x[:, :4]), grads[1] * dsilu(x[:, 4:8]), grads[2] * keep[:, None], grads[3]], 1)
    torch.testing.assert_close(backward(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(backward(), want, rtol=1e-12, atol=1e-12)
    assert act.moved_bytes(100, 4) == (6 * 800, 10 * 800)


def test_lora_grad_bench_operands_and_errors():
    """benchmarks/lora_grad.py's operands have the shapes the products take, and its error is relative to the
    reference's largest value, one figure per product."""
    bench = _benchmark_module("lora_grad")
    dy, b, hs = bench.operands(6, 5, 3, device="cpu", dtype=torch.float64)
    assert (dy.shape, b.shape, hs.shape) == ((6, 5), (5, 3), (6, 3))
    want = (torch.tensor([[2.0, -4.0]]), torch.tensor([[1.0]]))
    assert bench.relative_errors((torch.tensor([[2.0, -3.0]]), torch.tensor([[1.5]])), want) == "2.5e-01 / 5.0e-01"


def test_gemm_bench_appended_forms_equal_the_tree_s_layer():
    """benchmarks/gemm.py --appended on CPU float64 operands: y = [x | s·h] [W | B]ᵀ is the fused layer's output,
    and [dx | g] = dy [W | B] gives g = dy B and, with s·g A added, the layer's input gradient; dA and dB its own."""
    gemm = _benchmark_module("gemm")
    m, n, k, r = 6, 5, 4, 3
    forms, t = gemm.appended_forms(m, n, k, rank=r, device="cpu", dtype=torch.float64)
    for form in ("fwd, appended", "fwd, appended with its cats"):
        torch.testing.assert_close(forms[form](), forms["fwd, the tree"](), rtol=1e-12, atol=1e-12)
    for got, want in zip(forms["dgrad, appended with its cat"](), forms["dgrad, appended"](), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (tree_dx, tree_da, tree_db), (dxp, da, db) = forms["dgrad, the tree"](), forms["dgrad, appended"]()
    assert dxp.shape == (m, k + r)
    g = dxp[:, k:]
    torch.testing.assert_close(g, t["dy"] @ t["b"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dxp[:, :k] + t["scaling"] * g @ t["a"], tree_dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(da, tree_da, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, tree_db, rtol=1e-12, atol=1e-12)
    assert tree_da.abs().max() > 0 and tree_db.abs().max() > 0
