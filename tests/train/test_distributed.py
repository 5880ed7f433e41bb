"""``tnlora train`` in several processes (``train.distributed``) on the CPU: DDP through torchrun (gloo, two
processes, the tiny preset, float32) against one process, resumed against uninterrupted, who writes what, and
errors that end every process (under torchrun and accelerate launch); FSDP2's wrapping of the model (torch's
``fully_shard``, which runs on the CPU with gloo; accelerate runs the Trainer's FSDP on GPUs only:
tests/train/test_distributed_gpu.py); the engine settings' refusals. DeepSpeed's runs:
tests/train/test_distributed_deepspeed.py. Each run is bounded by a subprocess timeout."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_helpers import (
    HERE,
    RUN_TIMEOUT,
    adapter,
    run_argv,
    run_processes,
    two_examples,
    worker_env,
)

from tnlora.config import load_run_config
from tnlora.train import distributed

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch has no gloo backend",
)


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


class Runs:
    """The runs the tests compare, each made once (in the order a test first asks for it)."""

    def __init__(self, root: Path):
        self.root = root
        self.data = two_examples(root / "two.json")
        self._done: dict[str, Any] = {}

    def argv(self, out: Path) -> list[str]:
        """The two-process runs' arguments: one row each."""
        return run_argv(self.data, out, "--per_device_train_batch_size", "1", "--plot_loss", "true",
                        "--sample_prompts", "Say hi.", "--sample_max_new_tokens", "4")  # fmt: skip

    def ddp(self) -> tuple[Path, str]:
        """Two processes of one row each, uninterrupted; rank 1's writes recorded."""
        if "ddp" not in self._done:
            out = self.root / "ddp"
            code, log, _ = run_processes([str(HERE / "ddp_worker.py"), "--record", str(self.root / "writes"),
                                          "--output_dir_for_record", str(out), "::", *self.argv(out)])  # fmt: skip
            assert code == 0, log[-3000:]
            self._done["ddp"] = (out, log)
        return self._done["ddp"]

    def single(self) -> Path:
        """One process of both rows (in this process)."""
        if "single" not in self._done:
            from tnlora.train.run import train

            out = self.root / "single"
            train(load_run_config(None, run_argv(self.data, out, "--per_device_train_batch_size", "2")))
            self._done["single"] = (out, "")
        return self._done["single"][0]

    def failed(self) -> tuple[Path, str, int, float, list[str]]:
        """Two processes, rank 1 failing at the start of step 4 (after checkpoint-2 was completed: step 3's
        all-reduce waited for rank 0's save); their exit status, output, wall time and the entries they left."""
        if "failed" not in self._done:
            out = self.root / "resumed"
            code, log, seconds = run_processes([str(HERE / "ddp_worker.py"), "--fail_rank", "1", "--fail_step", "4",
                                                "::", *self.argv(out)], timeout=90)  # fmt: skip
            self._done["failed"] = (out, log, code, seconds, sorted(p.name for p in out.iterdir()))
        return self._done["failed"]

    def resumed(self) -> tuple[Path, str]:
        """The failed run resumed, through the shortcut: ``tnlora train ... --nproc_per_node 2``."""
        if "resumed" not in self._done:
            out, _, code, _, _ = self.failed()
            assert code != 0 and (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
            done = subprocess.run([sys.executable, "-m", "tnlora", "train", *self.argv(out),
                                   "--resume_from_checkpoint", "true", "--nproc_per_node", "2"],
                                  capture_output=True, text=True, env=worker_env(), timeout=RUN_TIMEOUT,
                                  stdin=subprocess.DEVNULL)  # fmt: skip
            log = done.stdout + done.stderr
            assert done.returncode == 0, log[-3000:]
            self._done["resumed"] = (out, log)
        return self._done["resumed"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("ddp"))


def test_ddp_two_ranks_of_one_row_equal_one_process_of_two_rows(runs: Runs):
    ddp, _ = runs.ddp()
    single = runs.single()
    got, want = adapter(ddp), adapter(single)
    assert got.keys() == want.keys() and got
    # float32, summed in another order: one process adds the two rows' gradients inside each matmul, DDP adds
    # the ranks' gradients in the all-reduce (and the short row is padded in one process only). Four AdamW
    # steps at lr 1e-2 keep those ~1e-7 relative differences far below the 1e-2 that a step moves a weight.
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    # The loss is per token over both ranks (the Trainer gathers the token count): the same logged losses.
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-5)
    assert len(losses(ddp)) == 4
    # B starts at zero: the adapter moved, so the comparison is not of two initial states.
    assert any(v.abs().max() > 1e-3 for k, v in got.items() if "lora_B" in k)


def _transformers_resumes_cpu_processes() -> bool:
    import transformers
    from packaging.version import Version

    from tnlora.train.run import CPU_PROCESSES_RESUME_TRANSFORMERS

    return Version(transformers.__version__) >= Version(CPU_PROCESSES_RESUME_TRANSFORMERS)


@pytest.mark.skipif(
    not _transformers_resumes_cpu_processes(),
    reason="this transformers cannot resume several CPU processes (tnlora refuses it: the test below)",
)
def test_ddp_resume_equals_uninterrupted_run(runs: Runs):
    ddp, _ = runs.ddp()
    resumed, log = runs.resumed()
    assert "resuming from" in log
    got, want = adapter(resumed), adapter(ddp)
    for name in want:
        # the same two processes, the same order of every sum: bitwise
        assert torch.equal(got[name], want[name]), name
    assert losses(resumed)[-2:] == losses(ddp)[-2:]
    # the samples of the steps after the checkpoint, once
    steps = [json.loads(line)["step"] for line in (resumed / "samples.jsonl").read_text().splitlines()]
    assert steps == [4]


def test_ddp_only_rank_zero_writes_outputs(runs: Runs):
    out, log = runs.ddp()
    rank1 = (runs.root / "writes.rank1").read_text().split()
    # rank 1 writes its own random state into each checkpoint, and nothing else
    assert sorted(set(rank1)) == ["checkpoint-2/rng_state_1.pth", "checkpoint-4/rng_state_1.pth"]
    rank0 = set((runs.root / "writes.rank0").read_text().split())
    assert {"tnlora_output.json", "loss.png", "samples.jsonl"} <= {Path(p).name for p in rank0}
    for name in ("adapter_model.safetensors", "trainer_state.json", "tnlora_run.yaml", "loss.png"):
        assert (out / name).is_file(), name
    from tnlora.train.checkpoints import is_complete

    assert is_complete(out / "checkpoint-2") and is_complete(out / "checkpoint-4")
    assert not [p for p in out.rglob("*") if p.name.endswith(".tnlora-tmp") or p.name == ".tnlora-saving"]
    marker = json.loads((out / "tnlora_output.json").read_text())
    assert "adapter_model.safetensors" in marker["files"]
    # the run's messages once: rank 0's
    assert log.count("saved to ") == 1 and log.count("step 4/4") == 1 and log.count("data: 2 records") == 1
    assert len((out / "samples.jsonl").read_text().splitlines()) == 1


def test_ddp_error_on_one_rank_ends_both_processes(runs: Runs):
    _, log, code, seconds, left = runs.failed()
    assert code != 0
    assert "error: train.json, record 4: an injected bad record" in log
    # rank 0 waits in step 4's all-reduce; torchrun ends it (or, at the latest, the 60 s ddp_timeout would)
    assert seconds < 80, log[-2000:]
    # checkpoint-2 and the run's files; no final outputs from a failed run
    assert "checkpoint-2" in left and "tnlora_output.json" in left and "adapter_model.safetensors" not in left


LAUNCHERS = {
    "torchrun": ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # accelerate's launcher (no config file): two processes on this host, through torchrun's machinery
    "accelerate": ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"],
}  # fmt: skip


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_error_in_the_main_process_while_it_reads_the_data_reaches_the_others(launcher: str):
    # the process group as every launcher sets it up (RANK, WORLD_SIZE, the rendezvous): tnlora's own, opened
    # before the data is read
    done = subprocess.run([sys.executable, "-m", *LAUNCHERS[launcher], str(HERE / "main_first_check.py")],
                          capture_output=True, text=True, env=worker_env(), timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    code, log = done.returncode, done.stdout + done.stderr
    assert code != 0, log[-2000:]
    # rank 0 ends with its own error; rank 1, which waited for the cache, names it instead of hanging
    assert "rank 0: error: " in log and "bad.json, record 2, field 'instruction': expected a string" in log
    rank1 = [line for line in log.splitlines() if line.startswith("rank 1: error: ")]
    assert len(rank1) == 1 and "stopped, the main process failed while reading the data: " in rank1[0]
    assert "bad.json, record 2, field 'instruction'" in rank1[0]


def test_nproc_per_node_is_refused_inside_a_launched_process(monkeypatch: pytest.MonkeyPatch, capsys):
    from tnlora.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--model_name_or_path", "tiny", "--dataset", "d", "--output_dir", "o",
                 "--nproc_per_node", "2"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --nproc_per_node: this process is already one of 2") and "\n" not in err


def test_nproc_per_node_refuses_what_each_process_would_before_starting_them(monkeypatch, capsys, tmp_path):
    """``tnlora train --nproc_per_node N``: the run's checks (template, output dir, engine, ...) are made once in
    the command's own process, so a bad key is one line and no process starts."""
    from tnlora import cli

    monkeypatch.setattr(cli, "launch_processes", lambda *a: pytest.fail("processes started"))
    argv = run_argv(two_examples(tmp_path / "two.json"), tmp_path / "out", "--template", "nonexistent")
    assert cli.main(["train", *argv, "--nproc_per_node", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: template: unknown template 'nonexistent'") and "\n" not in err


def test_nproc_per_node_names_the_failed_process_in_one_line_without_the_launcher_traceback(tmp_path: Path):
    """A process failing under ``--nproc_per_node`` (a bad record, found by the main process while it reads the
    data): its own line, the others' line naming it, then one line from the command saying how each process
    ended, no traceback from the launcher; the command exits with the error's status (2, a user's error)."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "hi", "output": "yo"}, {"instruction": 5, "output": "x"}]))
    done = subprocess.run([sys.executable, "-m", "tnlora", "train", *run_argv(bad, tmp_path / "out"),
                           "--nproc_per_node", "2"], capture_output=True, text=True, env=worker_env(),
                          timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    log = done.stdout + done.stderr
    assert "bad.json, record 2, field 'instruction': expected a string" in log, log[-2000:]
    assert "Traceback" not in log and "ChildFailedError" not in log, log[-2000:]
    # both stop on the bad record (rank 1 on the main process's word) with status 2, or the launcher, having seen
    # one of them end first, ends the other
    last = log.strip().splitlines()[-1]
    ended = r"(exited with status 2|was ended by SIG[A-Z]+)"
    assert re.fullmatch(rf"error: tnlora train in 2 processes: process 0 {ended}, process 1 {ended}", last), last
    assert "status 2" in last and done.returncode == 2


def test_fsdp2_wrapping_equals_one_process(tmp_path: Path):
    """Each decoder layer and the root as FSDP2 units over two processes, each with one of two rows: LoRA (frozen
    and trainable weights in one unit), full (the tied head read by the fused loss inside the root unit) and
    freeze tuning end three SGD steps where one process with both rows does; the gathered state dict is the
    one process's."""
    code, log, _ = run_processes([str(HERE / "fsdp2_check.py"), str(tmp_path)])
    if "fully_shard unavailable" in log:
        pytest.skip("this torch has no FSDP2 fully_shard on the CPU")
    assert code == 0, log[-3000:]
    for method in ("lora", "full", "freeze"):
        sharded = torch.load(tmp_path / f"{method}-fsdp.pt")
        plain = torch.load(tmp_path / f"{method}-plain.pt")
        initial = torch.load(tmp_path / f"{method}-init.pt")
        assert sharded.keys() == plain.keys() and sharded
        trained = [k for k in plain if k in json.loads((tmp_path / f"{method}-trained.json").read_text())]
        # every trained weight moved (the comparison is not of two initial states), the frozen ones did not
        assert trained and all((plain[k] - initial[k]).abs().max() > 1e-4 for k in trained), method
        assert all(torch.equal(sharded[k], initial[k]) for k in plain if k not in trained), method
        for name in plain:
            # float32 sums in another order (the reduce-scatter adds the ranks' gradients; three SGD steps of
            # rate 0.1 move weights by ~1e-2): 1e-6
            torch.testing.assert_close(sharded[name], plain[name], rtol=1e-5, atol=1e-6, msg=f"{method} {name}")


def test_world_size_and_rank_without_a_launcher(monkeypatch: pytest.MonkeyPatch):
    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.main_first(lambda: 7, "testing") == 7
    assert distributed.broadcast("x") == "x"


def train_error(tmp_path: Path, capsys, *extra: str) -> str:
    """The one ``error:`` line of ``tnlora train`` on the tiny preset with ``extra`` (nothing written)."""
    from tnlora.cli import main

    data = two_examples(tmp_path / "two.json")
    assert main(["train", *run_argv(data, tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "out").exists()
    return err


def write_ds_config(path: Path, **zero: Any) -> Path:
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": zero}))
    return path


def test_deepspeed_without_the_package_is_refused_in_one_line(tmp_path: Path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    # as where it is not installed (the check asks importlib)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    config = write_ds_config(tmp_path / "ds.json", stage=2)
    err = train_error(tmp_path, capsys, "--deepspeed", str(config))
    assert "deepspeed: DeepSpeed is not installed (pip install 'tnlora[deepspeed]'" in err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--deepspeed", "missing.json"), "deepspeed: cannot read "),
        (("--deepspeed", "{ds}"), "sets ZeRO-3 without stage3_gather_16bit_weights_on_model_save: true"),
        (("--fsdp", "hybrid_shard"), "fsdp: unknown option 'hybrid_shard' (hybrid_shard and no_shard are FSDP1"),
        (("--fsdp", "full_shard shard_grad_op"), "fsdp: full_shard and shard_grad_op exclude each other"),
        (("--fsdp_config", '{"version": 2}'), "fsdp_config: set fsdp: full_shard too"),
        (("--fsdp", "full_shard", "--deepspeed", "{ds}"), "deepspeed: set either deepspeed or fsdp, not both"),
    ],
)
def test_engine_settings_are_checked_in_one_line(tmp_path: Path, capsys, extra: tuple[str, ...], expected: str):
    ds = write_ds_config(tmp_path / "z3.json", stage=3)
    err = train_error(tmp_path, capsys, *[a.replace("{ds}", str(ds)) for a in extra])
    assert expected in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_fsdp_without_a_gpu_is_refused_in_one_line(tmp_path: Path, capsys):
    err = train_error(tmp_path, capsys, "--fsdp", "full_shard")
    assert "fsdp: needs CUDA GPUs" in err and "DDP (torchrun)" in err


def test_fsdp_options_wrap_each_decoder_layer_and_save_gathered():
    cfg = load_run_config(None, ["--model_name_or_path", "tiny", "--dataset", "d", "--output_dir", "o",
                                 "--fsdp", "shard_grad_op offload",
                                 "--fsdp_config", '{"fsdp_activation_checkpointing": false}'])  # fmt: skip
    args = distributed.engine_arguments(cfg)
    assert args["fsdp"] is True
    options = args["fsdp_config"]
    assert options["version"] == 2 and options["transformer_layer_cls_to_wrap"] == ["TransnormerDecoderLayer"]
    assert options["state_dict_type"] == "FULL_STATE_DICT" and options["cpu_offload"] is True
    assert options["reshard_after_forward"] is False  # shard_grad_op
    assert options["activation_checkpointing"] is False  # accelerate's fsdp_ prefix, the Trainer's spelling
    from tnlora.model.modeling import TransnormerDecoderLayer

    assert TransnormerDecoderLayer.__name__ == distributed.FSDP_LAYER
    plain = load_run_config(None, ["--model_name_or_path", "tiny", "--dataset", "d", "--output_dir", "o"])
    assert distributed.engine_arguments(plain) == {}


def test_resuming_with_another_engine_is_refused():
    from tnlora.train.checkpoints import resume_differences

    base = ["--model_name_or_path", "tiny", "--dataset", "d", "--output_dir", "o"]
    saved = load_run_config(None, [*base, "--fsdp", "full_shard"])
    assert resume_differences(saved, load_run_config(None, base)) == ["fsdp full_shard → null"]
    assert resume_differences(saved, load_run_config(None, [*base, "--fsdp", "full_shard"])) == []


def test_a_quantized_base_is_not_sharded():
    from tnlora.errors import ConfigError

    cfg = load_run_config(None, ["--model_name_or_path", "tiny", "--dataset", "d", "--output_dir", "o",
                                 "--fsdp", "full_shard", "--quantization_bit", "4"])  # fmt: skip
    with pytest.raises(ConfigError, match="quantization_bit: a quantized base is not combined with fsdp"):
        distributed.check_engine(cfg, cuda=True)  # as on a GPU machine


def test_the_fp8_base_is_not_combined_with_an_engine():
    from tnlora.errors import ConfigError

    cfg = load_run_config(None, ["--model_name_or_path", "tiny", "--dataset", "d", "--output_dir", "o",
                                 "--fsdp", "full_shard", "--fp8", "true"])  # fmt: skip
    with pytest.raises(ConfigError, match="fp8: the frozen weights' fp8 copies are not combined with fsdp in tnlora"):
        distributed.check_engine(cfg, cuda=True)  # as on a GPU machine


def test_a_gathered_state_dict_is_saved_without_the_tied_head_as_one_process_saves(tmp_path: Path) -> None:
    """FSDP's gathered full state dict holds the tied LM head under its own name as a separate tensor; the
    Trainer's save drops it, so the files equal a plain run's (and the untied case keeps its head)."""
    from safetensors.torch import load_file

    from tnlora.model import load_model
    from tnlora.train.trainer import without_tied_copies

    model = load_model("tiny", dtype=torch.float32)
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    gathered = {k: v.clone() for k, v in model.state_dict().items()}  # separate tensors, as gathered
    assert "lm_head.weight" in gathered
    kept = without_tied_copies(model, gathered)
    assert kept.keys() == load_file(plain / "model.safetensors").keys()
    model.config.tie_word_embeddings = False
    assert without_tied_copies(model, gathered) is gathered


def test_resuming_cpu_processes_on_a_transformers_that_cannot_is_refused(monkeypatch):
    """transformers 5.17 loads a multi-process run's optimizer state onto "cpu:<rank>", which torch cannot
    restore: tnlora says so in one line instead of every rank's traceback (5.18 and later load it)."""
    import transformers

    from tnlora.errors import ConfigError
    from tnlora.train.run import check_resume_of_cpu_processes

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(ConfigError) as info:
        check_resume_of_cpu_processes()
    assert str(info.value) == (
        "resume_from_checkpoint: resuming a run of several CPU processes needs transformers 5.18 or later "
        "(transformers 5.17.0 loads the optimizer state onto 'cpu:<rank>', which torch cannot restore); pip install "
        "-U transformers"
    )
    monkeypatch.setattr(transformers, "__version__", "5.18.0")
    check_resume_of_cpu_processes()
