"""Read instruction data into ``Conversation`` objects, validating every record where it enters.

Accepted inputs (``load_conversations``):
- JSON arrays or JSON Lines of alpaca records (instruction/input/output, optional system and history),
  sharegpt records (``conversations``: from/value with human/gpt/system) or OpenAI records
  (``messages``: role/content with system/user/assistant); Parquet/CSV/Arrow files via ``datasets``;
- a ``datasets`` directory written by ``save_to_disk``, or a folder of data files;
- a name registered in ``<dataset_dir>/dataset_info.json`` (LLaMA-Factory's registry: ``file_name``,
  ``formatting``, ``columns``, ``tags``, ``split``, ``num_samples``), or a comma-separated list of any of these.

Every problem is one ``DataError`` line naming the file, the record (1-based) and the field.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tnlora.errors import DataError

logger = logging.getLogger(__name__)

REGISTRY_FILE = "dataset_info.json"
_JSON_SUFFIXES = (".json", ".jsonl")
_DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
# LLaMA-Factory's alpaca column defaults (registry entries may override them).
_ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}


@dataclass(frozen=True, slots=True)
class Message:
    """One turn: role "user" or "assistant" (system text lives in ``Conversation.system``)."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Conversation:
    """Alternating user/assistant messages, starting with user and ending with assistant.

    ``system`` is None when the record has none (the template's default applies); ``source`` says where the
    record came from ("<file>, record <n>").
    """

    messages: list[Message]
    system: str | None
    source: str


class EmptyReplyError(DataError):
    """A record whose reply (an assistant turn) is empty or whitespace only."""


@dataclass
class ReadReport:
    """What reading produced: records seen, conversations kept, records skipped (with the first reason; how many
    for an empty reply)."""

    records: int = 0
    conversations: int = 0
    skipped: int = 0
    first_error: str | None = None
    empty_replies: int = 0

    def add(self, other: ReadReport) -> None:
        self.records += other.records
        self.conversations += other.conversations
        self.skipped += other.skipped
        self.first_error = self.first_error or other.first_error
        self.empty_replies += other.empty_replies

    def summary(self) -> str:
        line = f"{self.conversations} conversations from {self.records} records"
        if self.skipped:
            line += f"; skipped {self.skipped} invalid record(s), first: {self.first_error}"
        return line


@dataclass(frozen=True)
class RecordFormat:
    """How a record maps to a conversation: LLaMA-Factory's ``formatting`` + ``columns`` + ``tags``.

    ``formatting`` "auto" (plain files) guesses per file: ``messages``/``conversations`` → sharegpt with
    either tag vocabulary, otherwise alpaca with optional ``system`` and ``history``.
    """

    formatting: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Public entry points


def load_conversations(
    dataset: str | list[str],
    dataset_dir: str | os.PathLike[str] | None = None,
    skip_invalid: bool = False,
) -> list[Conversation]:
    """Read one or more datasets (see the module docstring) into conversations, in order.

    With ``skip_invalid`` bad records are skipped and counted (logged with the first reason) instead of
    stopping at the first one; file-level problems (unreadable file, broken JSON array) always stop.
    """
    conversations, report = read_conversations(dataset, dataset_dir, skip_invalid)
    if report.skipped:
        logger.warning("%s", report.summary())
    else:
        logger.info("%s", report.summary())
    return conversations


def read_conversations(
    dataset: str | list[str],
    dataset_dir: str | os.PathLike[str] | None = None,
    skip_invalid: bool = False,
) -> tuple[list[Conversation], ReadReport]:
    """Like ``load_conversations`` but also returns the ``ReadReport`` (for `tnlora data inspect`)."""
    names = _split_names(dataset)
    if not names:
        raise DataError(str(dataset), "no dataset given")
    out: list[Conversation] = []
    report = ReadReport()
    for name in names:
        for path, fmt, limit, split in _resolve(name, dataset_dir):
            convs, part = _read_source(path, fmt, split, skip_invalid)
            if limit is not None:
                convs = convs[:limit]
                part.conversations = len(convs)
            out.extend(convs)
            report.add(part)
    if not out:
        detail = f" ({report.skipped} invalid, first: {report.first_error})" if report.skipped else ""
        raise DataError(", ".join(names), f"the dataset is empty: no usable records{detail}")
    return out, report


# --------------------------------------------------------------------------------------------------------------
# Resolving names: registry entries, files, folders


def _split_names(dataset: str | list[str]) -> list[str]:
    items = dataset if isinstance(dataset, list) else [dataset]
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def _resolve(
    name: str, dataset_dir: str | os.PathLike[str] | None
) -> list[tuple[Path, RecordFormat, int | None, str]]:
    """(path, format, num_samples, split) for one dataset name or path."""
    base = Path(dataset_dir) if dataset_dir is not None else None
    registry = _load_registry(base) if base is not None else None
    if base is not None and registry is not None and name in registry:
        return [_registry_entry(base / REGISTRY_FILE, name, registry[name], base)]
    candidates = [Path(name)] + ([base / name] if base is not None else [])
    for candidate in candidates:
        if candidate.exists():
            return [(candidate, RecordFormat(), None, "train")]
    if base is not None and registry is not None:
        known = ", ".join(sorted(registry)[:8]) + (", ..." if len(registry) > 8 else "")
        raise DataError(
            str(base / REGISTRY_FILE),
            f"unknown dataset '{name}': not a file and not registered here (known: {known})",
        )
    where = f" (dataset_dir {base} has no {REGISTRY_FILE})" if base is not None else ""
    raise DataError(name, f"no such file or directory, and no dataset registry to look the name up in{where}")


def _load_registry(base: Path) -> dict[str, Any] | None:
    path = base / REGISTRY_FILE
    if not path.is_file():
        return None
    registry = _parse_json(path, _read_text(path))
    if not isinstance(registry, dict):
        raise DataError(str(path), "expected a JSON object mapping dataset names to entries")
    return registry


def _registry_entry(
    registry_path: Path, name: str, entry: Any, base: Path
) -> tuple[Path, RecordFormat, int | None, str]:
    where = f"dataset '{name}'"
    if not isinstance(entry, dict):
        raise DataError(str(registry_path), f"{where}: entry must be a JSON object", field=name)
    file_name = entry.get("file_name")
    if file_name is None:
        hub = [k for k in _HUB_KEYS if entry.get(k)]
        if hub:
            raise DataError(
                str(registry_path),
                f"{where} is hub-only ({hub[0]}: {entry[hub[0]]}); it needs a local file: download it "
                f"into {base} and add \"file_name\" to the entry",
                field=name,
            )
        raise DataError(str(registry_path), f"{where} has no \"file_name\"", field=name)
    if not isinstance(file_name, str):
        raise DataError(str(registry_path), f"{where}: \"file_name\" must be a string", field=f"{name}.file_name")
    if entry.get("ranking"):
        raise DataError(
            str(registry_path),
            f"{where} is a preference (ranking) dataset; tnlora trains supervised fine-tuning only",
            field=f"{name}.ranking",
        )
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise DataError(
            str(registry_path),
            f"{where}: unknown formatting '{formatting}' (expected alpaca or sharegpt)",
            field=f"{name}.formatting",
        )
    columns, tags = entry.get("columns", {}), entry.get("tags", {})
    for key, value in (("columns", columns), ("tags", tags)):
        if not isinstance(value, dict) or not all(isinstance(v, str) or v is None for v in value.values()):
            raise DataError(
                str(registry_path), f"{where}: \"{key}\" must map names to strings", field=f"{name}.{key}"
            )
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise DataError(
            str(registry_path), f"{where}: \"num_samples\" must be a positive integer", field=f"{name}.num_samples"
        )
    path = base / file_name
    if not path.exists():
        raise DataError(str(path), f"file of dataset '{name}' not found (file_name is relative to {base})")
    fmt = RecordFormat(
        formatting=formatting,
        columns={k: v for k, v in columns.items() if v is not None},
        tags={k: v for k, v in tags.items() if v is not None},
    )
    return path, fmt, num_samples, str(entry.get("split", "train"))


# --------------------------------------------------------------------------------------------------------------
# Reading sources: JSON / JSONL files, datasets files and directories


def _read_source(path: Path, fmt: RecordFormat, split: str, skip_invalid: bool) -> tuple[list[Conversation], ReadReport]:
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _convert_all(str(path), _iter_saved_dataset(path, split), fmt, skip_invalid)
        files = sorted(p for p in path.iterdir() if p.is_file() and _is_data_file(p))
        if not files:
            raise DataError(str(path), "folder holds no data files (.json, .jsonl, .parquet, .csv, .arrow)")
        report, out = ReadReport(), []
        for file in files:
            convs, part = _read_source(file, fmt, split, skip_invalid)
            out.extend(convs)
            report.add(part)
        return out, report
    if path.suffix.lower() in _DATASETS_SUFFIXES:
        return _convert_all(str(path), _iter_datasets_file(path), fmt, skip_invalid)
    if path.suffix.lower() not in _JSON_SUFFIXES:
        raise DataError(str(path), "unsupported file type (use .json, .jsonl, .parquet, .csv or .arrow)")
    return _convert_all(str(path), _iter_json_records(path), fmt, skip_invalid)


def _is_data_file(path: Path) -> bool:
    return path.suffix.lower() in _JSON_SUFFIXES or path.suffix.lower() in _DATASETS_SUFFIXES


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            str(path),
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save the file as UTF-8",
        ) from None
    return text.removeprefix("\ufeff")


def _iter_json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(record number, record or DataError) pairs; a record that fails to parse comes as a DataError."""
    text = _read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from enumerate(_parse_json(path, text), start=1)
        return
    if stripped.startswith("{") and stripped.count("\n") > 0 and not _first_line_parses(stripped):
        # One pretty-printed object rather than JSON Lines: say so instead of a per-line syntax error.
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            raise DataError(
                str(path), "expected a JSON array of records or JSON Lines (one object per line), "
                "got a single multi-line JSON object"
            )
    number = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        number += 1
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, DataError(
                str(path), f"invalid JSON on line {line_no}, column {exc.colno}: {exc.msg}", record=number
            )


def _parse_json(path: Path, text: str) -> Any:
    """The JSON value of a whole file; a syntax error is one DataError line with its position."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(str(path), f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def _first_line_parses(text: str) -> bool:
    try:
        json.loads(text.split("\n", 1)[0])
    except json.JSONDecodeError:
        return False
    return True


def _iter_saved_dataset(path: Path, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many kinds; the user only needs to know it is unreadable
        raise DataError(str(path), f"cannot read this datasets directory: {exc}".splitlines()[0]) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(str(path), f"no split '{split}' (splits: {', '.join(loaded)})")
        loaded = loaded[split]
    yield from enumerate(loaded, start=1)


def _iter_datasets_file(path: Path) -> Iterator[tuple[int, Any]]:
    import datasets

    kind = _DATASETS_SUFFIXES[path.suffix.lower()]
    try:
        if kind == "arrow":
            loaded = datasets.Dataset.from_file(str(path))
        else:
            loaded = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # parse errors of pyarrow/pandas: report one line, no traceback
        raise DataError(str(path), f"cannot read this {kind} file: {exc}".splitlines()[0]) from None
    yield from enumerate(loaded, start=1)


def _convert_all(
    path: str, records: Iterable[tuple[int, Any]], fmt: RecordFormat, skip_invalid: bool
) -> tuple[list[Conversation], ReadReport]:
    report = ReadReport()
    out: list[Conversation] = []
    resolved: RecordFormat | None = None
    for number, record in records:
        report.records += 1
        try:
            if isinstance(record, DataError):
                raise record
            if not isinstance(record, dict):
                raise DataError(path, f"expected a JSON object, got {_type_name(record)}", record=number)
            if resolved is None:
                resolved = _resolve_format(fmt, record)
            out.append(_convert(record, resolved, path, number))
        except DataError as exc:
            if not skip_invalid:
                raise
            report.skipped += 1
            report.first_error = report.first_error or str(exc)
            report.empty_replies += isinstance(exc, EmptyReplyError)
    if report.records == 0:
        raise DataError(path, "the dataset is empty: no records")
    report.conversations = len(out)
    return out, report


# --------------------------------------------------------------------------------------------------------------
# Record → Conversation


def _resolve_format(fmt: RecordFormat, first: dict[str, Any]) -> RecordFormat:
    """Fill in LLaMA-Factory's defaults; in "auto" mode pick the format from the first record's keys."""
    if fmt.formatting == "alpaca":
        return RecordFormat("alpaca", {**_ALPACA_COLUMNS, **fmt.columns}, {})
    if fmt.formatting in ("sharegpt", "openai"):
        if fmt.formatting == "openai":
            defaults = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                        "assistant_tag": "assistant", "system_tag": "system"}  # fmt: skip
            columns = {"messages": "messages", **fmt.columns}
        else:
            defaults = {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                        "assistant_tag": "gpt", "observation_tag": "observation",
                        "function_tag": "function_call", "system_tag": "system"}  # fmt: skip
            columns = {"messages": "conversations", **fmt.columns}
        return RecordFormat("sharegpt", columns, {**defaults, **fmt.tags})
    # auto
    for key in ("messages", "conversations"):
        if key in first:
            return RecordFormat("auto-sharegpt", {"messages": key, "system": "system"}, {})
    return RecordFormat("alpaca", {**_ALPACA_COLUMNS, "system": "system", "history": "history"}, {})


def _convert(record: dict[str, Any], fmt: RecordFormat, path: str, number: int) -> Conversation:
    source = f"{path}, record {number}"
    if fmt.formatting == "alpaca":
        messages, system = _alpaca(record, fmt.columns, path, number)
    else:
        messages, system = _sharegpt(record, fmt, path, number)
    _check_turns(messages, path, number, fmt)
    return Conversation(messages=messages, system=system, source=source)


def _alpaca(
    record: dict[str, Any], columns: dict[str, str], path: str, number: int
) -> tuple[list[Message], str | None]:
    prompt = _required_str(record, columns["prompt"], path, number)
    query = _optional_str(record, columns.get("query"), path, number) or ""
    response = _required_str(record, columns["response"], path, number)
    system = _optional_str(record, columns.get("system"), path, number)
    messages: list[Message] = []
    history_key = columns.get("history")
    history = record.get(history_key) if history_key else None
    if history is not None:
        if not isinstance(history, list):
            raise DataError(path, f"expected a list of [query, response] pairs, got {_type_name(history)}",
                            record=number, field=history_key)  # fmt: skip
        for i, pair in enumerate(history):
            where = f"{history_key}[{i}]"
            if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise DataError(path, "expected a [query, response] pair of strings", record=number, field=where)
            if not pair[1].strip():
                raise EmptyReplyError(path, "empty response", record=number, field=f"{where}[1]")
            messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    # LLaMA-Factory's convention: the human turn is "instruction\ninput".
    user = f"{prompt}\n{query}" if prompt and query else prompt or query
    if not response.strip():
        raise EmptyReplyError(path, "empty response", record=number, field=columns["response"])
    messages += [Message("user", user), Message("assistant", response)]
    return messages, system


def _sharegpt(
    record: dict[str, Any], fmt: RecordFormat, path: str, number: int
) -> tuple[list[Message], str | None]:
    key = fmt.columns["messages"]
    if key not in record:
        raise DataError(path, "missing field", record=number, field=key)
    raw = record[key]
    if not isinstance(raw, list):
        raise DataError(path, f"expected a list of messages, got {_type_name(raw)}", record=number, field=key)
    system = _optional_str(record, fmt.columns.get("system"), path, number)
    tags = fmt.tags
    if fmt.formatting == "auto-sharegpt":
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system"}  # fmt: skip
    else:
        roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant"}
        if tags.get("system_tag"):
            roles[tags["system_tag"]] = "system"
    unsupported = {tags.get("observation_tag", "observation"), tags.get("function_tag", "function_call"),
                   "tool", "function", "observation", "function_call"}  # fmt: skip
    messages: list[Message] = []
    for i, item in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise DataError(path, f"expected a message object, got {_type_name(item)}", record=number, field=where)
        role_tag = tags.get("role_tag") or ("role" if "role" in item else "from")
        content_tag = tags.get("content_tag") or ("content" if "content" in item else "value")
        if role_tag not in item:
            raise DataError(path, "missing field", record=number, field=f"{where}.{role_tag}")
        role = item[role_tag]
        if role not in roles:
            if isinstance(role, str) and role in unsupported:
                raise DataError(path, f"role '{role}' (tool use) is not supported", record=number,
                                field=f"{where}.{role_tag}")  # fmt: skip
            allowed = ", ".join(sorted(roles))
            raise DataError(path, f"unknown role {role!r} (expected one of {allowed})", record=number,
                            field=f"{where}.{role_tag}")  # fmt: skip
        content = _content(item, content_tag, path, number, where)
        if roles[role] == "system":
            if i != 0:
                raise DataError(path, "a system message is allowed only first", record=number, field=where)
            system = content
            continue
        messages.append(Message(roles[role], content))
    return messages, system


def _check_turns(messages: list[Message], path: str, number: int, fmt: RecordFormat) -> None:
    field_name = fmt.columns.get("messages", fmt.columns.get("response", "messages"))
    if not any(m.role == "assistant" for m in messages):
        raise DataError(path, "a conversation with no assistant turn", record=number, field=field_name)
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise DataError(
                path,
                f"turns must alternate user/assistant starting with user: turn {i + 1} is {message.role}",
                record=number,
                field=field_name,
            )
        if message.role == "assistant" and not message.content.strip():
            raise EmptyReplyError(path, f"empty response (turn {i + 1})", record=number, field=field_name)
    if messages[-1].role != "assistant":
        raise DataError(path, "the conversation ends with a user turn that has no answer", record=number,
                        field=field_name)  # fmt: skip


def _content(item: dict[str, Any], tag: str, path: str, number: int, where: str) -> str:
    if tag not in item:
        raise DataError(path, "missing field", record=number, field=f"{where}.{tag}")
    value = item[tag]
    if isinstance(value, list):
        # OpenAI-style content parts: only text parts are meaningful for a text model.
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise DataError(path, "only text content parts are supported", record=number,
                                field=f"{where}.{tag}")  # fmt: skip
            texts.append(part["text"])
        return "".join(texts)
    if not isinstance(value, str):
        raise DataError(path, f"expected a string, got {_type_name(value)}", record=number, field=f"{where}.{tag}")
    return value


def _required_str(record: dict[str, Any], key: str, path: str, number: int) -> str:
    if key not in record:
        raise DataError(path, "missing field", record=number, field=key)
    value = record[key]
    if not isinstance(value, str):
        raise DataError(path, f"expected a string, got {_type_name(value)}", record=number, field=key)
    return value


def _optional_str(record: dict[str, Any], key: str | None, path: str, number: int) -> str | None:
    if key is None or record.get(key) is None:
        return None
    return _required_str(record, key, path, number)


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)
