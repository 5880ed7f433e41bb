"""Generation metrics of predicted replies against references, computed the way LLaMA-Factory's
``predict_with_generate`` computes them, so the numbers compare with its reports:

- BLEU-4: nltk's ``sentence_bleu`` over characters (``list(text)``), smoothed with ``SmoothingFunction().method3``;
- ROUGE-1 / ROUGE-2 / ROUGE-L: ``rouge_chinese`` F1 over words as jieba segments them (Chinese is cut into words;
  other text falls into its whitespace-separated words, jieba keeps those whole); 0 when either side has no word;

each rounded to 4 decimals per example (×100), then averaged over the examples. Beside them: exact match (the
share of replies equal to their reference, both stripped, ×100) and the mean length of replies and references in
characters. The libraries are the optional extra ``eval`` (``pip install 'tnlora[eval]'``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from tnlora.errors import TnloraError

EXTRA = "pip install 'tnlora[eval]'"
SIMILARITY_KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


@functools.cache
def _libraries() -> tuple[Any, Any, Any, Any]:
    """(jieba, Rouge, sentence_bleu, SmoothingFunction), imported once; a missing one is a one-line error."""
    try:
        import logging

        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as exc:
        raise TnloraError(
            f"the generation metrics need jieba, rouge-chinese and nltk ({exc.name} is missing): {EXTRA}"
        ) from None
    # jieba announces building its dictionary on every first use; the metrics' output is the report.
    jieba.setLogLevel(logging.WARNING)
    return jieba, Rouge, sentence_bleu, SmoothingFunction


def check_metric_libraries() -> None:
    """Refuse early (before a model loads) when the metric libraries are not installed."""
    _libraries()


def similarity(prediction: str, reference: str) -> dict[str, float]:
    """BLEU-4 and ROUGE-1/2/L F1 (×100, rounded to 4 decimals) of one prediction against its reference."""
    jieba, Rouge, sentence_bleu, SmoothingFunction = _libraries()
    hypothesis = " ".join(jieba.cut(prediction))
    reference_words = " ".join(jieba.cut(reference))
    if not hypothesis.split() or not reference_words.split():
        rouge = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        scores = Rouge().get_scores(hypothesis, reference_words)[0]
        rouge = {key: scores[key]["f"] for key in ("rouge-1", "rouge-2", "rouge-l")}
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    out = {"bleu-4": round(float(bleu) * 100, 4)}
    out.update({key: round(value * 100, 4) for key, value in rouge.items()})
    return out


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The averages over examples: ``bleu-4``, ``rouge-1``, ``rouge-2``, ``rouge-l``, ``exact_match`` (all ×100),
    ``reply_chars`` and ``reference_chars`` (mean lengths) and ``examples``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise TnloraError("no examples to score")
    n = len(predictions)
    sums = dict.fromkeys(SIMILARITY_KEYS, 0.0)
    for prediction, reference in zip(predictions, references):
        for key, value in similarity(prediction, reference).items():
            sums[key] += value
    metrics = {key: value / n for key, value in sums.items()}
    metrics["exact_match"] = 100 * sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n
    metrics["reply_chars"] = sum(len(p) for p in predictions) / n
    metrics["reference_chars"] = sum(len(r) for r in references) / n
    metrics["examples"] = n
    return metrics
