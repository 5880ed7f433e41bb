"""DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 through the Trainer (``train.distributed``) on one CUDA GPU, world size 1:
each engine trains what plain training trains, on the tiny preset in float32 (four AdamW steps, a checkpoint
every two), and its outputs load in one process (``tnlora merge``, ``load_base_model`` as ``tnlora chat`` does).

Each run is ``python -m tnlora train`` in a subprocess (an engine's process group and accelerate's state are per
process). Skipped without CUDA; the DeepSpeed cases also without DeepSpeed (``pip install 'tnlora[deepspeed]'``;
no compiled DeepSpeed ops are needed: the Trainer's torch AdamW runs inside ZeRO). Run on a GPU with
``pytest -s -m gpu tests/train/test_distributed_gpu.py``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import saved_weights
from safetensors.torch import load_file

import tnlora
from fixture_files import OFFICIAL_CONFIGS

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

pytestmark = pytest.mark.gpu

SRC = Path(tnlora.__file__).resolve().parents[1]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "deepspeed"
RUN_TIMEOUT = 600
ENGINES = {
    "z2": ("--deepspeed", str(EXAMPLES / "ds_z2_config.json")),
    "z3": ("--deepspeed", str(EXAMPLES / "ds_z3_config.json")),
    "z3_offload": ("--deepspeed", str(EXAMPLES / "ds_z3_offload_config.json")),
    "fsdp": ("--fsdp", "full_shard"),
}
# The whole-model runs train with SGD: AdamW's first steps move every weight by about the learning rate whatever
# its gradient's size, so a weight whose gradient is near AdamW's eps moves by an amount set by the last bits of
# the gradient's sums, which each engine orders differently (measured under FSDP2: AdamW runs differ by up to
# 1.5e-4 at lr 1e-2, SGD runs by 4e-9). SGD keeps each update proportional to its gradient; lr 1 makes the
# updates large against the tolerance (the test checks they are).
WHOLE_MODEL = ("--optim", "sgd", "--learning_rate", "1")
METHODS = {"lora": (), "full": WHOLE_MODEL, "freeze": ("--freeze_trainable_layers", "1", *WHOLE_MODEL)}
# float32 on both sides; the engines sum and clip over flat buffers (another order of the same float32 sums),
# and a step moves a weight by ~1e-2 (lr 1e-2): 1e-4 is 1 % of a step.
ATOL, RTOL = 1e-4, 1e-3


def needs_deepspeed(engine: str) -> None:
    if engine != "fsdp" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs DeepSpeed (pip install 'tnlora[deepspeed]')")


def run_tnlora(*argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "tnlora", *argv], capture_output=True, text=True, env=env,
                          timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log


class Runs:
    """Each (method, engine) run made once; engine None is plain training."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "two.json"
        self.data.write_text(json.dumps([
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"instruction": "Describe the sea in a few sentences, with its colour.", "input": "",
             "output": "The sea is wide and restless; its colour changes from grey to deep blue with the sky."},
        ]))  # fmt: skip
        self.done: dict[tuple[str | None, ...], Path] = {}

    def get(self, method: str, engine: str | None, *extra: str) -> Path:
        key = (method, engine, *extra)
        if key not in self.done:
            suffix = "-" + hashlib.sha1("\0".join(extra).encode()).hexdigest()[:8] if extra else ""
            out = self.root / f"{method}-{engine or 'plain'}{suffix}"
            run_tnlora(
                "train", "--model_name_or_path", "tiny", "--dataset", str(self.data), "--template", "chatml",
                "--cutoff_len", "256", "--packing", "false", "--finetuning_type", method, "--lora_rank", "4",
                "--learning_rate", "1e-2", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
                "--per_device_train_batch_size", "2", "--bf16", "false", "--torch_compile", "false",
                "--gradient_checkpointing", "false", "--attention_impl", "chunked", "--report_to", "none",
                "--seed", "0", "--dataset_cache_dir", str(self.root / "cache"), "--output_dir", str(out),
                *METHODS[method], *(ENGINES[engine] if engine else ()), *extra,
            )  # fmt: skip
            self.done[key] = out
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("engines"))


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys() and want, what
    for name in want:
        assert got[name].dtype == want[name].dtype == torch.float32, f"{what} {name}"
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=RTOL, msg=f"{what} {name}")


@pytest.mark.parametrize("engine", ["z2", "z3", "z3_offload", "fsdp"])
def test_engine_trains_the_adapter_plain_training_trains(runs: Runs, engine: str):
    needs_deepspeed(engine)
    got, want = saved_weights(runs.get("lora", engine)), saved_weights(runs.get("lora", None))
    assert_same_weights(got, want, f"lora {engine}")
    # B starts at zero: the adapter moved
    assert any(v.abs().max() > 1e-3 for k, v in want.items() if "lora_B" in k)


@pytest.fixture(scope="module")
def checkpoint_1b(tmp_path_factory: pytest.TempPathFactory, sp_model_file: Path) -> Path:
    """A checkpoint directory of the official 1B configuration with random weights (seed 0, bf16, built on the
    GPU) and the session's sample SentencePiece tokenizer."""
    from tnlora.model import TransnormerConfig, TransnormerForCausalLM

    out = tmp_path_factory.mktemp("random-1B")
    official = OFFICIAL_CONFIGS / "1B"
    config = json.loads((official / "config.json").read_text())
    with torch.random.fork_rng(devices=[0]), torch.device("cuda"):
        torch.manual_seed(0)
        model = TransnormerForCausalLM(TransnormerConfig(**config)).to(torch.bfloat16)
    model.save_pretrained(out)
    shutil.copy(sp_model_file, out / "tokenizer.model")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(official / name, out / name)
    return out


@pytest.mark.parametrize("engine", ["z2", "z3"])
def test_engine_trains_a_1b_adapter_as_plain_training(runs: Runs, checkpoint_1b: Path, engine: str):
    """The same at the real 1B sizes: ZeRO's buckets, prefetching and gathers over 1B-shaped layers, not only
    the tiny preset's. SGD at lr 1, as the whole-model runs (see WHOLE_MODEL)."""
    needs_deepspeed(engine)
    extra = ("--model_name_or_path", str(checkpoint_1b), *WHOLE_MODEL)
    got, want = saved_weights(runs.get("lora", engine, *extra)), saved_weights(runs.get("lora", None, *extra))
    assert_same_weights(got, want, f"1B lora {engine}")
    assert any(v.abs().max() > 10 * ATOL for k, v in want.items() if "lora_B" in k)


@pytest.mark.parametrize("method", ["full", "freeze"])
@pytest.mark.parametrize("engine", ["z3", "fsdp"])
def test_engine_trains_the_model_plain_training_trains(runs: Runs, engine: str, method: str):
    needs_deepspeed(engine)
    out, plain = runs.get(method, engine), runs.get(method, None)
    final = saved_weights(out)
    assert_same_weights(final, saved_weights(plain), f"{method} {engine}")
    step2 = load_file(out / "checkpoint-2" / "model.safetensors")
    assert_same_weights(step2, load_file(plain / "checkpoint-2" / "model.safetensors"), f"{method} {engine} step 2")
    # steps 3 and 4 moved the weights by far more than the tolerance
    assert max((final[k] - step2[k]).abs().max().item() for k in final) > 10 * ATOL
    # one process loads it as tnlora chat does, and it runs
    from tnlora.model.loading import load_base_model

    model = load_base_model(str(out), dtype=torch.float32, attention_impl="chunked")
    logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("engine", ["z3", "fsdp"])
def test_engine_adapter_merges_in_one_process(runs: Runs, engine: str, tmp_path: Path):
    needs_deepspeed(engine)
    merged = {}
    for name, e in (("engine", engine), ("plain", None)):
        run_tnlora("merge", "--model", "tiny", "--adapter", str(runs.get("lora", e)), "--output",
                   str(tmp_path / name), "--dtype", "float32")  # fmt: skip
        merged[name] = load_file(tmp_path / name / "model.safetensors")
    assert_same_weights(merged["engine"], merged["plain"], f"merged {engine}")


@pytest.mark.parametrize("engine", ["z2", "z3", "fsdp"])
def test_engine_checkpoints_are_complete(runs: Runs, engine: str):
    needs_deepspeed(engine)
    from tnlora.train.checkpoints import is_complete

    out = runs.get("lora", engine)
    assert is_complete(out / "checkpoint-2") and is_complete(out / "checkpoint-4")
    assert not [p for p in out.rglob("*") if p.name.endswith(".tnlora-tmp") or p.name == ".tnlora-saving"]


@pytest.mark.parametrize("engine", ["z2", "z3", "fsdp"])
def test_engine_trains_a_bf16_adapter(runs: Runs, engine: str):
    """bf16 as real runs train (a bf16 base, the adapter's master weights in fp32): the run ends with finite
    losses and an adapter that moved. (No equality: bf16 rounds differently under each engine.)"""
    needs_deepspeed(engine)
    out = runs.get("lora", engine, "--bf16", "true")
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    adapter = saved_weights(out)
    assert all(torch.isfinite(v.float()).all() for v in adapter.values())
    assert any(v.float().abs().max() > 1e-3 for k, v in adapter.items() if "lora_B" in k)
