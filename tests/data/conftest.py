"""Fixtures for the data tests: the sample data folder and the tokenizers (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixture_files import SAMPLE_DATA, needs_shared


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """examples/data: the bundled sample records and their dataset_info.json."""
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """../shared/data: LLaMA-Factory's registry and demo sets, huanhuan.json (skips the test when absent)."""
    return needs_shared("data", "dataset_info.json").parent


@pytest.fixture(scope="session")
def sp_tok(sp_model_file):
    """The sample SentencePiece model as a BaiChuanTokenizer. Tests must not add tokens to it (copy first)."""
    from tnlora.model.tokenizer import BaiChuanTokenizer

    return BaiChuanTokenizer(vocab_file=str(sp_model_file))


@pytest.fixture(scope="session")
def baichuan_7b():
    """The real Baichuan-7B tokenizer from ../shared (skips the test when absent). Do not add tokens to it."""
    from tnlora.model.tokenizer import BaiChuanTokenizer

    return BaiChuanTokenizer(vocab_file=str(needs_shared("tokenizers", "baichuan-7b", "tokenizer.model")))


@pytest.fixture
def byte_tok():
    from tnlora.model.tokenizer import ByteTokenizer

    return ByteTokenizer()


@pytest.fixture(params=["sentencepiece", "byte"])
def any_tok(request, sp_tok, byte_tok):
    """Each of our two tokenizer classes (the SentencePiece one is shared: do not add tokens to it)."""
    return sp_tok if request.param == "sentencepiece" else byte_tok
