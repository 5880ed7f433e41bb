"""DeepSpeed ZeRO-2 / ZeRO-3 through the Trainer (``deepspeed: FILE``, ``train.distributed``) on the CPU:
two processes under torchrun (gloo, DeepSpeed's CPU accelerator, the tiny preset, float32) of one row each
train what one plain process trains on both rows: LoRA under ZeRO-2 and ZeRO-3 (the weights sharded: the loss
calls the partitioned LM head instead of reading its weight), full and freeze tuning under ZeRO-3. The saved
outputs are gathered (one process loads and merges them), and a ZeRO-3 run resumed from its checkpoint ends
where the uninterrupted one ends.

Runs where DeepSpeed is installed (``pip install 'tnlora[deepspeed]'``; its CPU accelerator compiles a small
shared-memory op on first use, so a C++ compiler is needed). On a CUDA machine two processes would share one
GPU: tests/train/test_distributed_gpu.py covers DeepSpeed there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import RUN_TIMEOUT, run_argv, saved_weights, two_examples, worker_env

pytest.importorskip("deepspeed", reason="needs DeepSpeed (pip install 'tnlora[deepspeed]')")
if torch.cuda.is_available():
    pytest.skip("two CPU processes; on a GPU machine tests/train/test_distributed_gpu.py runs DeepSpeed",
                allow_module_level=True)  # fmt: skip
if shutil.which("c++") is None and shutil.which("g++") is None:
    pytest.skip("DeepSpeed's CPU accelerator compiles an op: needs a C++ compiler", allow_module_level=True)

from tnlora.config import load_run_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "deepspeed"
METHODS = {"lora": (), "full": (), "freeze": ("--freeze_trainable_layers", "1")}
# float32 on both sides, the same rows: the sums run in another order (flat buffers, the ranks' reduce), and a
# step moves a weight by ~1e-2 (AdamW at lr 1e-2): 1e-4 is 1 % of a step.
ATOL, RTOL = 1e-4, 1e-3


class Runs:
    """Each run made once: plain (one process, both rows) or a ZeRO stage (two processes, one row each)."""

    def __init__(self, root: Path):
        self.root = root
        self.data = two_examples(root / "two.json")
        self.done: dict[tuple[str, str], Path] = {}

    def argv(self, out: Path, method: str, *extra: str) -> list[str]:
        # constant learning rate: a run of 2 steps resumed to 4 takes the uninterrupted run's steps
        return run_argv(self.data, out, "--finetuning_type", method, "--lr_scheduler_type", "constant",
                        *METHODS[method], *extra)  # fmt: skip

    def plain(self, method: str) -> Path:
        if (method, "plain") not in self.done:
            from tnlora.train.run import train

            out = self.root / f"{method}-plain"
            train(load_run_config(None, self.argv(out, method, "--per_device_train_batch_size", "2")))
            self.done[method, "plain"] = out
        return self.done[method, "plain"]

    def zero(self, method: str, stage: int, *extra: str, name: str | None = None) -> Path:
        key = (method, name or f"z{stage}")
        if key not in self.done:
            out = self.root / f"{method}-{key[1]}"
            argv = self.argv(out, method, "--per_device_train_batch_size", "1", "--deepspeed",
                             str(EXAMPLES / f"ds_z{stage}_config.json"), *extra)  # fmt: skip
            torchrun(argv)
            self.done[key] = out
        return self.done[key]


def torchrun(argv: list[str]) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tnlora", "train", *argv]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=worker_env(), timeout=RUN_TIMEOUT,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("zero"))


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys() and want, what
    for name in want:
        assert got[name].dtype == want[name].dtype == torch.float32, f"{what} {name}"
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=RTOL, msg=f"{what} {name}")


@pytest.mark.parametrize(("method", "stage"), [("lora", 2), ("lora", 3), ("full", 3), ("freeze", 3)])
def test_zero_over_two_processes_trains_what_one_process_trains(runs: Runs, method: str, stage: int):
    want = saved_weights(runs.plain(method))
    assert_same_weights(saved_weights(runs.zero(method, stage)), want, f"{method} ZeRO-{stage}")
    initial_moved = [k for k, v in want.items() if "lora_B" in k] if method == "lora" else list(want)
    assert any(want[k].abs().max() > 1e-3 for k in initial_moved)  # trained, not two initial states


def test_zero3_outputs_load_and_merge_in_one_process(runs: Runs, tmp_path: Path):
    from tnlora.cli import main
    from tnlora.model.loading import load_base_model

    full = runs.zero("full", 3)
    model = load_base_model(str(full), dtype=torch.float32, attention_impl="chunked")
    plain = load_base_model(str(runs.plain("full")), dtype=torch.float32, attention_impl="chunked")
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-3, rtol=1e-3)
    merged = {}
    for name, out in (("zero", runs.zero("lora", 3)), ("plain", runs.plain("lora"))):
        assert main(["merge", "--model", "tiny", "--adapter", str(out), "--output", str(tmp_path / name),
                     "--dtype", "float32"]) == 0  # fmt: skip
        merged[name] = saved_weights(tmp_path / name)
    assert_same_weights(merged["zero"], merged["plain"], "merged")


def test_zero3_resumed_run_equals_uninterrupted(runs: Runs):
    whole = runs.zero("lora", 3)
    out = runs.zero("lora", 3, "--max_steps", "2", name="z3-resumed")  # stops after its checkpoint-2
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    log = torchrun(runs.argv(out, "lora", "--per_device_train_batch_size", "1", "--deepspeed",
                             str(EXAMPLES / "ds_z3_config.json"), "--resume_from_checkpoint", "true"))  # fmt: skip
    assert "resuming from" in log
    from tnlora.train.checkpoints import is_complete

    assert is_complete(out / "checkpoint-4")
    got, want = saved_weights(out), saved_weights(whole)
    for name in want:
        # the same processes, the same order of every sum
        assert torch.equal(got[name], want[name]), name
