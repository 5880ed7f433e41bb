"""Batches: packing examples into rows, the padding and packing collators, and the training collator around
them that counts on the host what the model and the Trainer would otherwise read back from the GPU."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tnlora.data.encode import IGNORE_INDEX, EncodedExample
from tnlora.ops.packing import PackedRows


def pack_examples(examples: Sequence[EncodedExample], max_length: int) -> list[dict[str, list[int]]]:
    """Pack examples into rows of at most ``max_length`` tokens (first-fit, longest first).

    Each row has ``input_ids``, ``labels`` and ``seq_ids`` (index of the example inside the row, per token).
    The first label of every example is -100, so no loss term predicts one example from the previous one.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        _check_fits(n, max_length)
        for r, free in enumerate(space):
            if n <= free:
                rows[r].append(i)
                space[r] -= n
                break
        else:
            rows.append([i])
            space.append(max_length - n)
    return [_pack_row([examples[i] for i in members]) for members in rows]


def _check_fits(n: int, max_length: int) -> None:
    if n > max_length:
        raise ValueError(f"an example of {n} tokens does not fit in a packed row of {max_length}")


def _pack_row(members: Sequence[EncodedExample | dict[str, Any]]) -> dict[str, list[int]]:
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "seq_ids": []}
    for index, member in enumerate(members):
        ids, labels = _ids_labels(member)
        row["input_ids"] += ids
        row["labels"] += [IGNORE_INDEX, *labels[1:]] if labels else []
        row["seq_ids"] += [index] * len(ids)
    return row


def _ids_labels(item: EncodedExample | dict[str, Any]) -> tuple[list[int], list[int]]:
    if isinstance(item, EncodedExample):
        return item.input_ids, item.labels
    return list(item["input_ids"]), list(item["labels"])


@dataclass
class PaddingCollator:
    """Right-pads a batch: input_ids with ``pad_token_id``, labels with -100, attention_mask 1/0."""

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[EncodedExample | dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [_ids_labels(f) for f in features]
        width = max(len(ids) for ids, _ in pairs)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(pairs), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(pairs):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


@dataclass
class PackingCollator:
    """Batches of fixed-length packed rows with ``seq_ids`` (the model keeps examples apart by them).

    Features are either pre-packed rows (from ``pack_examples``, carrying ``seq_ids``) or plain examples,
    which are packed here in order. Rows are right-padded to ``max_length``; padding gets attention_mask 0,
    label -100 and a seq id of its own.
    """

    max_length: int
    pad_token_id: int = 0

    def __call__(self, features: Sequence[EncodedExample | dict[str, Any]]) -> dict[str, torch.Tensor]:
        if features and isinstance(features[0], dict) and "seq_ids" in features[0]:
            rows = [dict(f) for f in features]
        else:
            rows, current, used = [], [], 0
            for feature in features:
                n = len(_ids_labels(feature)[0])
                _check_fits(n, self.max_length)
                if current and used + n > self.max_length:
                    rows.append(_pack_row(current))
                    current, used = [], 0
                current.append(feature)
                used += n
            if current:
                rows.append(_pack_row(current))
        shape = (len(rows), self.max_length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        seq_ids = torch.zeros(shape, dtype=torch.long)
        for r, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[r, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
            labels[r, :n] = torch.tensor(row["labels"], dtype=torch.long)
            mask[r, :n] = 1
            seq_ids[r, :n] = torch.tensor(row["seq_ids"], dtype=torch.long)
            seq_ids[r, n:] = (max(row["seq_ids"]) + 1) if n else 0
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "seq_ids": seq_ids}


def as_row(example: Any) -> dict[str, Any]:
    """An encoded example or packed row → a plain dict of lists (+ ``length``, for inspection; the
    Trainer's length-grouped sampler measures ``input_ids`` itself and the collator drops ``length``)."""
    if isinstance(example, dict):
        row = {k: list(v) for k, v in example.items() if v is not None}
    else:
        row = {k: list(v) for k, v in dataclasses.asdict(example).items() if isinstance(v, (list, tuple))}
    row["length"] = len(row["input_ids"])
    return row


# Host-side counts the collator adds to each batch as Python ints (accelerate moves tensors to the GPU and
# leaves ints alone): reading them from device tensors would stall the GPU once per micro-batch each.
NUM_LOSS_TOKENS = "num_loss_tokens"  # labelled positions, for the model's loss (a forward argument)
NUM_REAL_TOKENS = "num_real_tokens"  # non-padding tokens, for the Trainer's tokens-seen count (popped there)
PACKED_ROWS = "packed_rows"  # packed rows: their example boundaries (tnlora.ops.PackedRows, built on the host)


class TrainingCollator:
    """Wraps the data layer's collator so the Trainer counts exactly the tokens the loss averages over.

    The model shifts labels: position 0 of a row and the first token of each packed example are never
    prediction targets. Marking them -100 here makes ``num_items_in_batch`` (counted by the Trainer from
    the labels) equal the number of tokens in the loss, so the per-token loss stays exact under gradient
    accumulation and packing. The batch also carries ``num_loss_tokens``, ``num_real_tokens`` and, when
    packed, ``packed_rows`` (in place of ``seq_ids``), all computed here on the host.
    """

    def __init__(self, inner, eval_inner=None):
        self.inner = inner
        self.eval_inner = eval_inner or inner

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = [{k: v for k, v in f.items() if k != "length"} for f in features]
        # Eval examples are never packed: they carry no seq_ids and go to the padding collator.
        packed = bool(features) and "seq_ids" in features[0]
        batch = dict((self.inner if packed else self.eval_inner)(features))
        labels = batch["labels"].clone()
        labels[:, 0] = -100
        seq_ids = batch.get("seq_ids")
        if seq_ids is not None:
            starts = seq_ids[:, 1:] != seq_ids[:, :-1]
            labels[:, 1:][starts] = -100
        batch["labels"] = labels
        if seq_ids is not None:
            # Built here, where the ids are on the host: from seq_ids on the GPU the model would read the
            # boundaries back (a stall per micro-batch). The data loader moves it with the batch.
            batch[PACKED_ROWS] = PackedRows.from_seq_ids(batch.pop("seq_ids"))
        batch[NUM_LOSS_TOKENS] = int((labels != -100).sum())
        mask = batch.get("attention_mask")
        batch[NUM_REAL_TOKENS] = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch


@dataclass
class DataBundle:
    """What the data step hands to the Trainer."""

    train: Any  # a list of rows: input_ids / labels (/ seq_ids) and a "length" column
    eval: Any | None
    collator: Any
    stats: dict[str, Any] = field(default_factory=dict)
