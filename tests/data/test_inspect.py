"""tnlora.data.inspect: the `tnlora data inspect` report."""

from __future__ import annotations

import re

from tnlora.data.inspect import MASK_CLOSE, MASK_OPEN, inspect_dataset


def test_report_has_counts_percentiles_truncation_and_a_bracketed_example(data_dir):
    report = inspect_dataset("identity", str(data_dir), "tiny", "transnormer", 256, example=2)
    assert "records: 91, conversations: 91, skipped: 0" in report
    stats = re.search(r"mean ([\d.]+)  p50 (\d+)  p90 (\d+)  p99 (\d+)  max (\d+)", report)
    assert stats is not None
    p50, p90, p99, top = map(int, stats.groups()[1:])
    assert p50 <= p90 <= p99 <= top
    over = int(re.search(r"cutoff_len 256: (\d+) example\(s\) longer", report).group(1))
    assert 0 < over < 91
    assert f"{MASK_OPEN}Human:\nWho are you?\nAssistant:\n{MASK_CLOSE}I am {{{{name}}}}, an AI assistant" in report
    assert report.rstrip().endswith("</s>")
    assert "\x1b[" not in report


def test_report_with_the_real_tokenizer_and_colour(data_dir, baichuan):
    report = inspect_dataset("huanhuan.json", data_dir, baichuan, "chatml", 384, color=True)
    assert "records: 3729" in report and "cutoff_len 384: 0 example(s) longer" in report
    assert f"\x1b[2m{MASK_OPEN}<|im_start|>system\n" in report
    assert f"{MASK_CLOSE}\x1b[0m你放心，本宫到任何时候都不会自轻自贱委屈了这孩子。<|im_end|></s>" in report
