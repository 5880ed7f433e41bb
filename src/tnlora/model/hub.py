"""Where a model name points: a preset, a local checkpoint directory, or a Hugging Face Hub id.

A Hub id (``OpenNLPLab/TransNormerLLM-7B``, how users name the model) resolves through huggingface_hub's cache
and download, as transformers resolves one: ``snapshot_download`` (files already cached are not fetched again;
with ``HF_HUB_OFFLINE=1`` only the cache is read). Only the files tnlora reads are fetched, never the
repository's Python files, which tnlora never runs. The official config.json has no ``model_type``; tnlora's
loaders read it in memory as a TransNormerLLM config (``TransnormerConfig.from_pretrained``), so the cache is
never edited.
"""

from __future__ import annotations

import re
from pathlib import Path

from tnlora.errors import ConfigError

# What a checkpoint's parts need from the Hub, by part.
HUB_FILES = {
    "config": ("config.json",),
    "tokenizer": ("*.json", "*.model", "*.jinja", "*.txt"),
    "all": ("*.json", "*.model", "*.jinja", "*.txt", "*.safetensors", "*.bin"),
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(name: str) -> bool:
    """``owner/name`` that is not a local path (LLaMA-Factory and transformers read it the same way)."""
    return bool(_REPO_ID.match(name)) and not Path(name).expanduser().exists() and ".." not in name


def model_source(name: str, key: str = "model_name_or_path") -> str:
    """The model as a run records it: a preset's canonical name, a directory's absolute path, or a Hub id (its
    config.json fetched or found in the cache, so a wrong id is refused before anything else happens)."""
    from tnlora.model.configuration import canonical_preset

    preset = canonical_preset(name)
    if preset is not None:
        return preset
    local = _local_dir(name, key)
    if local is not None:
        return local
    _snapshot(name, "config", key)
    return name


def model_dir(name: str, part: str = "all", key: str = "model_name_or_path") -> str:
    """Where ``name``'s files are on this machine: a preset's canonical name (no files), a directory's absolute
    path, or the Hub snapshot folder holding ``part`` ("config", "tokenizer" or "all") of the checkpoint."""
    from tnlora.model.configuration import canonical_preset

    preset = canonical_preset(name)
    if preset is not None:
        return preset
    # A tokenizer directory (a training run's output) holds no config.json.
    local = _local_dir(name, key, need_config=part != "tokenizer")
    return local if local is not None else _snapshot(name, part, key)


def load_model_config(name: str, key: str = "model_name_or_path"):
    """The TransnormerConfig of a preset, directory or Hub id (only config.json is read; a missing
    ``model_type``, as in the official files, is fine)."""
    from tnlora.model.configuration import TransnormerConfig, canonical_preset, config_from_preset

    where = model_dir(name, "config", key)
    if canonical_preset(where) is not None:
        return config_from_preset(where)
    try:
        return TransnormerConfig.from_pretrained(where)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{key}: cannot read {Path(where) / 'config.json'}: {str(exc).splitlines()[0]}") from None


def _local_dir(name: str, key: str, need_config: bool = True) -> str | None:
    """The absolute checkpoint directory ``name`` is, None when it is not a local path at all."""
    from tnlora.model.configuration import PRESETS

    path = Path(name).expanduser()
    if path.is_dir():
        if need_config and not (path / "config.json").is_file():
            raise ConfigError(f"{key}: {name} has no config.json (not a checkpoint directory)")
        return str(path.absolute())
    if path.exists():
        raise ConfigError(f"{key}: {name} is a file, not a checkpoint directory")
    if is_hub_id(name):
        return None
    presets = ", ".join(PRESETS)
    raise ConfigError(
        f"{key}: {name!r} is neither a preset ({presets}), a checkpoint directory nor a Hugging Face Hub id"
    )


def _snapshot(repo_id: str, part: str, key: str) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        folder = snapshot_download(repo_id, allow_patterns=list(HUB_FILES[part]), local_files_only=offline)
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise ConfigError(
            f"{key}: {repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
            "download it once online, or pass a local checkpoint directory"
        ) from None
    except GatedRepoError:
        raise ConfigError(f"{key}: {repo_id} is gated on the Hugging Face Hub; log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{key}: {repo_id!r} is neither a local directory nor a model on the Hugging Face Hub"
        ) from None
    except (RevisionNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot fetch {repo_id}: {str(exc).splitlines()[0]}") from None
    if not (Path(folder) / "config.json").is_file():
        raise ConfigError(f"{key}: {repo_id} has no config.json (not a checkpoint)")
    return folder
