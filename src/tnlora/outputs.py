"""What tnlora may write over: only its own earlier outputs, and never an input.

Every directory tnlora writes (a training run, a merged model) gets a marker, ``tnlora_output.json``, written
before anything else and listing the entries tnlora wrote there (kept up to date while a run saves). Replacing
a directory removes exactly those entries, and only when the marker names the same verb; a directory holding
anything else (no marker, another verb's marker, or entries the marker does not list) is refused with one line
naming a few of them, so a user's files are never deleted. Inputs (the base model, the adapter, the data) and
the current folder are never valid outputs. Output files (``generate``'s JSONL, ``eval``'s metrics) are
replaced only when they are recognisably the same verb's output.

Nothing here deletes at check time: callers check first, load and validate everything else, then call
:func:`clear_previous` and :func:`claim_dir`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tnlora.errors import TnloraError
from tnlora.io import TEMP_SUFFIX, atomic_write_json

MARKER = "tnlora_output.json"
# Where a training run assembles a checkpoint before renaming it into place (``tnlora.train.checkpoints``).
STAGING = ".tnlora-saving"
# What a write interrupted by a kill leaves behind (``tnlora.io``'s temporary entries, a checkpoint being
# assembled): tnlora's own, in any output folder, removed when the folder is next claimed.
LEFTOVER_PATTERNS = (f"*{TEMP_SUFFIX}", STAGING)
# Entries a training run writes under names of its own: recognised as the run's even where the marker has not
# listed them yet (a run killed between a checkpoint save and the marker update).
TRAIN_OUTPUT_PATTERNS = ("checkpoint-*", "runs", "samples.jsonl")
# What a training output dir written before markers existed holds (recognised by its tnlora_run.yaml).
_LEGACY_TRAIN_OUTPUTS = (
    "tnlora_run.yaml", "template.json", "trainer_state.json", "adapter_config.json", "adapter_model.safetensors",
    "README.md", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", "all_results.json", "train_results.json", "eval_results.json", "loss.png",
    "training_args.bin", "config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
    "model.safetensors.index.json", *TRAIN_OUTPUT_PATTERNS,
)  # fmt: skip
_SHOWN = 3  # foreign entries named in a refusal


@dataclass
class OutputPlan:
    """What writing ``directory`` will do: the previous output's entries to remove first (none when it is new,
    empty or resumed)."""

    directory: Path
    verb: str
    remove: list[Path] = field(default_factory=list)


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def is_leftover(name: str) -> bool:
    """Whether an entry's name is that of tnlora's temporary entries (``LEFTOVER_PATTERNS``)."""
    return _matches(name, LEFTOVER_PATTERNS)


def leftovers(directory: str | Path) -> list[Path]:
    """tnlora's own temporary entries in ``directory``, left by a write that a kill interrupted."""
    return [Path(directory) / e for e in _entries(Path(directory)) if is_leftover(e)]


def read_marker(directory: Path) -> dict | None:
    """The marker of ``directory`` (None when there is none or it is unreadable)."""
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def owned_entries(directory: Path, verb: str) -> set[str] | None:
    """The entries of ``directory`` that an earlier ``tnlora <verb>`` wrote, or None when it is not such an output."""
    marker = read_marker(directory)
    entries = _entries(directory)
    if marker is None:
        if verb == "train" and "tnlora_run.yaml" in entries:
            return {e for e in entries if _matches(e, (*_LEGACY_TRAIN_OUTPUTS, *LEFTOVER_PATTERNS))}
        return None
    if marker.get("verb") != verb:
        return None
    owned = {str(f) for f in marker.get("files", [])} | {MARKER} | {e for e in entries if is_leftover(e)}
    if verb == "train":
        owned |= {e for e in entries if _matches(e, TRAIN_OUTPUT_PATTERNS)}
    return owned & set(entries)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_not_an_input(path: Path, key: str, inputs: Mapping[str, str | Path | None]) -> None:
    """Refuse an output that is, or contains, the current folder or one of ``inputs`` ({what: path})."""
    target = Path(os.path.realpath(path))
    cwd = Path(os.path.realpath(Path.cwd()))
    if target == cwd or target in cwd.parents:
        what = "the current folder" if target == cwd else "a folder above the current one"
        raise TnloraError(f"{key}: {path} is {what}; name a new folder for the output")
    for what, value in inputs.items():
        if not value:
            continue
        source = Path(os.path.realpath(Path(value).expanduser()))
        if target == source or target in source.parents:
            raise TnloraError(f"{key}: {path} holds {what} ({value}); choose another folder for the output")


def plan_dir(
    directory: str | Path,
    verb: str,
    *,
    key: str,
    overwrite: bool,
    overwrite_flag: str,
    inputs: Mapping[str, str | Path | None] | None = None,
    resume: bool = False,
) -> OutputPlan:
    """Check that ``directory`` may receive ``tnlora <verb>``'s output; nothing is deleted here.

    New or empty: fine. Non-empty: refused unless ``overwrite`` (or ``resume``, which keeps everything), and even
    then only when it is an earlier output of the same verb holding nothing tnlora did not write.
    """
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise TnloraError(f"{key}: {out} exists and is not a directory")
    check_not_an_input(out, key, inputs or {})
    # A folder holding only what an interrupted write of tnlora's left is as good as empty.
    entries = [e for e in _entries(out) if not is_leftover(e)]
    if not entries or resume:
        return OutputPlan(out, verb)
    owned = owned_entries(out, verb)
    if owned is None:
        raise TnloraError(
            f"{key}: {out} is not empty and was not written by tnlora {verb} (it holds {_shown(entries)}); "
            "not touching it: choose another folder"
        )
    foreign = [e for e in entries if e not in owned]
    if foreign:
        raise TnloraError(
            f"{key}: {out} holds files tnlora did not write ({_shown(foreign)}); not replacing it: move them "
            "or choose another folder"
        )
    if not overwrite:
        raise TnloraError(f"{key}: {out} holds an earlier tnlora {verb} output; pass {overwrite_flag}")
    return OutputPlan(out, verb, remove=[out / e for e in sorted(owned)])


def clear_previous(plan: OutputPlan) -> None:
    """Remove the earlier output's entries listed in ``plan`` and tnlora's leftovers of interrupted writes (the
    marker last, so an interrupted removal still leaves a directory recognised as tnlora's)."""
    stale = [p for p in leftovers(plan.directory) if p not in plan.remove]
    for path in sorted([*stale, *plan.remove], key=lambda p: p.name == MARKER):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def claim_dir(directory: str | Path, verb: str, exclude: Iterable[str] = (), run_id: str | None = None) -> None:
    """Write (or refresh) the marker of ``directory``: it lists every entry there but ``exclude`` (entries that
    were there before this output began, e.g. when resuming into a directory with other files) and tnlora's
    leftovers. ``run_id`` names the run that owns the folder (a training run's checkpoints carry it); a refresh
    without one keeps the marker's."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    skip = set(exclude)
    files = sorted({*[e for e in _entries(directory) if e not in skip and not is_leftover(e)], MARKER})
    from tnlora import __version__

    marker = {"written_by": f"tnlora {verb}", "verb": verb, "version": __version__, "files": files}
    run_id = run_id or run_id_of(directory)
    if run_id:
        marker["run_id"] = run_id
    atomic_write_json(directory / MARKER, marker)


def run_id_of(directory: str | Path) -> str | None:
    """The id of the run that owns ``directory`` (from its marker), or None."""
    marker = read_marker(Path(directory))
    value = marker.get("run_id") if marker else None
    return value if isinstance(value, str) else None


def foreign_entries(directory: str | Path, verb: str) -> list[str]:
    """Entries of ``directory`` that are not an earlier ``tnlora <verb>`` output's (all of them when unmarked)."""
    directory = Path(directory)
    owned = owned_entries(directory, verb) or set()
    return [e for e in _entries(directory) if e not in owned]


# ---------------------------------------------------------------------------------------------------------------
# Output files


def check_output_file(
    path: str | Path,
    *,
    key: str,
    overwrite: bool,
    overwrite_flag: str,
    is_ours: Callable[[Path], bool],
    what: str,
) -> None:
    """Refuse a file output that is a directory, or an existing file unless ``overwrite`` and ``is_ours``."""
    path = Path(path)
    if path.is_dir() or not path.name or path.name in (".", ".."):
        raise TnloraError(f"{key}: {path} is a directory; name a file for {what}")
    if not path.exists():
        return
    if not overwrite:
        raise TnloraError(f"{key}: {path} exists; pass {overwrite_flag}")
    if not is_ours(path):
        raise TnloraError(f"{key}: {path} exists and is not {what} written by tnlora; not replacing it")
