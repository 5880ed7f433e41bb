"""tnlora.outputs: only an earlier output of the same verb, holding nothing else, is ever replaced; inputs and
the current folder never are; nothing is deleted at check time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tnlora.errors import TnloraError
from tnlora.outputs import (
    MARKER,
    check_output_file,
    claim_dir,
    clear_previous,
    foreign_entries,
    leftovers,
    owned_entries,
    plan_dir,
    run_id_of,
)


def plan(directory: Path, overwrite: bool = True, **kwargs):
    return plan_dir(directory, "merge", key="--output", overwrite=overwrite, overwrite_flag="--overwrite", **kwargs)


def earlier_output(directory: Path) -> Path:
    directory.mkdir()
    (directory / "model.safetensors").write_text("w")
    (directory / "sub").mkdir()
    (directory / "sub" / "f").write_text("x")
    claim_dir(directory, "merge")
    return directory


def test_new_and_empty_directories_need_nothing(tmp_path):
    assert plan(tmp_path / "new").remove == []
    (tmp_path / "empty").mkdir()
    assert plan(tmp_path / "empty", overwrite=False).remove == []


def test_the_marker_lists_what_was_written_and_overwrite_removes_exactly_that(tmp_path):
    out = earlier_output(tmp_path / "m")
    marker = json.loads((out / MARKER).read_text())
    assert marker["verb"] == "merge" and marker["files"] == sorted(["model.safetensors", "sub", MARKER])
    with pytest.raises(TnloraError, match=r"holds an earlier tnlora merge output; pass --overwrite$"):
        plan(out, overwrite=False)
    chosen = plan(out)
    assert sorted(p.name for p in chosen.remove) == sorted([MARKER, "model.safetensors", "sub"])
    assert (out / "sub" / "f").is_file()  # planning deletes nothing
    clear_previous(chosen)
    assert list(out.iterdir()) == []


def test_files_of_the_users_are_never_removed(tmp_path):
    out = earlier_output(tmp_path / "m")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TnloraError) as info:
        plan(out)
    assert str(info.value) == (
        f"--output: {out} holds files tnlora did not write (notes.txt); not replacing it: move them or choose "
        "another folder"
    )
    assert foreign_entries(out, "merge") == ["notes.txt"]
    unmarked = tmp_path / "data"
    unmarked.mkdir()
    for name in ("a.json", "b.json", "c.json", "d.json"):
        (unmarked / name).write_text("[]")
    with pytest.raises(TnloraError, match=r"not written by tnlora merge \(it holds a.json, b.json, c.json and 1 more\)"):
        plan(unmarked)
    assert len(list(unmarked.iterdir())) == 4


def test_another_verbs_output_is_not_replaced(tmp_path):
    out = earlier_output(tmp_path / "m")
    assert owned_entries(out, "train") is None
    with pytest.raises(TnloraError, match="was not written by tnlora train"):
        plan_dir(out, "train", key="output_dir", overwrite=True, overwrite_flag="x")


def test_inputs_and_the_current_folder_are_refused(tmp_path, monkeypatch):
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    for target, what in ((base, "the base model"), (tmp_path / "models", "the base model")):
        with pytest.raises(TnloraError, match=f"holds {what}"):
            plan(target, inputs={"the base model": base})
    monkeypatch.chdir(base)
    for target in (Path("."), Path(".."), Path(str(tmp_path))):
        with pytest.raises(TnloraError, match=r"the current folder|a folder above the current one"):
            plan(target)
    assert plan(Path("merged")).remove == []  # a new folder inside the current one is fine


def test_output_files(tmp_path, monkeypatch):
    kwargs = {"key": "--output", "overwrite_flag": "--overwrite", "is_ours": lambda p: p.read_text() == "ours",
              "what": "replies"}  # fmt: skip
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TnloraError, match=r"^--output: \. is a directory; name a file for replies$"):
        check_output_file(".", overwrite=True, **kwargs)
    check_output_file("new.jsonl", overwrite=False, **kwargs)
    Path("ours.jsonl").write_text("ours")
    Path("theirs.jsonl").write_text("theirs")
    with pytest.raises(TnloraError, match="exists; pass --overwrite"):
        check_output_file("ours.jsonl", overwrite=False, **kwargs)
    check_output_file("ours.jsonl", overwrite=True, **kwargs)
    with pytest.raises(TnloraError, match="is not replies written by tnlora"):
        check_output_file("theirs.jsonl", overwrite=True, **kwargs)


def test_leftovers_of_interrupted_writes_are_tnloras_and_removed_at_the_next_claim(tmp_path):
    out = earlier_output(tmp_path / "m")
    (out / ".model.safetensors.abc123.tnlora-tmp").write_text("half")  # a kill inside an atomic write
    (out / ".tnlora-saving").mkdir()  # a kill inside a checkpoint save
    assert foreign_entries(out, "merge") == []
    assert sorted(p.name for p in leftovers(out)) == [".model.safetensors.abc123.tnlora-tmp", ".tnlora-saving"]
    assert ".tnlora-saving" not in json.loads((out / MARKER).read_text())["files"]
    clear_previous(plan(out))
    assert list(out.iterdir()) == []
    # a folder holding nothing but leftovers is as good as empty
    new = tmp_path / "new"
    new.mkdir()
    (new / ".tnlora_output.json.x1.tnlora-tmp").write_text("")
    assert plan(new, overwrite=False).remove == []


def test_the_run_id_stays_with_the_folder_when_the_marker_is_refreshed(tmp_path):
    claim_dir(tmp_path / "o", "train", run_id="abc")
    (tmp_path / "o" / "checkpoint-1").mkdir()
    claim_dir(tmp_path / "o", "train")
    assert run_id_of(tmp_path / "o") == "abc"
    assert "checkpoint-1" in json.loads((tmp_path / "o" / MARKER).read_text())["files"]
