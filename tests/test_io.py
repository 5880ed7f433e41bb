"""tnlora.io: atomic outputs are all-or-nothing and get ordinary file modes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tnlora.io import TEMP_SUFFIX, atomic_dir, atomic_files, atomic_path, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_whole_file_with_umask_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    old = os.umask(0o022)
    try:
        atomic_write_text(target, "first")
        atomic_write_json(target, {"a": 1})
    finally:
        os.umask(old)
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]  # no temp file left


def test_failed_write_leaves_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("kept")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_replaces_directory_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert target.stat().st_mode & 0o077 != 0  # not left private like a mkdtemp folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_files_replace_each_file_by_a_rename_and_nothing_on_failure(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "a.json").write_text("old a")
    (out / "keep.txt").write_text("untouched")
    with pytest.raises(RuntimeError), atomic_files(out) as staged:
        (staged / "a.json").write_text("new a")
        raise RuntimeError("interrupted")
    assert (out / "a.json").read_text() == "old a"
    moves = []
    real_replace = os.replace

    def replace(src, dst):
        moves.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with atomic_files(out, last=("a.json",)) as staged:
        (staged / "a.json").write_text("new a")
        (staged / "b.bin").write_bytes(b"new b")
        (staged / "sub").mkdir()
        (staged / "sub" / "c").write_text("c")
    assert moves == ["b.bin", "sub", "a.json"]  # one rename each, the named one last
    assert (out / "a.json").read_text() == "new a" and (out / "sub" / "c").read_text() == "c"
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.bin", "keep.txt", "sub"]  # no temp folder left
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(TEMP_SUFFIX)]
