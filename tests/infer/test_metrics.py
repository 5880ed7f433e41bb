"""Generation metrics (tnlora.infer.metrics) against values worked out by hand."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("jieba", reason="the generation metrics need the 'eval' extra (jieba, rouge-chinese, nltk)")
pytest.importorskip("rouge_chinese", reason="the generation metrics need the 'eval' extra")
pytest.importorskip("nltk", reason="the generation metrics need the 'eval' extra")

from tnlora.errors import TnloraError
from tnlora.infer import metrics


def test_identical_texts_score_100_on_every_metric():
    text = "皇上好，我是甄嬛，家父是大理寺少卿甄远道。"
    assert metrics.similarity(text, text) == {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}
    english = "The capital of France is Paris."
    assert metrics.similarity(english, english)["bleu-4"] == 100.0


def test_a_partial_overlap_in_chinese_matches_the_hand_computation():
    # jieba: 我|爱|上海 against 我|爱|北京|天安门.
    got = metrics.similarity("我爱上海", "我爱北京天安门")
    # ROUGE-1: 2 of 3 predicted words, 2 of 4 reference words: F = 2·(2/3)(1/2) / (2/3 + 1/2) = 4/7.
    assert got["rouge-1"] == round(100 * 4 / 7, 4)
    # ROUGE-2: bigrams 我爱, 爱上海 against 我爱, 爱北京, 北京天安门: P 1/2, R 1/3, F = 2/5.
    assert got["rouge-2"] == 40.0
    # ROUGE-L: the longest common subsequence is 我 爱 (2 words): the same P and R as ROUGE-1.
    assert got["rouge-l"] == round(100 * 4 / 7, 4)
    # BLEU-4 over characters (4 predicted, 7 reference): p1 = 2/4, p2 = 1/3 (我爱 of 我爱, 爱上, 上海); no 3- or
    # 4-gram matches, which method3 smooths to 1/(2·2) and 1/(4·1); brevity penalty exp(1 − 7/4).
    bleu = (0.5 * (1 / 3) * 0.25 * 0.25) ** 0.25 * math.exp(1 - 7 / 4)
    assert got["bleu-4"] == round(100 * bleu, 4)


def test_english_is_scored_on_its_whitespace_words():
    got = metrics.similarity("the cat sat", "the cat sat on the mat")
    # words: 3 predicted, 5 distinct in the reference (the, cat, sat, on, mat); all 3 predicted match.
    p, r = 1.0, 3 / 5
    assert got["rouge-1"] == round(100 * 2 * p * r / (p + r), 4)
    # bigrams: (the cat), (cat sat) against 5 distinct reference bigrams, both matched.
    p2, r2 = 1.0, 2 / 5
    assert got["rouge-2"] == round(100 * 2 * p2 * r2 / (p2 + r2), 4)


def test_an_empty_prediction_scores_zero():
    assert metrics.similarity("", "我是甄嬛") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_averages_exact_match_and_lengths_over_examples():
    predictions = ["我爱上海", "我是甄嬛。", " 谢皇上。 "]
    references = ["我爱北京天安门", "我是甄嬛。", "谢皇上。"]
    got = metrics.generation_metrics(predictions, references)
    each = [metrics.similarity(p, r) for p, r in zip(predictions, references)]
    for key in metrics.SIMILARITY_KEYS:
        assert got[key] == pytest.approx(sum(e[key] for e in each) / 3, abs=1e-12)
    assert got["exact_match"] == pytest.approx(200 / 3)  # the last one differs only in outer whitespace
    assert got["reply_chars"] == pytest.approx((4 + 5 + 6) / 3)
    assert got["reference_chars"] == pytest.approx((7 + 5 + 4) / 3)
    assert got["examples"] == 3


def test_no_example_is_a_clear_error():
    with pytest.raises(TnloraError, match="no examples to score"):
        metrics.generation_metrics([], [])


def test_missing_libraries_name_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_jieba(name, *args, **kwargs):
        if name == "jieba":
            raise ImportError("No module named 'jieba'", name="jieba")
        return real_import(name, *args, **kwargs)

    metrics._libraries.cache_clear()
    monkeypatch.setattr(builtins, "__import__", without_jieba)
    try:
        with pytest.raises(TnloraError) as info:
            metrics.check_metric_libraries()
    finally:
        monkeypatch.undo()
        metrics._libraries.cache_clear()
    assert str(info.value) == (
        "the generation metrics need jieba, rouge-chinese and nltk (jieba is missing): pip install 'tnlora[eval]'"
    )
