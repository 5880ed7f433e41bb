"""tnlora.data.audit: duplicates, eval examples also in training, empty replies, shared replies, length outliers
and scripts, on a committed sample whose findings are known and on huanhuan.json (../shared)."""

from __future__ import annotations

import json

from fixture_files import FIXTURES
from tnlora.data.audit import (
    MANY_PROMPTS,
    audit_conversations,
    audit_dataset,
    drop_exact_duplicates,
    normalize_text,
)
from tnlora.data.readers import Conversation, Message, load_conversations

SAMPLE = FIXTURES / "data" / "audit_sample.json"
SAMPLE_EVAL = FIXTURES / "data" / "audit_eval.json"


def _conv(user: str, reply: str, system: str | None = None, n: int = 0) -> Conversation:
    return Conversation([Message("user", user), Message("assistant", reply)], system, f"made, record {n}")


def test_normalising_folds_width_case_whitespace_and_punctuation():
    assert normalize_text("ＨＥＬＬＯ,   World!!") == "hello world"
    assert normalize_text("你是谁？") == normalize_text("你是谁?") == "你是谁"
    assert normalize_text("  a\t-\nb  ") == "a b"


def test_the_sample_findings_are_the_known_ones():
    audit = audit_dataset(str(SAMPLE))
    assert audit.records == 13
    # 你是谁 ×3 (records 1, 3, 6), Hello ×2 (2, 4); the France record with a system prompt is another record
    assert [(g.count, g.first) for g in audit.exact_groups] == [(3, 0), (2, 1)]
    assert audit.exact_repeats == 3
    # hello! → "Hi,  there" and ＨＥＬＬＯ → "hi there." are Hello → "Hi there." once normalised
    assert [(g.count, g.variants, g.first) for g in audit.near_groups] == [(4, 3, 1)]
    assert audit.near_repeats == 2
    assert [(r.reply, r.prompts, r.records) for r in audit.shared_replies] == [("是。", 3, 3)]
    assert audit.empty_replies == 0 and audit.overlap is None
    text = audit.render()
    assert "3 records repeat another one (2 distinct records)" in text
    assert f"    3× 你是谁？ → 我是甄嬛，家父是大理寺少卿甄远道。  (first: {SAMPLE}, record 1)" in text
    assert "2 more records repeat another one (1 groups)" in text
    assert f"one reply after many different prompts (≥ {MANY_PROMPTS} prompts):\n    3 prompts (3 records) → 是。" in text


def test_eval_examples_in_the_training_data_are_counted_exact_and_near():
    audit = audit_dataset(str(SAMPLE), eval_dataset=str(SAMPLE_EVAL))
    o = audit.overlap
    assert (o.eval_examples, o.exact, o.near) == (3, 1, 1)
    assert o.first_sources == [f"{SAMPLE_EVAL}, record 1", f"{SAMPLE_EVAL}, record 2"]
    assert f"eval dataset {SAMPLE_EVAL}: 2 of 3 examples also in the training data (exact 1, near 1;" in audit.render()


def test_a_split_is_audited_as_train_against_eval():
    records = load_conversations(str(SAMPLE))
    train, held = records[:5], records[5:]  # held: 你是谁 (exact of 1), 是 ×3, ＨＥＬＬＯ (near of 2), France ×2, 猫
    audit = audit_conversations(records, train=train, eval=held, eval_label="the split")
    assert (audit.overlap.eval_examples, audit.overlap.exact, audit.overlap.near) == (8, 1, 1)


def test_empty_replies_skipped_by_the_reader_are_counted(tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "  "},
                                {"instruction": "d", "output": ""}]))  # fmt: skip
    audit = audit_dataset(str(data), skip_invalid=True)
    assert audit.records == 1 and audit.empty_replies == 2
    assert f"empty or whitespace-only replies: 2 (skipped; first: {data}, record 2, field 'output': empty response)" \
        in audit.render()  # fmt: skip
    made = audit_conversations([_conv("a", "b"), _conv("c", " \n", n=2)])
    assert made.empty_replies == 1 and made.first_empty == "made, record 2"


def test_length_outliers_are_records_above_twice_the_99th_percentile():
    # 200 records of 2 + 10..19 characters; p99 (nearest rank: the 198th) = 21; one record of 2 + 50 is above 42
    records = [_conv("q" + str(i % 10), "x" * (10 + i % 10), n=i) for i in range(199)]
    records.append(_conv("q", "y" * 50, n=199))
    records.append(_conv("q", "y" * 41, n=200))  # 42: not above 2 × p99
    audit = audit_conversations(records)
    ordered = sorted(len(c.messages[0].content) + len(c.messages[1].content) for c in records)
    assert audit.length_p99 == ordered[198] == 21
    assert audit.length_outliers == [(51, "made, record 199")]
    assert "outliers (above 2 × p99 = 42): 1" in audit.render()


def test_script_shares_count_letters_only():
    audit = audit_conversations([_conv("abc 你好!", "Déjà 123 вы")])
    # letters: a b c D é j à (Latin 7), 你 好 (Han 2), в ы (other 2); digits, spaces and punctuation not counted
    assert dict(audit.letters) == {"Latin": 7, "Han": 2, "other": 2}
    assert "letters by script: Latin 63.6%, Han 18.2%, other 18.2%" in audit.render()


def test_drop_exact_duplicates_keeps_the_first_and_the_order():
    records = load_conversations(str(SAMPLE))
    kept, dropped = drop_exact_duplicates(records)
    assert dropped == 3 and len(kept) == 10
    assert [c.source for c in kept][:3] == [f"{SAMPLE}, record 1", f"{SAMPLE}, record 2", f"{SAMPLE}, record 5"]
    assert drop_exact_duplicates(kept) == (kept, 0)


def test_huanhuan_holds_112_repeats_of_7_records(shared_data_dir):
    audit = audit_dataset(str(shared_data_dir / "huanhuan.json"))
    assert audit.records == 3729
    assert audit.exact_repeats == 112 and len(audit.exact_groups) == 7
    assert [g.count for g in audit.exact_groups[:2]] == [50, 50]
    assert drop_exact_duplicates(load_conversations(str(shared_data_dir / "huanhuan.json")))[1] == 112
