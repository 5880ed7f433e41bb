"""Where the tests' files come from: fixtures committed under tests/fixtures, the sample data under
examples/data, a small SentencePiece model the session trains, and (optionally) the ``shared/`` folder of the
project's CI beside the repository.

Nothing here may be required from ``../shared``: a test that is about the real files calls ``needs_shared``,
which skips it with a one-line reason when they are absent.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
# The official OpenNLPLab configuration files (tests/fixtures/README.md says where each comes from).
OFFICIAL_CONFIGS = FIXTURES / "models"
SAMPLE_DATA = ROOT / "examples" / "data"
SAMPLE_CORPUS = FIXTURES / "tokenizer" / "corpus.txt"
# CI clones the repository and puts shared/ beside it: the real tokenizer, data sets and configuration files.
SHARED = (ROOT / ".." / "shared").resolve()

# The sample SentencePiece model's size: small enough to train in well under a second, large enough that BPE
# merges whole Chinese words and English sub-words (the training fails rather than silently giving fewer).
SAMPLE_VOCAB_SIZE = 1200
# Baichuan-7B's user-defined symbols, abridged: markup, digits (so numbers split into single digits), full-width
# digits and punctuation that NFKC would rewrite, multi-character symbols, reserved slots. Baichuan's model was
# trained with "<LF>" and "<tab>" and had those two pieces renamed to "\n" and "\t" afterwards; so is this one.
_USER_DEFINED = [
    "<SEP>", "<CLS>", "<LF>", "<tab>", "<p>", "</p>", "<b>", "</b>", "<br/>", "<h1>", "</h1>",
    *"0123456789", *"０１２３４５６７８９", *"，。！？、：￥.!?《》【】『』",
    "```", "<!--", "-->", "---", *(f"<reserved_{i}>" for i in range(8)),
]  # fmt: skip
_RENAMED = {"<LF>": "\n", "<tab>": "\t"}


def needs_shared(*parts: str) -> Path:
    """``../shared/<parts>``, or skip the calling test when it is absent (only CI has that folder)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared (the project's CI has it): {'/'.join(parts)}")
    return path


def build_sample_sentencepiece(out: Path) -> Path:
    """Train a SentencePiece BPE model on ``SAMPLE_CORPUS`` with Baichuan-7B's settings; return its path.

    As in Baichuan's ``tokenizer.model``: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no pad piece, byte fallback (256
    ``<0xNN>`` pieces), the nmt_nfkc normaliser, a dummy prefix, extra whitespace kept, user-defined symbols
    (among them "\\n" and "\\t"). Deterministic: one thread and every sentence used.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    lines = SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=SAMPLE_VOCAB_SIZE,
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        max_sentencepiece_length=10,
        user_defined_symbols=_USER_DEFINED,
        num_threads=1,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    for piece in proto.pieces:
        piece.piece = _RENAMED.get(piece.piece, piece.piece)
    assert len(proto.pieces) == SAMPLE_VOCAB_SIZE
    path = out / "tokenizer.model"
    path.write_bytes(proto.SerializeToString())
    return path
