"""Loss and perplexity of a model (+ adapter) on a dataset, per token and masked exactly as in training."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tnlora.errors import TnloraError
from tnlora.model.tokenizer import pad_token_id

EVAL_WRITER = "tnlora eval"


@dataclass
class EvalResult:
    """Per-token loss over every supervised token of the dataset."""

    loss: float
    tokens: int
    examples: int

    @property
    def ppl(self) -> float:
        """exp(loss)."""
        return math.exp(self.loss) if self.loss < 700 else float("inf")

    def summary(self) -> str:
        """The line ``tnlora eval`` prints."""
        return f"loss {self.loss:.4f} | ppl {self.ppl:.3f} | tokens {self.tokens} | examples {self.examples}"


def supervised_token_sum(model, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(summed cross-entropy, number of predicted tokens) of one collated batch (labels are unshifted)."""
    labels = batch["labels"]
    count = int((labels[:, 1:] != -100).sum())
    if count == 0:
        return 0.0, 0
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "seq_ids")}
    # With num_items_in_batch = 1 the model returns the summed token loss (its gradient-accumulation path).
    out = model(**inputs, num_items_in_batch=torch.tensor(1, device=labels.device), use_cache=False)
    return float(out.loss.float()), count


@torch.inference_mode()
def evaluate(
    loaded,
    dataset: str,
    *,
    dataset_dir: str | None = None,
    cutoff_len: int | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
    train_on_prompt: bool | None = None,
    mask_history: bool | None = None,
) -> EvalResult:
    """Encode ``dataset`` with the loaded template and settings of the run, then average the loss per token."""
    from tnlora.data.collate import PaddingCollator, TrainingCollator
    from tnlora.data.encode import build_dataset
    from tnlora.data.readers import load_conversations

    if batch_size < 1:
        raise TnloraError(f"--batch_size: must be >= 1, got {batch_size}")
    run = loaded.run_config
    cutoff = cutoff_len or (run.cutoff_len if run else 1024)
    if cutoff < 2:
        raise TnloraError(f"--cutoff_len: must be >= 2, got {cutoff}")
    on_prompt = train_on_prompt if train_on_prompt is not None else bool(run and run.train_on_prompt)
    history = mask_history if mask_history is not None else bool(run and run.mask_history)
    conversations = load_conversations(dataset, dataset_dir)
    if max_samples is not None:
        conversations = conversations[:max_samples]
    if loaded.system is not None:
        conversations = [c if c.system else dataclasses.replace(c, system=loaded.system) for c in conversations]
    examples, _ = build_dataset(
        conversations,
        loaded.tokenizer,
        loaded.template,
        cutoff_len=cutoff,
        train_on_prompt=on_prompt,
        mask_history=history,
    )
    if not examples:
        raise TnloraError(f"--dataset: {dataset} gives no example to evaluate")
    pad = pad_token_id(loaded.tokenizer)
    collate = TrainingCollator(PaddingCollator(pad_token_id=pad))
    rows: list[dict[str, Any]] = [_row(e) for e in examples]
    rows.sort(key=lambda r: len(r["input_ids"]))  # less padding; the sum does not depend on order
    total, tokens = 0.0, 0
    loaded.model.eval()
    for start in range(0, len(rows), batch_size):
        batch = {
            k: v.to(loaded.device) if isinstance(v, torch.Tensor) else v
            for k, v in collate(rows[start : start + batch_size]).items()
        }
        s, n = supervised_token_sum(loaded.model, batch)
        total += s
        tokens += n
    if tokens == 0:
        raise TnloraError("--dataset: no supervised tokens (every label is masked)")
    return EvalResult(loss=total / tokens, tokens=tokens, examples=len(rows))


def _row(example: Any) -> dict[str, Any]:
    if isinstance(example, dict):
        return {"input_ids": list(example["input_ids"]), "labels": list(example["labels"])}
    return {"input_ids": list(example.input_ids), "labels": list(example.labels)}


def is_eval_output(path: Path) -> bool:
    """Whether ``path`` is a metrics file ``write_eval_result`` wrote."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("written_by") == EVAL_WRITER


def check_eval_output(path: str | Path, overwrite: bool) -> None:
    """Refuse an output that is a directory, or an existing file unless ``overwrite`` and it is an eval output
    (checked before the model loads)."""
    from tnlora.outputs import check_output_file

    check_output_file(
        path,
        key="--output",
        overwrite=overwrite,
        overwrite_flag="--overwrite to replace it",
        is_ours=is_eval_output,
        what="evaluation metrics (JSON)",
    )


def write_eval_result(result: EvalResult, path: str | Path, **details: Any) -> None:
    """The metrics as JSON (Trainer names: eval_loss, eval_ppl, …) plus ``details`` (dataset, model, adapter)."""
    from tnlora.io import atomic_write_json

    atomic_write_json(path, {
        "eval_loss": result.loss,
        "eval_ppl": result.ppl,
        "eval_tokens": result.tokens,
        "eval_examples": result.examples,
        **{k: (str(v) if v is not None else None) for k, v in details.items()},
        "written_by": EVAL_WRITER,
    })  # fmt: skip
