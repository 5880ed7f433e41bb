"""Generation: prompt rendering with the trained template, batched left-padded generate, JSONL output.

``generate_file`` keeps what it finished: each batch's replies are appended (and flushed) to ``<output>.partial``
as they complete, and the output file is written (atomically) only once every prompt is answered. A rerun with
the same prompts and settings continues from the partial file, skipping the prompts already answered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteriaList

from tnlora.errors import DataError, TnloraError
from tnlora.io import atomic_write_text
from tnlora.model.generation import HostStoppingCriteria
from tnlora.model.tokenizer import pad_token_id


@dataclass
class GenerationOptions:
    """Sampling settings shared by chat, generate and the post-training samples."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        """Refuse values generate() would choke on, naming the option."""
        if self.max_new_tokens < 1:
            raise TnloraError(f"--max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise TnloraError(f"--temperature: must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TnloraError(f"--top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise TnloraError(f"--top_k: must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise TnloraError(f"--repetition_penalty: must be > 0, got {self.repetition_penalty}")

    def to_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` (sampling knobs only when sampling)."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # silence generation_config's sampling defaults in greedy mode
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def prompt_ids(tokenizer, template, messages: list[dict[str, Any]], system: str | None) -> list[int]:
    """Token ids of the rendered prompt (ends with the assistant prefix); ``system`` None: the template's."""
    from tnlora.data.encode import encode_prompt

    # encode_prompt tokenises piece by piece exactly as training did (whole-string tokenisation can differ).
    return encode_prompt(messages, tokenizer, template, system)


def stop_settings(tokenizer, template) -> tuple[list[int], list[str]]:
    """(eos ids, stop strings) of the template; the tokenizer's eos is always a stop."""
    ids = list(template.stop_token_ids(tokenizer) or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    strings = [s for s in (template.stop_strings or []) if s]
    return ids, strings


def cut_at_stop(text: str, stop_strings: Sequence[str], final: bool = False) -> str:
    """Text before the first stop string; ``final`` also drops a trailing partial one (``"…<|im_"``) left
    when generation ran out of tokens mid-marker."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    text = text[:cut]
    if final:
        text = text[: len(text) - partial_stop_suffix(text, stop_strings)]
    return text


def partial_stop_suffix(text: str, stop_strings: Sequence[str], min_length: int = 2) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of a stop string (0 if shorter than
    ``min_length``: a lone "<" is more likely text than the start of a marker)."""
    best = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), min_length - 1, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


class StopOnStrings(HostStoppingCriteria):
    """Stop a row once its generated text contains a stop string (multi-token markers like ``<|im_end|>``)."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_length: int):
        super().__init__(prompt_length)
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.tail = max((len(s) for s in self.stop_strings), default=1) + 8

    def done_on_host(self, generated: Sequence[Sequence[int]]) -> list[bool]:
        done = []
        for row in generated:
            # Decoding only the last few tokens keeps this O(1) per step.
            text = self.tokenizer.decode(list(row[-self.tail :]), skip_special_tokens=False)
            done.append(any(s in text for s in self.stop_strings))
        return done


def generation_inputs(
    tokenizer, rows: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids and attention mask (generation continues every row at the right edge)."""
    pad = pad_token_id(tokenizer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def generate_replies(
    model,
    tokenizer,
    template,
    conversations: Sequence[list[dict[str, Any]]],
    options: GenerationOptions,
    system: str | None = None,
    batch_size: int = 8,
    on_batch: Callable[[list[int], list[str]], None] | None = None,
) -> list[str]:
    """One reply per conversation (the last turn is the user's), batched with left padding.

    ``on_batch(indices, replies)`` is called as each batch completes (indices into ``conversations``)."""
    options.check()
    if batch_size < 1:
        raise TnloraError(f"--batch_size: must be >= 1, got {batch_size}")
    eos_ids, stop_strings = stop_settings(tokenizer, template)
    pad = pad_token_id(tokenizer)
    device = _model_device(model)
    encoded = [prompt_ids(tokenizer, template, list(c), system) for c in conversations]
    replies: list[str] = [""] * len(encoded)
    # Similar lengths together: less padding per batch. Output order is restored below.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    if options.seed is not None:
        torch.manual_seed(options.seed)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = generation_inputs(tokenizer, [encoded[i] for i in idx], device)
        criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stop_strings, ids.shape[1])] if stop_strings else [])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            eos_token_id=eos_ids,
            pad_token_id=pad,
            stopping_criteria=criteria,
            **options.to_kwargs(),
        )
        for row, i in zip(out[:, ids.shape[1] :], idx):
            text = tokenizer.decode(_until_eos(row.tolist(), eos_ids), skip_special_tokens=True)
            replies[i] = cut_at_stop(text, stop_strings, final=True).strip()
        if on_batch is not None:
            on_batch(idx, [replies[i] for i in idx])
    return replies


def _until_eos(ids: list[int], eos_ids: Sequence[int]) -> list[int]:
    for n, t in enumerate(ids):
        if t in eos_ids:
            return ids[:n]
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Files


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompts from a .txt file (one per non-blank line) or JSONL (``prompt`` or ``messages``, optional ``system``).

    Returns ``[{"messages": [...], "system": str | None, "record": original}]``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "prompts file not found")
    text = path.read_text(encoding="utf-8")
    out: list[dict[str, Any]] = []
    if path.suffix.lower() not in (".jsonl", ".json"):
        for line in text.splitlines():
            if line.strip():
                out.append({"messages": [{"role": "user", "content": line.strip()}], "system": None, "record": line})
        if not out:
            raise DataError(str(path), "no prompts (the file is empty)")
        return out
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(str(path), f"not valid JSON ({exc.msg})", record=n) from None
        if not isinstance(record, dict):
            raise DataError(str(path), "expected a JSON object", record=n)
        system = record.get("system")
        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages
            ):
                raise DataError(str(path), "expected a list of {role, content} objects", record=n, field="messages")
            if messages[-1]["role"] != "user":
                raise DataError(str(path), "the last message must be the user's", record=n, field="messages")
        elif isinstance(record.get("prompt"), str):
            messages = [{"role": "user", "content": record["prompt"]}]
        else:
            raise DataError(str(path), "needs a 'prompt' string or a 'messages' list", record=n)
        out.append({"messages": messages, "system": system, "record": record})
    if not out:
        raise DataError(str(path), "no prompts (the file is empty)")
    return out


PARTIAL_SUFFIX = ".partial"


def partial_path(output_path: str | Path) -> Path:
    """Where ``generate_file`` keeps the replies finished so far: ``<output>.partial``."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.name + PARTIAL_SUFFIX)


def is_generate_output(path: Path) -> bool:
    """Whether ``path`` is a JSONL file of rows with a ``response`` (what ``generate_file`` writes)."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [json.loads(line) for line in lines]
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return bool(rows) and all(isinstance(r, dict) and "response" in r for r in rows)


def generation_fingerprint(prompts: list[dict[str, Any]], options: GenerationOptions, loaded) -> str:
    """What a partial file's replies depend on: the prompts, the sampling settings, the model and template."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p["messages"], p["system"]], ensure_ascii=False, sort_keys=True).encode())
    settings = [dataclasses.asdict(options), str(loaded.base), str(loaded.adapter), loaded.system,
                loaded.template.to_dict() if hasattr(loaded.template, "to_dict") else str(loaded.template)]
    h.update(json.dumps(settings, ensure_ascii=False, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def read_partial(path: Path, fingerprint: str, total: int) -> dict[int, str] | None:
    """The replies a partial file holds ({prompt index: reply}), None when it was written for other prompts or
    settings. A last line cut off mid-write is ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        header = json.loads(lines[0]) if lines else None
    except ValueError:
        return None
    if not isinstance(header, dict) or header.get("tnlora_generate") != fingerprint:
        return None
    done: dict[int, str] = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("index"), int) and 0 <= row["index"] < total:
            done[row["index"]] = str(row.get("response", ""))
    return done


def generate_file(
    loaded,
    prompts: str | Path | list[dict[str, Any]],
    output_path: str | Path,
    options: GenerationOptions,
    batch_size: int = 8,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> int:
    """Answer every prompt (a prompts file or ``read_prompts``' result); write ``output_path`` atomically.

    The output is JSONL, one row per prompt in input order: the input record plus ``response``. Finished
    batches go to ``<output>.partial`` first, so an interrupted run loses at most the batch in flight and a
    rerun (same prompts, settings, model) answers only the rest. An existing output is replaced only with
    ``overwrite`` and only when it is an earlier generate output (``check_generate_output``).
    """
    if not isinstance(prompts, list):
        prompts = read_prompts(prompts)
    check_generate_output(output_path, overwrite)
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    partial = partial_path(output_path)
    fingerprint = generation_fingerprint(prompts, options, loaded)
    done: dict[int, str] = {}
    if partial.exists():
        previous = None if overwrite else read_partial(partial, fingerprint, len(prompts))
        if previous is None and not overwrite:
            raise TnloraError(
                f"--output: {partial} holds replies to other prompts or settings; pass --overwrite to start again"
            )
        done = previous or {}
        if done:
            say(f"continuing: {len(done)} of {len(prompts)} prompts already answered in {partial}")
    # Rewritten whole (atomically) before appending: a line cut off by an interruption must not run into the next.
    rows = [json.dumps({"tnlora_generate": fingerprint})]
    rows += [json.dumps({"index": i, "response": r}, ensure_ascii=False) for i, r in sorted(done.items())]
    atomic_write_text(partial, "\n".join(rows) + "\n")
    with open(partial, "a", encoding="utf-8") as sink:

        def keep(indices: list[int], answers: list[str]) -> None:
            for i, a in zip(indices, answers):
                done[i] = a
                sink.write(json.dumps({"index": i, "response": a}, ensure_ascii=False) + "\n")
            sink.flush()

        # Rows with their own system prompt are generated apart from the rest (the system prompt is per batch).
        groups: dict[str | None, list[int]] = {}
        for i, p in enumerate(prompts):
            if i not in done:
                groups.setdefault(p["system"], []).append(i)
        for system, idx in groups.items():
            generate_replies(
                loaded.model,
                loaded.tokenizer,
                loaded.template,
                [prompts[i]["messages"] for i in idx],
                options,
                system=system if system is not None else loaded.system,
                batch_size=batch_size,
                on_batch=lambda positions, answers, idx=idx: keep([idx[k] for k in positions], answers),
            )
    lines = []
    for i, p in enumerate(prompts):
        row: dict[str, Any] = dict(p["record"]) if isinstance(p["record"], dict) else {"prompt": p["record"]}
        row["response"] = done[i]
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(output_path, "\n".join(lines) + "\n")
    partial.unlink(missing_ok=True)
    return len(lines)


def check_generate_output(output_path: str | Path, overwrite: bool) -> None:
    """Refuse an output that is a directory, or an existing file unless ``overwrite`` and it is a generate output."""
    from tnlora.outputs import check_output_file

    check_output_file(
        output_path,
        key="--output",
        overwrite=overwrite,
        overwrite_flag="--overwrite to replace it",
        is_ours=is_generate_output,
        what="generated replies (JSONL)",
    )
