"""tnlora.data.inspect: the `tnlora data inspect` report."""

from __future__ import annotations

import re

from fixture_files import SAMPLE_VOCAB_SIZE
from tnlora.data.inspect import MASK_CLOSE, MASK_OPEN, inspect_dataset


def test_report_has_counts_percentiles_truncation_and_a_bracketed_example(data_dir):
    report = inspect_dataset("quickstart_alpaca", str(data_dir), "tiny", "transnormer", 80, example=2)
    assert "records: 50, conversations: 50, skipped: 0" in report
    stats = re.search(r"mean ([\d.]+)  p50 (\d+)  p90 (\d+)  p99 (\d+)  max (\d+)", report)
    assert stats is not None
    p50, p90, p99, top = map(int, stats.groups()[1:])
    assert p50 <= p90 <= p99 <= top
    over = int(re.search(r"cutoff_len 80: (\d+) example\(s\) longer", report).group(1))
    assert 0 < over < 50
    rendered = f"{MASK_OPEN}Human:\nWhat is the capital of Italy?\nAssistant:\n{MASK_CLOSE}The capital of Italy is Rome."
    assert rendered in report
    example, audit = report.split("\n\naudit of ")
    assert example.rstrip().endswith("</s>")
    assert audit.startswith("50 records:\n  exact duplicates (same system prompt and messages): none")
    assert "\x1b[" not in report


def test_report_with_a_sentencepiece_tokenizer_and_colour(data_dir, sp_tok):
    report = inspect_dataset("quickstart_chat", data_dir, sp_tok, "chatml", 384, color=True)
    assert "records: 10" in report and "cutoff_len 384: 0 example(s) longer" in report
    assert f"tokenizer: BaiChuanTokenizer ({SAMPLE_VOCAB_SIZE} tokens)" in report
    assert f"\x1b[2m{MASK_OPEN}<|im_start|>system\n" in report
    assert f"{MASK_CLOSE}\x1b[0m2 + 2 = 4.<|im_end|></s>" in report
