"""tnlora eval --predict (tnlora.infer.evaluate's predictions): a generated reply for every example, the same
replies `generate_replies` gives for those prompts, scored by tnlora.infer.metrics, written to a folder that only
tnlora eval's own output may replace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tnlora.cli import main
from tnlora.data.readers import load_conversations
from tnlora.infer.evaluate import METRICS_FILE, PREDICTIONS_FILE
from tnlora.infer.generate import GenerationOptions, generate_replies
from tnlora.infer.loading import load_for_inference
from tnlora.outputs import MARKER

pytest.importorskip("jieba", reason="the generation metrics need the 'eval' extra (jieba, rouge-chinese, nltk)")
pytest.importorskip("rouge_chinese", reason="the generation metrics need the 'eval' extra")
pytest.importorskip("nltk", reason="the generation metrics need the 'eval' extra")

EXAMPLE_DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
NEW_TOKENS = 6


def _eval(adapter_dir: Path, out: Path, dataset: str, *extra: str) -> int:
    return main(["eval", "--adapter", str(adapter_dir), "--dataset", dataset, "--dataset_dir", str(EXAMPLE_DATA),
                 "--predict", "--output", str(out), "--max_new_tokens", str(NEW_TOKENS), *extra])  # fmt: skip


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines()]


def test_predictions_are_the_greedy_replies_scored_and_listed_by_the_marker(adapter_dir, tmp_path, capsys):
    from tnlora.infer.metrics import generation_metrics

    out = tmp_path / "predict"
    assert _eval(adapter_dir, out, "quickstart_alpaca", "--max_samples", "5", "--batch_size", "2") == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("loss ") and printed[1].startswith("bleu-4 ") and printed[1].endswith("examples 5")

    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, METRICS_FILE, PREDICTIONS_FILE])
    assert sorted(json.loads((out / MARKER).read_text())["files"]) == sorted([MARKER, METRICS_FILE, PREDICTIONS_FILE])
    rows = _rows(out)
    conversations = load_conversations("quickstart_alpaca", EXAMPLE_DATA)[:5]
    assert [r["prompt"] for r in rows] == [c.messages[0].content for c in conversations]
    assert [r["reference"] for r in rows] == [c.messages[1].content for c in conversations]

    loaded = load_for_inference(None, adapter_dir)
    options = GenerationOptions(max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.0)
    expected = generate_replies(
        loaded.model, loaded.tokenizer, loaded.template,
        [[{"role": "user", "content": c.messages[0].content}] for c in conversations], options, system=loaded.system,
    )  # fmt: skip
    assert [r["prediction"] for r in rows] == expected

    metrics = json.loads((out / METRICS_FILE).read_text())
    scores = generation_metrics(expected, [r["reference"] for r in rows])
    for key, value in scores.items():
        assert metrics[f"predict_{key}"] == pytest.approx(value, abs=1e-9), key
    assert metrics["eval_examples"] == 5 and metrics["eval_loss"] > 0
    assert metrics["generation"]["max_new_tokens"] == NEW_TOKENS and metrics["generation"]["do_sample"] is False
    assert metrics["written_by"] == "tnlora eval" and metrics["adapter"] == str(adapter_dir)


def test_multi_turn_records_keep_their_history_and_system(adapter_dir, tmp_path):
    out = tmp_path / "predict"
    assert _eval(adapter_dir, out, "quickstart_chat", "--max_samples", "3") == 0
    rows = _rows(out)
    conversations = load_conversations("quickstart_chat", EXAMPLE_DATA)[:3]
    loaded = load_for_inference(None, adapter_dir)
    options = GenerationOptions(max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.0)
    for row, conv in zip(rows, conversations):
        history = [{"role": m.role, "content": m.content} for m in conv.messages[:-2]]
        assert row.get("history", []) == history
        assert row.get("system") == conv.system
        assert row["prompt"] == conv.messages[-2].content and row["reference"] == conv.messages[-1].content
        want = generate_replies(loaded.model, loaded.tokenizer, loaded.template,
                                [[*history, {"role": "user", "content": row["prompt"]}]], options,
                                system=conv.system if conv.system is not None else loaded.system)  # fmt: skip
        assert row["prediction"] == want[0]
    assert rows[0]["system"] == "You are Tini, a tiny and friendly assistant." and "system" not in rows[1]


def test_predict_output_is_replaced_only_with_overwrite_and_only_when_it_is_an_eval_output(
    adapter_dir, tmp_path, capsys
):
    out = tmp_path / "predict"
    argv = ("quickstart_alpaca", "--max_samples", "2")
    assert _eval(adapter_dir, out, *argv) == 0
    capsys.readouterr()
    assert _eval(adapter_dir, out, *argv) == 2
    assert capsys.readouterr().err == f"error: --output: {out} holds an earlier tnlora eval output; pass --overwrite " \
                                      "to replace it\n"  # fmt: skip
    assert _eval(adapter_dir, out, *argv, "--overwrite") == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert _eval(adapter_dir, mine, *argv, "--overwrite") == 2
    assert "was not written by tnlora eval" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep"
    assert _eval(adapter_dir, adapter_dir, *argv) == 2  # the adapter is an input
    assert "holds the adapter" in capsys.readouterr().err


def test_predict_refusals_are_one_line_before_the_model_loads(adapter_dir, tmp_path, capsys):
    argv = ["eval", "--adapter", str(adapter_dir), "--dataset", "quickstart_alpaca", "--dataset_dir",
            str(EXAMPLE_DATA), "--predict"]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "error: --predict: needs --output DIR, the folder for predictions.jsonl and metrics.json\n"
    )
    assert main([*argv, "--output", str(tmp_path / "p"), "--max_new_tokens", "0"]) == 2
    assert capsys.readouterr().err == "error: --max_new_tokens: must be >= 1, got 0\n"
    assert not (tmp_path / "p").exists()
