"""Checkpoints that count only when complete, the one a run resumes from, and what a resume may change.

A checkpoint is written where no reader looks, then renamed into place in one step. The Trainer writes its
files into ``<output_dir>/.tnlora-saving/checkpoint-N`` (``trainer.trainer_class()`` points its checkpoint
folder there); tnlora adds, last, ``tnlora_checkpoint.json`` (the completion record: step, run id, files),
flushes everything to the disk and renames the folder to ``<output_dir>/checkpoint-N``. A process killed at any
moment therefore leaves either no ``checkpoint-N`` or a complete one, and an interrupted save only a folder in
``.tnlora-saving``, which the next save (or claiming the output dir) removes. A
``checkpoint-N`` without the record (one copied in part, or written by other tools) is incomplete too:
``--resume_from_checkpoint true`` skips every incomplete checkpoint in favour of the last complete one, saying
so in one line.

Resuming is refused when the checkpoint belongs to another run (it sits in another output dir, or its run id
is not the output dir's) or when the run config changes what the checkpoint means (``MEANING_KEYS``: the base
model, the data and its encoding, the fine-tuning method, the step ↔ data mapping, the optimizer and schedule
that the checkpoint restores); the other keys (``HARMLESS_KEYS``: logging, saving, evaluation, the run's
length, implementation and memory choices) may change.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from tnlora.config import RunConfig, read_run_config
from tnlora.errors import ConfigError, OutputError
from tnlora.io import atomic_write_json, fsync_dir, fsync_tree, replace_dir
from tnlora.outputs import STAGING, is_leftover, owned_entries, run_id_of

RECORD = "tnlora_checkpoint.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# Keys whose change makes a checkpoint mean something else: refused on resume.
MEANING_KEYS = frozenset({
    # the model and the method
    "model_name_or_path", "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target",
    "additional_target", "use_dora", "use_rslora", "freeze_trainable_layers", "add_special_tokens",
    # the base the adapter was fitted to: LoRA weights trained on a 4-bit base would continue on other weights
    "quantization_bit", "quantization_method", "quantization_type", "double_quantization",
    # the data and how it is encoded, split, ordered and batched (a step is a fixed slice of the data)
    "dataset", "dataset_dir", "dedup", "template", "system", "cutoff_len", "max_samples", "val_size", "packing",
    "train_on_prompt", "mask_history", "seed", "per_device_train_batch_size", "gradient_accumulation_steps",
    # what the checkpoint's optimizer and scheduler state restores (a change would be silently overridden)
    "optim", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps",
    "weight_decay", "adam_beta1", "adam_beta2", "stage",
    # how the optimizer state and weights are laid out in the checkpoint (DDP, DeepSpeed or FSDP files)
    *("deepspeed", "fsdp", "fsdp_config"),
})  # fmt: skip
# Keys a resumed run may change: logging, saving, evaluation, how long it runs, how it runs.
HARMLESS_KEYS = frozenset({
    "trust_remote_code", "attention_impl", "lora_kernel", "fp8", "eval_dataset", "dataset_cache_dir", "overwrite_cache",
    "preprocessing_num_workers", "per_device_eval_batch_size", "num_train_epochs", "max_steps", "max_grad_norm",
    "nan_policy", "nan_skip_limit", "bf16", "fp16", "gradient_checkpointing", "use_unsloth_gc", "torch_compile",
    "checkpoint_regions", "uncheckpointed_layers", "dataloader_num_workers", "ddp_timeout",
    "ddp_find_unused_parameters", "eval_strategy", "eval_steps", "save_strategy", "save_steps", "save_total_limit",
    "save_only_model", "logging_strategy", "logging_steps", "logging_dir", "include_num_input_tokens_seen",
    "run_name", "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "report_to", "plot_loss",
    "sample_prompts", "sample_max_new_tokens", "do_train", "do_predict", "predict_with_generate", "max_new_tokens",
})  # fmt: skip
# MEANING_KEYS whose None is a choice, not a value left open for the defaults (no quantization; no engine: the
# Trainer's own optimizer.pt instead of DeepSpeed's or FSDP's files).
NONE_IS_A_CHOICE = frozenset({"quantization_bit", "deepspeed", "fsdp", "fsdp_config"})
RESUME_FLAG = "--resume_from_checkpoint true"


def _say(message: str) -> None:
    from tnlora.train import distributed

    if distributed.is_main():  # several processes: the run's messages once
        print(message, file=sys.stderr, flush=True)


def new_run_id() -> str:
    """A fresh id for a run that starts from step 0 (kept in the output dir's marker and its checkpoints)."""
    return uuid.uuid4().hex


# ------------------------------------------------------------------------------------------------------------
# Complete and incomplete checkpoints


def checkpoint_step(path: str | Path) -> int | None:
    """N of a ``checkpoint-N`` folder name, else None."""
    match = _CHECKPOINT.match(Path(path).name)
    return int(match.group(1)) if match else None


def read_record(checkpoint: str | Path) -> dict[str, Any] | None:
    """The completion record of ``checkpoint`` (None when it has none or it is unreadable)."""
    try:
        record = json.loads((Path(checkpoint) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_complete(checkpoint: str | Path) -> bool:
    """A checkpoint folder whose record is there, names its step and lists only files that are there."""
    checkpoint = Path(checkpoint)
    record = read_record(checkpoint)
    if record is None or record.get("step") != checkpoint_step(checkpoint):
        return False
    files = record.get("files")
    return isinstance(files, list) and all((checkpoint / str(f)).is_file() for f in files)


def _checkpoint_dirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete ``checkpoint-N`` folders of ``output_dir``, by step."""
    return [p for p in _checkpoint_dirs(Path(output_dir)) if is_complete(p)]


def last_complete(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def incomplete_checkpoints(output_dir: str | Path) -> list[str]:
    """What stands for an incomplete checkpoint in ``output_dir``: ``checkpoint-N`` folders without a complete
    record, and saves that were interrupted (still in the staging folder), each with the reason."""
    out = Path(output_dir)
    found = [f"{p.name} (no complete {RECORD})" for p in _checkpoint_dirs(out) if not is_complete(p)]
    found += [f"{p.name} (its save was interrupted)" for p in _checkpoint_dirs(out / STAGING)]
    return found


# ------------------------------------------------------------------------------------------------------------
# Writing: staging folder → completion record → rename into place


def start_staging(output_dir: str | Path) -> Path:
    """An empty staging folder in ``output_dir`` (what an interrupted save left there is removed)."""
    staging = Path(output_dir) / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def end_staging(output_dir: str | Path) -> None:
    """Remove the staging folder (and whatever an unfinished save left in it)."""
    shutil.rmtree(Path(output_dir) / STAGING, ignore_errors=True)


def commit(staged: Path, final: Path, *, run_id: str | None) -> None:
    """Complete the checkpoint assembled in ``staged`` and move it to ``final``: its files are flushed to the
    disk, the record is written (and flushed) last, and one rename puts the whole folder in place (a folder
    already at ``final``, from a run resumed from an earlier step, is replaced)."""
    fsync_tree(staged)
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    _write_record(staged, {"step": checkpoint_step(final), "run_id": run_id, "files": files})
    replace_dir(staged, final)
    fsync_dir(final.parent)


def _write_record(checkpoint: Path, record: dict[str, Any]) -> None:
    atomic_write_json(checkpoint / RECORD, record)
    fd = os.open(checkpoint / RECORD, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(checkpoint)


def commit_in_place(checkpoint: Path, *, run_id: str | None) -> None:
    """Complete a checkpoint written in place (runs of several processes): flushed, then the record last."""
    fsync_tree(checkpoint)
    files = sorted(
        str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file() and p.name != RECORD
    )
    _write_record(checkpoint, {"step": checkpoint_step(checkpoint), "run_id": run_id, "files": files})


def rotate(output_dir: str | Path, limit: int | None, keep: Path) -> None:
    """``save_total_limit``: remove the oldest complete checkpoints (by step) until ``limit`` are left, never
    ``keep`` (the one just saved). Each is renamed into the staging folder before it is deleted, so a kill
    midway never leaves a half-deleted folder that still looks complete."""
    if not limit or limit <= 0:
        return
    others = [p for p in complete_checkpoints(output_dir) if p != keep]
    excess = len(others) + 1 - limit
    if excess <= 0:
        return
    trash = Path(output_dir) / STAGING / "removed"
    trash.mkdir(parents=True, exist_ok=True)
    for path in others[:excess]:
        os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def checkpoint_bytes(checkpoint: str | Path) -> int:
    """The size of a checkpoint folder's files."""
    return sum(p.stat().st_size for p in Path(checkpoint).rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------------------
# Choosing the checkpoint to resume from


def resume_point(setting: bool | str, output_dir: Path) -> tuple[str | None, bool]:
    """The checkpoint that ``resume_from_checkpoint`` names (``True``: the last complete one in
    ``output_dir``, incomplete later ones skipped with one line) and whether the run instead starts again from
    step 0: with ``True``, when ``output_dir`` is new, empty or holds this verb's unfinished run that never
    completed a checkpoint (killed before its first save). Refusals are one line naming the key."""
    if setting is True:
        last = last_complete(output_dir)
        after = _step_of(last.name) if last is not None else -1
        later = [s for s in incomplete_checkpoints(output_dir) if _step_of(s) > after]
        skipped = ", ".join(later)
        if last is not None:
            if later:
                _say(f"resume_from_checkpoint: skipping the incomplete {skipped}; resuming from {last.name}")
            return str(last), False
        entries = (
            [p.name for p in output_dir.iterdir() if not is_leftover(p.name)] if output_dir.is_dir() else []
        )
        if entries and owned_entries(output_dir, "train") is None:
            raise ConfigError(f"resume_from_checkpoint: no checkpoint-N folder in {output_dir} to resume from")
        if (output_dir / "trainer_state.json").is_file():
            raise ConfigError(
                f"resume_from_checkpoint: no complete checkpoint-N folder in {output_dir} to resume from "
                "(the run there finished); pass --overwrite_output_dir true to train it again"
            )
        why = f"the incomplete {skipped} skipped" if later else "the run stopped before its first save"
        _say(f"resume_from_checkpoint: no complete checkpoint in {output_dir} yet ({why}); starting from step 0")
        return None, True
    checkpoint = Path(str(setting))
    if not (checkpoint / "trainer_state.json").is_file():
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} is not a checkpoint (no trainer_state.json)")
    if not is_complete(checkpoint):
        raise ConfigError(
            f"resume_from_checkpoint: {checkpoint} is incomplete (no complete {RECORD}: its save was "
            f"interrupted); {RESUME_FLAG} resumes from the last complete one"
        )
    return str(checkpoint), False


def _step_of(description: str) -> int:
    return checkpoint_step(description.split(" ", 1)[0]) or 0


def check_owner(checkpoint: str | Path, output_dir: Path) -> None:
    """Refuse a checkpoint that belongs to another run than the one in ``output_dir``: one that sits in
    another folder, or whose recorded run id is not the output dir's."""
    checkpoint = Path(checkpoint)
    home = checkpoint.parent
    if os.path.realpath(home) != os.path.realpath(output_dir):
        raise ConfigError(
            f"resume_from_checkpoint: {checkpoint} belongs to the run in {home}, not to output_dir "
            f"{output_dir}; resume that run there (--output_dir {home})"
        )
    record = read_record(checkpoint) or {}
    theirs, ours = record.get("run_id"), run_id_of(output_dir)
    if theirs and ours and theirs != ours:
        raise ConfigError(
            f"resume_from_checkpoint: {checkpoint} was written by another run (run id {theirs}) than the one "
            f"that owns {output_dir} (run id {ours}); it cannot continue this run"
        )


def resume_differences(saved: RunConfig, cfg: RunConfig) -> list[str]:
    """The ``MEANING_KEYS`` whose value in ``cfg`` differs from the checkpoint's run config, as ``key old →
    new`` (keys that ``cfg`` leaves open, None, are compared once they are resolved)."""
    changes = []
    for key in sorted(MEANING_KEYS):
        new, old = getattr(cfg, key), getattr(saved, key)
        if (new is not None or key in NONE_IS_A_CHOICE) and new != old:
            changes.append(f"{key} {_shown(old)} → {_shown(new)}")
    return changes


def _shown(value: Any) -> str:
    return "null" if value is None else str(value)


def check_resume_config(checkpoint: str | Path, cfg: RunConfig) -> None:
    """Refuse to resume ``checkpoint`` with a config that changes what it means, compared with the run's saved
    ``tnlora_run.yaml`` (in the checkpoint's output dir: a resume rewrites it only with harmless changes)."""
    checkpoint = Path(checkpoint)
    source = checkpoint.parent
    try:
        saved = read_run_config(source)
    except ConfigError as exc:
        raise ConfigError(
            f"resume_from_checkpoint: the run config saved with {checkpoint} is unreadable ({exc})"
        ) from None
    if saved is None:
        return
    changes = resume_differences(saved, cfg)
    if changes:
        raise ConfigError(
            f"resume_from_checkpoint: {checkpoint} was trained with other settings, and these change what it "
            f"means: {'; '.join(changes)} (resume with the values in {source / 'tnlora_run.yaml'}, or start a "
            "new run in another output_dir)"
        )


# ------------------------------------------------------------------------------------------------------------
# Room for the output

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
# Checkpoint bytes per trainable parameter: the fp32 weight and AdamW's two fp32 moments, plus the fp32 weight
# of the final save; and what does not grow with the model (tokenizer files, run files).
BYTES_PER_TRAINABLE = 4 + 8 + 4
FIXED_BYTES = 64 << 20


def check_writable(output_dir: str | Path) -> None:
    """Refuse an output dir that cannot be created or written, before anything is loaded."""
    out = Path(output_dir)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe != out and not probe.is_dir():
        raise OutputError(f"output_dir: {out} cannot be created ({probe} is a file); choose another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = out if probe == out else f"{out} cannot be created: {probe}"
        raise OutputError(
            f"output_dir: {where} is not writable (tnlora train writes the adapter and its checkpoints "
            "there); choose another folder or change its permissions"
        )


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem holding ``path``."""
    return shutil.disk_usage(path).free


def check_free_space(output_dir: str | Path, trainable_params: int) -> None:
    """Refuse a run whose output dir has no room for one checkpoint and the final adapter (estimated from the
    trainable parameters; a run with more saves needs room for ``save_total_limit`` of them)."""
    need = trainable_params * BYTES_PER_TRAINABLE + FIXED_BYTES
    free = free_bytes(output_dir)
    if free < need:
        raise OutputError(
            f"output_dir: {output_dir} has {_size(free)} free; one checkpoint and the adapter of this run need "
            f"about {_size(need)}: free some space or choose another output_dir"
        )


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def storage_error(exc: OSError, output_dir: str | Path, writing: str) -> OutputError | None:
    """One line for a write that failed for want of space or permission (None for other errors): the path,
    what it needs, and the last complete checkpoint, which is intact."""
    out = Path(output_dir)
    last = last_complete(out)
    if exc.errno in _NO_SPACE:
        size = (
            f"; a checkpoint of this run takes about {_size(checkpoint_bytes(last))}"
            if last is not None
            else ""
        )
        problem = f"no space left on the device of {out} while writing {writing}{size}"
        remedy = "free some space"
    elif exc.errno in _NOT_WRITABLE:
        problem = f"{exc.filename or out} is not writable ({exc.strerror}) while writing {writing}"
        remedy = "make it writable"
    else:
        return None
    if last is not None:
        tail = f"the last complete checkpoint, {last}, is intact: {remedy} and resume with {RESUME_FLAG}"
    else:
        tail = f"no checkpoint was completed yet: {remedy} and run again"
    return OutputError(f"output_dir: {problem}; {tail}")
