"""Fixtures for the data tests: the shared data folder and both tokenizers (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

# CI clones the repository elsewhere and puts shared/ beside it.
SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
DATA_DIR = SHARED / "data"
SP_MODEL = SHARED / "tokenizers" / "baichuan-7b" / "tokenizer.model"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def baichuan():
    """The real Baichuan tokenizer, built from tokenizer.model. Tests must not add tokens to it (copy first)."""
    from tnlora.model.tokenizer import BaiChuanTokenizer

    return BaiChuanTokenizer(vocab_file=str(SP_MODEL))


@pytest.fixture
def byte_tok():
    from tnlora.model.tokenizer import ByteTokenizer

    return ByteTokenizer()


@pytest.fixture(params=["baichuan", "byte"])
def any_tok(request, baichuan, byte_tok):
    """Each of our two tokenizers (the Baichuan one is shared: do not add tokens to it)."""
    return baichuan if request.param == "baichuan" else byte_tok
