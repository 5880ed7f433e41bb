"""Generation: prompt rendering with the trained template, batched left-padded generate, JSONL output."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tnlora.errors import DataError, TnloraError
from tnlora.io import atomic_write_text


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


class StopOnStrings(StoppingCriteria):
    """Stop a row once its generated text contains a stop string (multi-token markers like ``<|im_end|>``)."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.prompt_length = prompt_length
        self.tail = max((len(s) for s in self.stop_strings), default=1) + 8

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = []
        for row in input_ids[:, self.prompt_length :]:
            # Decoding only the last few tokens keeps this O(1) per step.
            text = self.tokenizer.decode(row[-self.tail :].tolist(), skip_special_tokens=False)
            done.append(any(s in text for s in self.stop_strings))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generation_inputs(
    tokenizer, rows: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids and attention mask (generation continues every row at the right edge)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
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
) -> list[str]:
    """One reply per conversation (the last turn is the user's), batched with left padding."""
    options.check()
    if batch_size < 1:
        raise TnloraError(f"--batch_size: must be >= 1, got {batch_size}")
    eos_ids, stop_strings = stop_settings(tokenizer, template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
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


def generate_file(
    loaded,
    prompts: str | Path | list[dict[str, Any]],
    output_path: str | Path,
    options: GenerationOptions,
    batch_size: int = 8,
) -> int:
    """Answer every prompt (a prompts file or ``read_prompts``' result); write ``output_path`` atomically.

    The output is JSONL, one row per prompt in input order: the input record plus ``response``.
    """
    if not isinstance(prompts, list):
        prompts = read_prompts(prompts)
    # Rows with their own system prompt are generated apart from the rest (the system prompt is per batch).
    groups: dict[str | None, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p["system"], []).append(i)
    replies: list[str] = [""] * len(prompts)
    for system, idx in groups.items():
        convs = [prompts[i]["messages"] for i in idx]
        answers = generate_replies(
            loaded.model,
            loaded.tokenizer,
            loaded.template,
            convs,
            options,
            system=system if system is not None else loaded.system,
            batch_size=batch_size,
        )
        for i, a in zip(idx, answers):
            replies[i] = a
    lines = []
    for p, reply in zip(prompts, replies):
        row: dict[str, Any] = dict(p["record"]) if isinstance(p["record"], dict) else {"prompt": p["record"]}
        row["response"] = reply
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(output_path, "\n".join(lines) + "\n")
    return len(lines)
