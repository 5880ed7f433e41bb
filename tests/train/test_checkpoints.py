"""tnlora.train.checkpoints: a run killed at any moment (inside checkpoint saves too) resumes to the adapter of
an uninterrupted run; no file is ever left truncated; incomplete checkpoints are skipped; a resume that changes
what a checkpoint means, or takes another run's checkpoint, is refused; a full or unwritable output dir stops the
run in one line with the last complete checkpoint intact."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from fault_helpers import run_in_child, train_with_kill_switch
from safetensors.torch import load_file
from train_helpers import tiny_argv

from tnlora.cli import main
from tnlora.config import FIELDS
from tnlora.train import checkpoints
from tnlora.train.checkpoints import HARMLESS_KEYS, MEANING_KEYS, RECORD, is_complete, last_complete
from tnlora.train.run import train

MAX_STEPS = 16
# Two micro-batches a step (a kill can fall between them), a checkpoint every step, the oldest ones removed.
FAULT_ARGS = (
    "--max_steps", str(MAX_STEPS), "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
    "--save_steps", "1", "--save_total_limit", "3", "--logging_steps", "1",
)  # fmt: skip


def _argv(out: Path, cache: Path, *extra: str) -> list[str]:
    return tiny_argv(out, *FAULT_ARGS, "--dataset_cache_dir", str(cache), *extra)


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def _assert_whole(path: Path) -> None:
    """The file parses as what its name says it is (a truncated one would not)."""
    suffix = path.suffix
    if suffix == ".json":
        json.loads(path.read_text())
    elif suffix == ".yaml":
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
    elif suffix == ".safetensors":
        load_file(str(path))
    elif suffix in (".pt", ".pth", ".bin"):
        torch.load(path, weights_only=False)


def assert_no_truncated_file(out: Path) -> None:
    """Every file in the output dir and in its complete checkpoints is whole (tnlora's leftovers aside)."""
    from tnlora.outputs import is_leftover

    for entry in out.iterdir() if out.is_dir() else []:
        if entry.is_file() and not is_leftover(entry.name):
            _assert_whole(entry)
    for checkpoint in checkpoints.complete_checkpoints(out):
        for entry in checkpoint.iterdir():
            _assert_whole(entry)


def test_a_run_killed_at_random_moments_resumes_to_the_uninterrupted_adapter(tmp_path):
    """Ten SIGKILLs in a row at seeded random moments of the run (between and inside file writes, inside
    checkpoint saves, between micro-batches, while old checkpoints are removed, during the final save), each
    followed by ``--resume_from_checkpoint true``: every resume works and the final adapter is bitwise the
    uninterrupted run's (fp32 on the CPU, one thread: resuming restores weights, optimizer, schedule, RNG and the
    data position exactly, so the same operations run on the same values)."""
    cache = tmp_path / "cache"
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    counts = tmp_path / "ref-moments.json"
    code = run_in_child(
        lambda: train_with_kill_switch(_argv(ref, cache), None, counts, ref), tmp_path / "ref.log"
    )
    assert code == 0, (tmp_path / "ref.log").read_text()[-3000:]
    # The moments of a run: before training, per step (inside checkpoint saves: per_save), after training; a
    # resumed run has those of the steps it has left. The first five kills fall inside the checkpoint saves of
    # the next three steps, the other five anywhere in what is left of the run.
    moments = json.loads(counts.read_text())
    before, after = moments["train_begin"], moments["total"] - moments["train_end"]
    per_step = (moments["train_end"] - moments["train_begin"]) / MAX_STEPS
    per_save = moments["saving"] / MAX_STEPS
    rng = random.Random(20)
    notes = tmp_path / "kills.jsonl"
    logs = []
    for attempt in range(10):
        last = last_complete(cut) if cut.is_dir() else None
        done = checkpoints.checkpoint_step(last) if last is not None else 0
        inside = attempt < 5
        if inside:
            at = rng.randint(1, int(3 * per_save))
        else:
            at = rng.randint(1, int(0.9 * (before + (MAX_STEPS - done) * per_step + after)))
        log = tmp_path / f"attempt-{attempt}.log"
        argv = _argv(cut, cache, "--resume_from_checkpoint", "true")
        code = run_in_child(
            lambda argv=argv, at=at, inside=inside: train_with_kill_switch(argv, at, notes, cut, inside), log
        )
        logs.append(log.read_text())
        assert code == -9, f"attempt {attempt} was not killed (exit {code}): {logs[-1][-3000:]}"
        assert_no_truncated_file(cut)
    kills = [json.loads(line) for line in notes.read_text().splitlines()]
    assert len(kills) == 10
    code = run_in_child(lambda: train_with_kill_switch(_argv(cut, cache, "--resume_from_checkpoint", "true"), None,
                                                       tmp_path / "final.json", cut), tmp_path / "final.log")  # fmt: skip
    logs.append((tmp_path / "final.log").read_text())
    assert code == 0, logs[-1][-3000:]
    assert_no_truncated_file(cut)
    whole, resumed = _adapter(ref), _adapter(cut)
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key
    assert json.loads((cut / "trainer_state.json").read_text())["global_step"] == MAX_STEPS
    # Half the kills fell inside checkpoint saves, and the resumes after them skipped the interrupted checkpoint.
    assert all(k["inside_a_checkpoint_save"] for k in kills[:5]), kills
    skipped = [line for log in logs for line in log.splitlines() if "skipping the incomplete" in line]
    assert skipped and all(
        line.startswith("resume_from_checkpoint: skipping the incomplete checkpoint-") for line in skipped
    )
    assert not any("Traceback" in log for log in logs)


def test_resuming_a_finished_run_takes_no_step_more(make_config, tmp_path):
    # 7 steps of 4 examples: not a whole number of 60-example epochs; a constant schedule would show a step more
    args = ("--max_steps", "7", "--save_steps", "7", "--lr_scheduler_type", "constant")
    first = train(make_config(tmp_path / "o", *args))
    before = _adapter(tmp_path / "o")
    again = train(make_config(tmp_path / "o", *args, "--resume_from_checkpoint", "true"))
    assert first.global_step == again.global_step == 7
    after = _adapter(tmp_path / "o")
    assert all(torch.equal(after[k], before[k]) for k in before)


# ---------------------------------------------------------------------------------------------------------------
# Resuming: which checkpoint, and with what


def _cli(out: Path, *extra: str) -> list[str]:
    return ["train", *tiny_argv(out, "--max_steps", "4", "--save_steps", "2", *extra)]


def _error(capsys) -> str:
    """The one error line of a refused command (and that it is the only one, with no traceback)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _listing(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, one_thread) -> Path:
    """A finished 4-step run with checkpoints 2 and 4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("run") / "o"
    with one_thread():
        assert main(_cli(out)) == 0
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_checkpoints_carry_a_completion_record_listing_their_files(four_steps):
    run_id = json.loads((four_steps / "tnlora_output.json").read_text())["run_id"]
    for step in (2, 4):
        checkpoint = four_steps / f"checkpoint-{step}"
        record = json.loads((checkpoint / RECORD).read_text())
        assert record["step"] == step and record["run_id"] == run_id
        assert sorted(record["files"]) == sorted(p.name for p in checkpoint.iterdir() if p.name != RECORD)
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
            record["files"]
        )
        assert is_complete(checkpoint)
        (checkpoint / "optimizer.pt").rename(checkpoint / "moved")  # a listed file missing: not complete
        assert not is_complete(checkpoint)
        (checkpoint / "moved").rename(checkpoint / "optimizer.pt")
    assert not (four_steps / ".tnlora-saving").exists()


def test_incomplete_checkpoints_are_skipped_in_favour_of_the_last_complete_one(four_steps, tmp_path, capsys):
    out = _copy(four_steps, tmp_path / "o")
    (out / "checkpoint-4" / RECORD).unlink()  # e.g. copied in part
    interrupted = out / ".tnlora-saving" / "checkpoint-6"  # a save a kill cut short
    interrupted.mkdir(parents=True)
    (interrupted / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    capsys.readouterr()
    assert main(_cli(out, "--max_steps", "6", "--resume_from_checkpoint", "true")) == 0
    err = capsys.readouterr().err
    skips = [line for line in err.splitlines() if "skipping" in line]
    assert skips == [
        "resume_from_checkpoint: skipping the incomplete checkpoint-4 (no complete tnlora_checkpoint.json), "
        "checkpoint-6 (its save was interrupted); resuming from checkpoint-2"
    ]
    assert f"resuming from {out / 'checkpoint-2'}" in err
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    assert is_complete(out / "checkpoint-4") and is_complete(out / "checkpoint-6")  # saved again, whole
    assert not (out / ".tnlora-saving").exists()


def test_an_incomplete_checkpoint_named_explicitly_is_refused(four_steps, tmp_path, capsys):
    out = _copy(four_steps, tmp_path / "o")
    (out / "checkpoint-4" / "optimizer.pt").unlink()
    before = _listing(out)
    capsys.readouterr()
    assert main(_cli(out, "--resume_from_checkpoint", str(out / "checkpoint-4"))) == 2
    assert _error(capsys) == (
        f"error: resume_from_checkpoint: {out / 'checkpoint-4'} is incomplete (no complete tnlora_checkpoint.json: its "
        "save was interrupted); --resume_from_checkpoint true resumes from the last complete one"
    )
    assert _listing(out) == before


def test_a_resume_that_changes_what_the_checkpoint_means_is_refused_in_one_line(four_steps, tmp_path, capsys):
    out = _copy(four_steps, tmp_path / "o")
    before = _listing(out)
    capsys.readouterr()
    changed = ("--lora_rank", "16", "--cutoff_len", "512", "--template", "alpaca", "--lora_target", "l1,l2")
    assert main(_cli(out, "--max_steps", "6", "--resume_from_checkpoint", "true", *changed)) == 2
    line = _error(capsys)
    assert line.startswith(
        f"error: resume_from_checkpoint: {out / 'checkpoint-4'} was trained with other settings, and these change "
        "what it means: cutoff_len 256 → 512; lora_rank 8 → 16; lora_target all → l1,l2; template chatml → alpaca ("
    )
    assert f"the values in {out / 'tnlora_run.yaml'}" in line
    assert _listing(out) == before


def test_a_key_left_to_the_machine_is_compared_once_resolved(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_cli(out, "--packing", "true")) == 0
    capsys.readouterr()
    # unset, packing resolves to false on the CPU: the rows, and so what each step saw, would differ
    assert main(_cli(out, "--max_steps", "6", "--resume_from_checkpoint", "true")) == 2
    assert "these change what it means: packing True → False (" in _error(capsys)


def test_harmless_changes_are_allowed_on_resume(four_steps, tmp_path, capsys):
    out = _copy(four_steps, tmp_path / "o")
    harmless = ("--logging_steps", "1", "--save_steps", "3", "--num_train_epochs", "5", "--report_to", "none",
                "--max_steps", "6", "--nan_policy", "skip", "--plot_loss", "true")  # fmt: skip
    assert main(_cli(out, "--resume_from_checkpoint", "true", *harmless)) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    assert (out / "loss.png").is_file()


def test_every_run_config_key_is_either_harmless_or_changes_what_a_checkpoint_means():
    assert not MEANING_KEYS & HARMLESS_KEYS
    assert set(FIELDS) == MEANING_KEYS | HARMLESS_KEYS, set(FIELDS) ^ (MEANING_KEYS | HARMLESS_KEYS)
    for key in ("model_name_or_path", "template", "lora_rank", "lora_target", "lora_alpha", "cutoff_len", "packing",
                "dataset", "finetuning_type"):  # fmt: skip
        assert key in MEANING_KEYS
    for key in ("logging_steps", "save_steps", "num_train_epochs", "eval_steps", "report_to"):
        assert key in HARMLESS_KEYS


def test_another_runs_checkpoint_is_refused(four_steps, tmp_path, capsys):
    other = _copy(four_steps, tmp_path / "other")
    mine = tmp_path / "mine"
    assert main(_cli(mine, "--max_steps", "2")) == 0
    before = _listing(mine)
    capsys.readouterr()
    # named explicitly, from the other output dir
    assert main(_cli(mine, "--resume_from_checkpoint", str(other / "checkpoint-4"))) == 2
    assert _error(capsys) == (
        f"error: resume_from_checkpoint: {other / 'checkpoint-4'} belongs to the run in {other}, not to output_dir "
        f"{mine}; resume that run there (--output_dir {other})"
    )
    # copied into this output dir: its run id is not this dir's
    shutil.copytree(other / "checkpoint-4", mine / "checkpoint-4")
    assert main(_cli(mine, "--resume_from_checkpoint", "true")) == 2
    line = _error(capsys)
    assert line.startswith(
        f"error: resume_from_checkpoint: {mine / 'checkpoint-4'} was written by another run (run id "
    )
    assert line.endswith("); it cannot continue this run")
    shutil.rmtree(mine / "checkpoint-4")
    assert _listing(mine) == before


def test_resume_true_starts_over_only_where_no_checkpoint_was_ever_completed(four_steps, tmp_path, capsys):
    # a new folder, or a run killed before its first save: from step 0, saying so
    assert main(_cli(tmp_path / "new", "--resume_from_checkpoint", "true")) == 0
    assert "no complete checkpoint in" in capsys.readouterr().err
    # a finished run without checkpoints: refused (its adapter is not replaced without --overwrite_output_dir)
    out = _copy(four_steps, tmp_path / "o")
    for checkpoint in out.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    before = _listing(out)
    assert main(_cli(out, "--resume_from_checkpoint", "true")) == 2
    assert "(the run there finished); pass --overwrite_output_dir true to train it again" in _error(capsys)
    assert _listing(out) == before


# ---------------------------------------------------------------------------------------------------------------
# Room on the disk


def _no_space(path: str) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", path)


def test_a_full_disk_while_a_checkpoint_is_written_stops_in_one_line_and_keeps_the_last_one(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "o"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f) and str(f).endswith("optimizer.pt"):
            raise _no_space(str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(_cli(out)) == 2
    line = _error(capsys)
    staged = out / ".tnlora-saving" / "checkpoint-4" / "optimizer.pt"
    assert line.startswith(f"error: output_dir: no space left on the device of {out} while writing checkpoint-4 ({staged}); "
                           "a checkpoint of this run takes about ")  # fmt: skip
    assert line.endswith(
        f"; the last complete checkpoint, {out / 'checkpoint-2'}, is intact: free some space and resume with "
        "--resume_from_checkpoint true"
    )
    assert is_complete(out / "checkpoint-2") and not (out / "checkpoint-4").exists()
    assert not (out / ".tnlora-saving").exists()  # the unfinished checkpoint's room given back
    monkeypatch.setattr(torch, "save", real_save)
    assert main(_cli(out, "--resume_from_checkpoint", "true")) == 0
    assert is_complete(out / "checkpoint-4")


def test_a_full_disk_when_the_completion_record_is_written_leaves_no_checkpoint(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "o"
    real = checkpoints.atomic_write_json

    def write(target, obj):
        if Path(target).parent.name == "checkpoint-4":
            raise _no_space(str(target))
        return real(target, obj)

    monkeypatch.setattr(checkpoints, "atomic_write_json", write)
    assert main(_cli(out)) == 2
    assert "no space left on the device" in _error(capsys)
    assert [p.name for p in checkpoints.complete_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "checkpoint-4").exists()


def test_a_full_disk_during_the_final_save_leaves_each_file_old_or_new(
    four_steps, tmp_path, capsys, monkeypatch
):
    out = _copy(four_steps, tmp_path / "o")
    before = _listing(out)
    from tnlora.train import callbacks

    def card(directory, base):
        raise _no_space(str(Path(directory) / "README.md"))

    monkeypatch.setattr(callbacks, "name_base_model_in_card", card)
    capsys.readouterr()
    assert main(_cli(out, "--resume_from_checkpoint", "true", "--max_steps", "5", "--save_steps", "100")) == 2
    assert "no space left on the device" in _error(capsys)
    after = _listing(out)
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "trainer_state.json",
        "all_results.json",
    ):
        assert after[name] == before[name], name  # the final save moved nothing into place
    assert not [p for p in out.iterdir() if p.name.endswith(".tnlora-tmp")]


def test_an_output_dir_that_cannot_be_written_is_refused_before_anything_loads(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(_cli(tmp_path / "file" / "o")) == 2
    assert _error(capsys) == (
        f"error: output_dir: {tmp_path / 'file' / 'o'} cannot be created ({tmp_path / 'file'} is a file); choose "
        "another folder"
    )
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(_cli(locked / "o")) == 2
        assert "is not writable (tnlora train writes the adapter and its checkpoints there)" in _error(capsys)


def test_a_disk_without_room_for_one_checkpoint_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checkpoints, "free_bytes", lambda path: 1 << 20)
    out = tmp_path / "o"
    assert main(_cli(out)) == 2
    line = _error(capsys)
    assert line.startswith(
        f"error: output_dir: {out} has 1.0 MB free; one checkpoint and the adapter of this run need about "
    )
    assert not list(out.glob("checkpoint-*"))
