"""tnlora.data.encode: masks, piece boundaries, truncation, packing, collators, sampler, cache."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from fixture_files import SAMPLE_CORPUS
from tnlora.data import encode
from tnlora.data.collate import PackingCollator, PaddingCollator, pack_examples
from tnlora.data.encode import (
    IGNORE_INDEX,
    EncodedExample,
    build_dataset,
    encode_conversation,
    encode_prompt,
)
from tnlora.data.readers import Conversation, Message, load_conversations
from tnlora.data.templates import TEMPLATES, add_template_tokens, get_template

SINGLE = Conversation([Message("user", "皇上驾到！"), Message("assistant", "皇上万福金安。")], None, "single")
MULTI = Conversation(
    [Message("user", "Who are you?"), Message("assistant", "I am 甄嬛."), Message("user", "多大了？"),
     Message("assistant", "十七。"), Message("user", "And then\nwhat?"), Message("assistant", "Then 2 more.")],
    "You are 甄嬛.",
    "multi",
)  # fmt: skip


def learned_runs(example: EncodedExample) -> list[list[int]]:
    """Maximal runs of learned tokens (labels equal to the ids)."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conv", [SINGLE, MULTI], ids=["single", "multi"])
def test_learned_tokens_are_each_answer_plus_end_marker_plus_eos(any_tok, name, conv):
    template = get_template(name)
    example = encode_conversation(conv, any_tok, template, cutoff_len=4096)
    answers = [m.content for m in conv.messages if m.role == "assistant"]
    decoded = [any_tok.decode(run) for run in learned_runs(example)]
    assert decoded == [a + template.end_marker + any_tok.eos_token for a in answers]
    assert example.input_ids[-1] == any_tok.eos_token_id and not example.truncated


@pytest.fixture(params=["sample", "baichuan-7b"])
def tokenizer_and_conversations(request, sp_tok, data_dir):
    """The sample tokenizer on the sample records and corpus lines (as question/answer pairs); in CI also the
    real Baichuan tokenizer on a spread of the real data sets."""
    if request.param == "sample":
        # Lines that end in ">" are left out: a message and the marker after it are tokenised apart, while in
        # the whole text BPE may merge that ">" with the marker's "<" (a known limit of these equalities).
        lines = [s for s in SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines() if not s.endswith(">")]
        pairs = [Conversation([Message("user", q), Message("assistant", a)], None, f"corpus pair {i}")
                 for i, (q, a) in enumerate(zip(lines[::2], lines[1::2]))]  # fmt: skip
        samples = load_conversations("quickstart_alpaca,quickstart_chat", dataset_dir=data_dir)
        return sp_tok, [*samples, *pairs, SINGLE, MULTI]
    tok, shared = request.getfixturevalue("baichuan_7b"), request.getfixturevalue("shared_data_dir")
    real = load_conversations("huanhuan.json,identity,alpaca_zh_demo", dataset_dir=shared)
    return tok, [*real[::23], MULTI]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_pieces_concatenate_to_the_tokenisation_of_the_rendered_text(tokenizer_and_conversations, name):
    # What training concatenates is what the tokenizer makes of the whole text: the prompt part equals
    # tokenizer(render_prompt), so inference (and encode_prompt) see the same ids.
    tok, convs = tokenizer_and_conversations
    template = get_template(name)
    examples, _ = build_dataset(convs, tok, template, 100_000)
    for conv, example in zip(convs, examples):
        prompt = template.render_prompt(conv.messages[:-1], conv.system)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert example.input_ids[: len(prompt_ids)] == prompt_ids, conv.source
        if template.assistant_prefix:  # "raw" has nothing between question and answer, so BPE may merge there
            full = prompt + conv.messages[-1].content + template.end_marker + tok.eos_token
            assert example.input_ids == tok(full, add_special_tokens=False)["input_ids"], conv.source
    assert encode_prompt(MULTI.messages[:-1], tok, template, MULTI.system) == tok(
        template.render_prompt(MULTI.messages[:-1], MULTI.system), add_special_tokens=False
    )["input_ids"]


def test_template_tokens_are_single_learned_ids(sp_tok):
    tok = copy.deepcopy(sp_tok)
    template = get_template("chatml")
    _, end = add_template_tokens(tok, template)
    example = encode_conversation(MULTI, tok, template, 4096)
    assert example.input_ids.count(end) == 3 + 3 + 1  # system, 3 user turns, 3 answers
    assert [run[-2:] for run in learned_runs(example)] == [[end, 2]] * 3
    prompt = template.render_prompt(MULTI.messages[:-1], MULTI.system)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert encode_prompt(MULTI.messages[:-1], tok, template, MULTI.system) == prompt_ids


def test_user_text_that_looks_like_eos_stays_text(any_tok):
    conv = Conversation([Message("user", "type </s> here"), Message("assistant", "ok </s> done")], "", "x")
    example = encode_conversation(conv, any_tok, get_template("transnormer"), 4096)
    assert example.input_ids.count(any_tok.eos_token_id) == 1


def test_mask_history_learns_only_the_last_answer(any_tok):
    template = get_template("chatml")
    example = encode_conversation(MULTI, any_tok, template, 4096, mask_history=True)
    assert [any_tok.decode(r) for r in learned_runs(example)] == ["Then 2 more.<|im_end|>" + any_tok.eos_token]
    assert example.input_ids == encode_conversation(MULTI, any_tok, template, 4096).input_ids


def test_train_on_prompt_learns_everything(byte_tok):
    example = encode_conversation(MULTI, byte_tok, get_template("alpaca"), 4096, train_on_prompt=True)
    assert example.labels == example.input_ids


def lengths_of(conv: Conversation, tok, template) -> tuple[int, int]:
    """(full length, learned length) of an untruncated conversation."""
    example = encode_conversation(conv, tok, template, 10_000)
    return len(example.input_ids), sum(label != IGNORE_INDEX for label in example.labels)


def test_truncation_drops_old_turns_then_cuts_the_last_question_never_an_answer(byte_tok):
    template = get_template("transnormer")
    full, _ = lengths_of(MULTI, byte_tok, template)
    last_turn = Conversation(MULTI.messages[-2:], MULTI.system, "x")
    last_len, last_learned = lengths_of(last_turn, byte_tok, template)

    kept = encode_conversation(MULTI, byte_tok, template, cutoff_len=last_len)  # old turns dropped
    assert kept.truncated and len(kept.input_ids) == last_len
    assert [byte_tok.decode(r) for r in learned_runs(kept)] == ["Then 2 more.</s>"]

    cut = encode_conversation(last_turn, byte_tok, template, cutoff_len=last_len - 3)  # question cut
    assert cut.truncated and len(cut.input_ids) == last_len - 3
    assert byte_tok.decode(cut.input_ids).startswith("You are 甄嬛.\nHuman:\nAnd then\nwh\nAssistant:\n")
    assert [byte_tok.decode(r) for r in learned_runs(cut)] == ["Then 2 more.</s>"]

    dropped = encode_conversation(last_turn, byte_tok, template, cutoff_len=last_learned + 5)
    assert dropped.dropped and "leaves no room for its prompt" in dropped.dropped and not dropped.input_ids

    convs = [MULTI, last_turn, SINGLE]
    examples, stats = build_dataset(convs, byte_tok, template, cutoff_len=last_len - 3)
    assert (stats.examples, stats.kept, stats.truncated, stats.dropped) == (3, 3, 2, 0)
    assert full > last_len and all(len(e.input_ids) <= last_len - 3 for e in examples)
    # 45 tokens: SINGLE still fits with its question cut; the others' system text alone leaves no room.
    examples, stats = build_dataset(convs, byte_tok, template, cutoff_len=45)
    assert (stats.kept, stats.truncated, stats.dropped) == (1, 1, 2)
    assert stats.first_dropped.startswith("multi: the answer")
    assert "2 dropped" in stats.summary()


def test_pack_examples_rows_seq_ids_and_labels(byte_tok):
    template = get_template("chatml")
    convs = [Conversation([Message("user", "q" * n), Message("assistant", "a" * (n % 7 + 1))], "", str(n))
             for n in range(1, 40, 3)]  # fmt: skip
    examples, _ = build_dataset(convs, byte_tok, template, cutoff_len=256)
    rows = pack_examples(examples, max_length=256)
    assert len(rows) < len(examples)
    seen = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["seq_ids"]) <= 256
        for _, group in itertools.groupby(range(len(row["seq_ids"])), key=lambda i: row["seq_ids"][i]):
            span = list(group)
            ids = [row["input_ids"][i] for i in span]
            labels = [row["labels"][i] for i in span]
            original = next(e for e in examples if e.input_ids == ids)
            assert labels == [IGNORE_INDEX, *original.labels[1:]]  # no loss across the example boundary
            seen.append(examples.index(original))
    assert sorted(seen) == list(range(len(examples)))

    batch = PackingCollator(max_length=256)(rows[:2])
    assert batch["input_ids"].shape == batch["seq_ids"].shape == (2, 256)
    n = len(rows[1]["input_ids"])
    assert batch["attention_mask"][1].sum() == n and (batch["labels"][1, n:] == IGNORE_INDEX).all()
    if n < 256:
        assert batch["seq_ids"][1, n] == max(rows[1]["seq_ids"]) + 1


def test_packing_collator_packs_plain_examples_in_order(byte_tok):
    examples = [EncodedExample([5] * 10, [5] * 10), EncodedExample([6] * 7, [6] * 7), EncodedExample([7] * 9, [7] * 9)]
    batch = PackingCollator(max_length=20)(examples)
    assert batch["input_ids"].shape == (2, 20)
    assert batch["seq_ids"][0, :17].tolist() == [0] * 10 + [1] * 7 and batch["seq_ids"][0, 17] == 2
    assert batch["labels"][0, 10] == IGNORE_INDEX and batch["labels"][0, 11] == 6


def test_padding_collator_right_pads_with_zero_and_minus_100():
    batch = PaddingCollator(pad_token_id=0, pad_to_multiple_of=4)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, EncodedExample([8], [8])]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_cache_hit_does_not_retokenise(byte_tok, tmp_path, monkeypatch, data_dir):
    convs = load_conversations("quickstart_alpaca", dataset_dir=data_dir)
    template = get_template("chatml")
    first, stats = build_dataset(convs, byte_tok, template, 256, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("tokenised on a cache hit")

    monkeypatch.setattr(encode.PieceEncoder, "encode", refuse)
    again, stats_again = build_dataset(convs, byte_tok, template, 256, cache_dir=tmp_path)
    assert [(e.input_ids, e.labels, e.truncated) for e in again] == [(e.input_ids, e.labels, e.truncated) for e in first]
    assert stats_again == stats
    with pytest.raises(AssertionError, match="tokenised on a cache hit"):  # other settings: a miss
        build_dataset(convs, byte_tok, template, 512, cache_dir=tmp_path)


def test_packed_row_logits_equal_separate_examples(byte_tok):
    from tnlora.model import load_model

    model = load_model("tiny").float().eval()
    template = get_template("chatml")
    convs = [SINGLE, MULTI, Conversation([Message("user", "hi"), Message("assistant", "hello")], "", "x")]
    examples, _ = build_dataset(convs, byte_tok, template, 512)
    batch = PackingCollator(max_length=640)(examples)
    assert batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       seq_ids=batch["seq_ids"]).logits[0]  # fmt: skip
        leaky = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
        start = 0
        for example in examples:
            alone = model(input_ids=torch.tensor([example.input_ids])).logits[0]
            part = packed[start : start + len(example.input_ids)]
            torch.testing.assert_close(part, alone, rtol=1e-5, atol=1e-5)
            if start:  # without seq_ids, state from the previous example leaks in: the check has teeth
                assert (leaky[start : start + len(example.input_ids)] - alone).abs().max() > 1e-2
            start += len(example.input_ids)
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_several_tokenising_processes_give_the_same_result(byte_tok, monkeypatch):
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples" / "data"
    base = load_conversations("quickstart_alpaca,quickstart_chat", dataset_dir=examples)
    convs = [c for _ in range(2 * encode.ENCODE_BATCH // len(base) + 1) for c in base]  # three batches
    template = get_template("chatml")
    pools = []

    class CountedPool(encode.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(encode, "ProcessPoolExecutor", CountedPool)
    one, one_stats = build_dataset(convs, byte_tok, template, 160)
    assert pools == []
    two, two_stats = build_dataset(convs, byte_tok, template, 160, num_workers=2)
    assert pools == [2]
    assert [(e.input_ids, e.labels, e.truncated) for e in two] == [(e.input_ids, e.labels, e.truncated) for e in one]
    assert two_stats == one_stats and one_stats.truncated > 0 and one_stats.dropped > 0
