"""Atomic file output: write to a temporary path beside the target, then rename over it.

A process killed at any moment leaves the old file or the new one, never a truncated one; what it leaves besides
is a temporary entry named ``.<name>.<random>.tnlora-tmp`` (``TEMP_SUFFIX``), which ``tnlora.outputs`` knows
as tnlora's own leftover.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The suffix of every temporary entry these writers create beside a target (recognisable as tnlora's).
TEMP_SUFFIX = ".tnlora-tmp"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path in the target's folder; on success rename it onto ``target``.

    On any exception the temporary file is removed and ``target`` is left untouched, so a reader never
    sees a half-written file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        if tmp_path.exists():
            tmp_path.chmod(0o666 & ~_umask())
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(target: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON to ``target`` atomically."""
    atomic_write_text(target, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` as a whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(source: Path, target: Path) -> None:
    """Move the folder ``source`` to ``target`` (same filesystem), replacing a folder there: the old one is
    renamed aside first, so ``target`` is always a whole folder, the old or the new (or, for the instant
    between the two renames, absent)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old{TEMP_SUFFIX}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike[str], last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder inside ``directory``; on success every file written there replaces its
    namesake in ``directory`` by one rename each (``last`` names the files moved after all others), so each
    file is either the old one or the new one whenever the process stops. On an exception nothing moves."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".files.", suffix=TEMP_SUFFIX, dir=directory))
    try:
        yield tmp
        # (entries written into the private folder got the ordinary modes of their writers)
        names = sorted(p.name for p in tmp.iterdir())
        for name in sorted(names, key=lambda n: n in last):
            if (tmp / name).is_dir():
                replace_dir(tmp / name, directory / name)
            else:
                os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(directory: str | os.PathLike[str]) -> None:
    """Flush every file under ``directory``, and the folders themselves, to the disk (a power cut after this
    cannot leave them partly written)."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for folder in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
        fsync_dir(folder)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it) to the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
