"""The report behind `tnlora data inspect`: sizes, token-length percentiles, truncation, one rendered example, and
the data audit (``tnlora.data.audit``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tnlora.data import encode
from tnlora.data.audit import audit_conversations
from tnlora.data.readers import Conversation, read_conversations
from tnlora.data.templates import Template, get_template

MASK_OPEN, MASK_CLOSE = "⟦", "⟧"
_DIM, _RESET = "\x1b[2m", "\x1b[0m"


def inspect_dataset(
    dataset: str | list[str],
    dataset_dir: str | os.PathLike[str] | None,
    tokenizer: Any,
    template: Template | str,
    cutoff_len: int,
    *,
    example: int = 0,
    color: bool = False,
    skip_invalid: bool = False,
    split: Callable[[list[Conversation]], tuple[Sequence[Conversation], Sequence[Conversation]]] | None = None,
    split_label: str = "the validation split",
    eval_dataset: str | list[str] | None = None,
) -> str:
    """A plain-text report on a dataset as training would see it, ending with the data audit.

    ``tokenizer`` is a tokenizer or a name/path for ``load_tokenizer``; ``template`` a Template or a name.
    Lengths are untruncated tokens per example (prompt + answer + end marker + eos). In the rendered
    example (number ``example``, 0-based) masked text is inside ⟦…⟧ (and dim with ``color``), learned text
    is bare. The audit counts the eval examples also in the training data: those of ``split`` (the records →
    (train, eval), as the run's ``val_size`` splits them), or of ``eval_dataset``.
    """
    if isinstance(tokenizer, str | os.PathLike):
        from tnlora.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    if isinstance(template, str):
        template = get_template(template)
    conversations, report = read_conversations(dataset, dataset_dir, skip_invalid=skip_invalid)
    encoder = encode.PieceEncoder(tokenizer)
    plans = [encode.plan_pieces(c.messages, c.system, template) for c in conversations]
    for start in range(0, len(plans), encode.ENCODE_BATCH):
        encoder.encode(plans[start : start + encode.ENCODE_BATCH])
    lengths = np.array([encode._length(p) for p in plans])
    learned = np.array([sum(len(x.ids or []) for x in p if x.learned) for p in plans])
    over = [i for i, n in enumerate(lengths) if n > cutoff_len]
    dropped = sum(
        encode._fit(conversations[i], plans[i], encoder, template, cutoff_len)[2] is not None for i in over
    )

    def pct(q: float) -> int:
        return int(np.percentile(lengths, q, method="inverted_cdf"))

    names = dataset if isinstance(dataset, str) else ",".join(dataset)
    lines = [
        f"dataset: {names}" + (f" (dataset_dir {dataset_dir})" if dataset_dir is not None else ""),
        f"records: {report.records}, conversations: {report.conversations}, skipped: {report.skipped}"
        + (f" (first: {report.first_error})" if report.first_error else ""),
        f"template: {template.name}; tokenizer: {type(tokenizer).__name__} ({len(tokenizer)} tokens)",
        "tokens per example (prompt + answer + end marker + eos):",
        f"  mean {lengths.mean():.1f}  p50 {pct(50)}  p90 {pct(90)}  p99 {pct(99)}  max {lengths.max()}",
        f"  learned tokens per example: mean {learned.mean():.1f}, total {int(learned.sum())}",
        f"cutoff_len {cutoff_len}: {len(over)} example(s) longer → {len(over) - dropped} prompt-truncated, "
        f"{dropped} dropped",
        "",
    ]
    index = min(max(example, 0), len(conversations) - 1)
    conv = conversations[index]
    pieces = encode.encode_pieces(conv, tokenizer, template)
    lines.append(
        f"example {index} ({conv.source}), {encode._length(pieces)} tokens; "
        f"masked text in {MASK_OPEN}…{MASK_CLOSE}, learned text bare:"
    )
    lines.append(render_masked(pieces, tokenizer, color=color))
    train, held = conversations, None
    label = split_label
    if split is not None:
        train, held = split(conversations)
    elif eval_dataset:
        held, _ = read_conversations(eval_dataset, dataset_dir, skip_invalid=skip_invalid)
        label = f"eval dataset {eval_dataset if isinstance(eval_dataset, str) else ','.join(eval_dataset)}"
    audit = audit_conversations(
        conversations, train=train, eval=held, eval_label=label, empty_replies=report.empty_replies,
        first_empty=report.first_error if report.empty_replies else None,
    )  # fmt: skip
    lines += ["", audit.render()]
    return "\n".join(lines)


def render_masked(pieces: list[encode.Piece], tokenizer: Any, color: bool = False) -> str:
    """Pieces as text with masked runs bracketed (and dimmed with ``color``); eos shown as its token."""
    out: list[str] = []
    masked_run = False
    for piece in pieces:
        text = tokenizer.eos_token if piece.kind == "eos" else piece.text
        if not piece.learned and not masked_run:
            out.append((_DIM if color else "") + MASK_OPEN)
        elif piece.learned and masked_run:
            out.append(MASK_CLOSE + (_RESET if color else ""))
        masked_run = not piece.learned
        out.append(text)
    if masked_run:
        out.append(MASK_CLOSE + (_RESET if color else ""))
    return "".join(out)
