"""tnlora.model.tokenizer: the Baichuan fast tokenizer against SentencePiece, Auto loading, the byte tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from fixture_files import SAMPLE_CORPUS, SAMPLE_DATA, needs_shared
from tnlora.errors import ConfigError
from tnlora.model.tokenizer import BaiChuanTokenizer, ByteTokenizer, load_tokenizer

# Texts that exercise each SentencePiece rule: dummy prefix before spaces and before user-defined symbols,
# NFKC (full-width letters, ideographic space, ligatures, CR, zero-width space), protected user-defined
# symbols ("，", "\n", digits, "```"), byte fallback (emoji), and the escaped-space character itself.
EDGE_TEXTS = [
    "，你好",
    "\n你好",
    " hello",
    "  two",
    "a  b",
    "123abc",
    "x\r\ny",
    "\t\ttab",
    "ＡＢＣ　全角",
    "ﬁ",
    "😀 and 🦙",
    "<SEP>x",
    "<reserved_5>",
    " ",
    "  ",
    "▁x",
    "a▁▁b",
    "\u200b",
    " \n ",
    "```python\nx = 1\n```",
    "０１２，！？：￥",
    "e\u0301",
    "（括号）",
    "Tab\tand\nnew line",
    "",
]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


@pytest.fixture(scope="module", params=["sample", "baichuan-7b"])
def model_file(request, sp_model_file) -> Path:
    """The session's sample SentencePiece model, and in CI also Baichuan-7B's (the official checkpoints')."""
    if request.param == "sample":
        return sp_model_file
    return needs_shared("tokenizers", "baichuan-7b", "tokenizer.model")


@pytest.fixture(scope="module")
def sp(model_file) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(model_file))


@pytest.fixture(scope="module")
def tok(model_file) -> BaiChuanTokenizer:
    return BaiChuanTokenizer(vocab_file=str(model_file))


@pytest.fixture(scope="module")
def record_texts(model_file, sp_model_file) -> list[str]:
    """Every string field of every record: of the sample data sets, plus the corpus the sample model was
    trained on (line by line and whole), for the sample model; of the real data sets for Baichuan's."""
    if model_file == sp_model_file:
        corpus = SAMPLE_CORPUS.read_text(encoding="utf-8")
        texts = [*corpus.splitlines(), corpus]
        texts += _strings(json.loads((SAMPLE_DATA / "quickstart_alpaca.json").read_text(encoding="utf-8")))
        for line in (SAMPLE_DATA / "quickstart_chat.jsonl").read_text(encoding="utf-8").splitlines():
            texts += _strings(json.loads(line))
        assert len(texts) > 250
        return texts
    texts = []
    for path in sorted(needs_shared("data").glob("*.json")):
        if path.name != "dataset_info.json":
            texts += _strings(json.loads(path.read_text(encoding="utf-8")))
    assert len(texts) > 15000
    return texts


def test_sentencepiece_models_follow_baichuans_conventions(model_file):
    # What lets the sample model stand in for Baichuan-7B's, read from each model's proto.
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert spec.model_type == spec.BPE and spec.byte_fallback
    assert (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id) == (0, 1, 2, -1)
    assert [(p.piece, p.type) for p in proto.pieces[:3]] == [("<unk>", 2), ("<s>", 3), ("</s>", 3)]
    assert (norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces) == (
        "nmt_nfkc", True, False, True,
    )  # fmt: skip
    assert sum(p.type == 6 for p in proto.pieces) == 256  # byte pieces
    user_defined = {p.piece for p in proto.pieces if p.type == 4}
    assert {"\n", "\t", "<SEP>", "0", "9", "０", "，", "！", "```", "<reserved_5>"} <= user_defined


def test_fast_ids_equal_sentencepiece_on_every_record(tok, sp, record_texts):
    texts = record_texts + EDGE_TEXTS
    expected = [sp.encode(t) for t in texts]
    got = tok(texts, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, e, g in zip(texts, expected, got) if e != g]
    assert not mismatches, f"{len(mismatches)} texts differ, e.g. {mismatches[0]!r}"


def test_every_piece_of_the_vocabulary_encodes_like_sentencepiece(tok, sp):
    # Each normal piece, spelled as text (inside a word when it has no leading "▁"), must come back as itself
    # in both tokenizers; this is what makes the fast tokenizer's ``ignore_merges`` shortcut exact.
    words = [
        sp.id_to_piece(i).replace("▁", " ") for i in range(sp.get_piece_size()) if sp.is_unknown(i) is False
    ]
    texts = ["\n" + w for w in words if w and not w.startswith(("<0x", "<s", "</s"))]
    got = tok(texts, add_special_tokens=False)["input_ids"]
    bad = [t for t, g in zip(texts, got) if g != sp.encode(t)]
    assert not bad, f"{len(bad)} pieces differ, e.g. {bad[0]!r}"


def test_decode_equals_sentencepiece_and_round_trips(tok, sp, record_texts):
    texts = record_texts[::3] + EDGE_TEXTS
    ids = [sp.encode(t) for t in texts]
    decoded = tok.batch_decode(ids)
    assert decoded == [sp.decode(i) for i in ids]
    # Text that NFKC leaves alone comes back unchanged.
    plain = [t for t, d, i in zip(texts, decoded, ids) if sp.decode(sp.encode(t)) == t]
    assert len(plain) > 0.9 * len(texts)
    assert all(tok.decode(tok(t, add_special_tokens=False)["input_ids"]) == t for t in plain[:2000])


def test_special_tokens_and_padding_follow_the_official_config(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.add_bos_token is False and tok.add_eos_token is False
    assert tok("你好")["input_ids"] == tok("你好", add_special_tokens=False)["input_ids"]
    batch = tok(["a", "a b c"], padding=True)
    assert batch["input_ids"][0][-1] == 0 and batch["attention_mask"][0][-1] == 0
    # eos typed as text parses as eos (as the official slow tokenizer did), unless special tokens are split.
    assert tok("answer</s>", add_special_tokens=False)["input_ids"][-1] == 2
    assert 2 not in tok("answer</s>", add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_decode_round_trips_around_added_tokens(model_file):
    from tokenizers import AddedToken

    tok = BaiChuanTokenizer(vocab_file=str(model_file))
    tok.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")],
        special_tokens=True,
    )
    text = "<|im_start|>user\n你好 world<|im_end|>\n<|im_start|>assistant\n Hi there.<|im_end|></s>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\n你好 world\nassistant\n Hi there."


@pytest.mark.parametrize("kwargs", [{}, {"trust_remote_code": False}])
def test_autotokenizer_loads_an_official_directory_without_remote_code(official_dir, kwargs):
    from tnlora.data.templates import get_template

    directory = official_dir
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    assert not list(directory.glob("*.py"))
    assert (
        json.loads((directory / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "BaiChuanTokenizer"
    )
    tok = AutoTokenizer.from_pretrained(directory, **kwargs)
    assert isinstance(tok, BaiChuanTokenizer) and tok.is_fast
    assert (tok.pad_token_id, tok.eos_token_id, tok.add_bos_token) == (0, 2, False)
    text = "甄嬛：皇上万福金安。 Hello, 2024!"
    assert tok(text)["input_ids"] == sp.encode(text)
    messages = [{"role": "system", "content": "现在你要扮演甄嬛"}, {"role": "user", "content": "你是谁？"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == get_template("chatml").render_prompt(messages)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_load_tokenizer(tmp_path, official_dir):
    tok = load_tokenizer(official_dir)
    assert isinstance(tok, BaiChuanTokenizer) and tok.pad_token_id == 0
    assert isinstance(load_tokenizer("tiny"), ByteTokenizer)
    with pytest.raises(ConfigError, match=r"is neither a preset .* a checkpoint directory nor a Hugging Face Hub id"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ConfigError, match="preset '1B'"):
        load_tokenizer("1B")


def test_fast_tokenizer_save_load_round_trip(tmp_path, model_file, sp):
    from tokenizers import AddedToken

    text = "<|im_start|>user\n皇上驾到！ 123<|im_end|>"
    tok = BaiChuanTokenizer(vocab_file=str(model_file))
    tok.add_tokens([AddedToken("<|im_end|>", special=True, normalized=False)], special_tokens=True)
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BaiChuanTokenizer" and "auto_map" not in config
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), BaiChuanTokenizer.from_pretrained(tmp_path)):
        assert isinstance(loaded, BaiChuanTokenizer)
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.chat_template == tok.chat_template and loaded.pad_token_id == 0
        assert len(loaded) == sp.get_piece_size() + 1


def test_byte_tokenizer_ids_and_round_trip():
    tok = ByteTokenizer()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.vocab_size == 259 and len(tok) == 259
    text = "Hi 嬛\n"
    ids = tok(text)["input_ids"]
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert tok.decode(ids) == text
    assert tok("x</s>")["input_ids"] == [ord("x") + 3, 2]
    assert tok("x</s>", split_special_tokens=True)["input_ids"] == [b + 3 for b in b"x</s>"]
    assert tok.decode([ord("a") + 3, 2], skip_special_tokens=True) == "a"


def test_byte_tokenizer_save_load_round_trip(tmp_path):
    from tokenizers import AddedToken

    tok = ByteTokenizer()
    tok.add_tokens([AddedToken("<|im_end|>", special=True, normalized=False)], special_tokens=True)
    tok.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), ByteTokenizer.from_pretrained(tmp_path)):
        assert isinstance(loaded, ByteTokenizer)
        assert loaded("a<|im_end|>b")["input_ids"] == [100, 259, 101]
        assert loaded.chat_template == tok.chat_template and loaded.pad_token_id == 0
