"""Loss and perplexity of a model (+ adapter) on a dataset, per token and masked exactly as in training; and
predictions: a generated reply for every example, scored against the dataset's reply (``tnlora eval --predict``,
``do_predict``)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tnlora.errors import TnloraError
from tnlora.model.tokenizer import pad_token_id

EVAL_WRITER = "tnlora eval"
PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"


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


# ---------------------------------------------------------------------------------------------------------------
# Predictions


@dataclass
class PredictResult:
    """One row per example (``prompt``, ``reference``, ``prediction``, ``source``; ``history`` and ``system`` when
    the record has them) and the generation metrics (``predict_bleu-4``, ``predict_rouge-1``, …)."""

    rows: list[dict[str, Any]]
    metrics: dict[str, float]

    def summary(self) -> str:
        """The line ``tnlora eval --predict`` prints."""
        m = self.metrics
        return (
            f"bleu-4 {m['predict_bleu-4']:.2f} | rouge-1 {m['predict_rouge-1']:.2f} | rouge-2 {m['predict_rouge-2']:.2f}"
            f" | rouge-l {m['predict_rouge-l']:.2f} | exact match {m['predict_exact_match']:.1f}% | reply "
            f"{m['predict_reply_chars']:.1f} chars (reference {m['predict_reference_chars']:.1f}) | examples "
            f"{m['predict_examples']}"
        )


def predict_conversations(
    model,
    tokenizer,
    template,
    conversations: Sequence[Any],
    options,
    *,
    system: str | None = None,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Generate the last assistant turn of every conversation from the turns before it (batched, left padding,
    the template's stops); a record's own system prompt wins over ``system``. ``on_batch(done)`` after each batch.

    Rows in input order: ``prompt`` (the last user message), ``reference`` (the record's reply), ``prediction``,
    ``source``, plus ``history`` (earlier turns) and ``system`` where the record has them."""
    from tnlora.infer.generate import generate_replies

    predictions: list[str] = [""] * len(conversations)
    done = 0
    # generate_replies takes one system prompt per call: records are grouped by theirs.
    groups: dict[str | None, list[int]] = {}
    for i, c in enumerate(conversations):
        groups.setdefault(c.system if c.system is not None else system, []).append(i)
    for group_system, idx in groups.items():
        prompts = [[{"role": m.role, "content": m.content} for m in conversations[i].messages[:-1]] for i in idx]

        def keep(positions: list[int], replies: list[str], idx: list[int] = idx) -> None:
            nonlocal done
            for k, reply in zip(positions, replies):
                predictions[idx[k]] = reply
            done += len(positions)
            if on_batch is not None:
                on_batch(done)

        generate_replies(
            model, tokenizer, template, prompts, options, system=group_system, batch_size=batch_size, on_batch=keep
        )
    rows = []
    for c, prediction in zip(conversations, predictions):
        row: dict[str, Any] = {"prompt": c.messages[-2].content, "reference": c.messages[-1].content,
                               "prediction": prediction, "source": c.source}  # fmt: skip
        if len(c.messages) > 2:
            row["history"] = [{"role": m.role, "content": m.content} for m in c.messages[:-2]]
        if c.system is not None:
            row["system"] = c.system
        rows.append(row)
    return rows


def score_predictions(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``generation_metrics`` of the rows, under LLaMA-Factory's names for prediction metrics (``predict_…``)."""
    from tnlora.infer.metrics import generation_metrics

    scores = generation_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows])
    return {f"predict_{k}": v for k, v in scores.items()}


def predict(
    loaded,
    dataset: str,
    *,
    options,
    dataset_dir: str | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
    log: Callable[[str], None] | None = None,
) -> PredictResult:
    """A reply for every example of ``dataset`` with the loaded model, template and system prompt, scored."""
    from tnlora.data.readers import load_conversations
    from tnlora.infer.metrics import check_metric_libraries

    check_metric_libraries()
    if batch_size < 1:
        raise TnloraError(f"--batch_size: must be >= 1, got {batch_size}")
    conversations = load_conversations(dataset, dataset_dir)
    if max_samples is not None:
        conversations = conversations[:max_samples]
    if not conversations:
        raise TnloraError(f"--dataset: {dataset} gives no example to predict")
    total = len(conversations)
    shown = [0]

    def progress(done: int) -> None:
        # about ten lines for the whole dataset
        if log is not None and (done == total or done - shown[0] >= max(1, total // 10)):
            shown[0] = done
            log(f"predicted {done}/{total}")

    loaded.model.eval()
    rows = predict_conversations(
        loaded.model, loaded.tokenizer, loaded.template, conversations, options,
        system=loaded.system, batch_size=batch_size, on_batch=progress,
    )  # fmt: skip
    return PredictResult(rows=rows, metrics=score_predictions(rows))


def plan_predict_output(directory: str | Path, overwrite: bool, inputs: dict[str, str | Path | None]):
    """Check the folder ``--predict`` writes into (before the model loads): new, empty, or an earlier
    ``tnlora eval`` output holding only its own files (replaced with ``overwrite``); never an input."""
    from tnlora.outputs import plan_dir

    return plan_dir(
        directory, "eval", key="--output", overwrite=overwrite, overwrite_flag="--overwrite to replace it",
        inputs=inputs,
    )  # fmt: skip


def write_predictions(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """The rows as JSON Lines, atomically."""
    from tnlora.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_predict_outputs(
    plan, predicted: PredictResult, loss: EvalResult | None = None, **details: Any
) -> Path:
    """Replace the earlier output (its own files only), then write ``predictions.jsonl`` and ``metrics.json``
    (the loss metrics, the prediction metrics and ``details``) atomically, and the marker listing them."""
    from tnlora.io import atomic_write_json
    from tnlora.outputs import claim_dir, clear_previous

    out = Path(plan.directory)
    clear_previous(plan)
    claim_dir(out, "eval")  # first: an interruption leaves a folder recognised as this verb's
    write_predictions(predicted.rows, out / PREDICTIONS_FILE)
    metrics: dict[str, Any] = {}
    if loss is not None:
        metrics.update(eval_loss=loss.loss, eval_ppl=loss.ppl, eval_tokens=loss.tokens, eval_examples=loss.examples)
    metrics.update(predicted.metrics)
    metrics.update(details)
    metrics["written_by"] = EVAL_WRITER
    atomic_write_json(out / METRICS_FILE, metrics)
    claim_dir(out, "eval")
    return out
