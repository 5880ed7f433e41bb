"""serve/text.py: streamed text of generated tokens equals the whole reply decoded at once, and never shows a
stop string or part of one."""

from __future__ import annotations

import functools
import random
import re
from pathlib import Path

import pytest

from tnlora.model.tokenizer import ByteTokenizer, load_tokenizer
from tnlora.serve.text import IncrementalDetokenizer, ReplyText

BAICHUAN = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "baichuan-7b"
SAMPLES = ["Hello, world!", "数学 is fun ✓ — naïve café 😀", "line one\nline two\n\n  indented", "a" * 50]


@functools.cache
def baichuan():
    return load_tokenizer(BAICHUAN)


def stream(tokenizer, ids: list[int], fast: bool | None = None) -> tuple[list[str], str]:
    detokenizer = IncrementalDetokenizer(tokenizer, fast=fast)
    pieces = [detokenizer.push(i) for i in ids]
    return pieces, "".join(pieces) + detokenizer.flush()


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_stream_equals_whole_decode_and_holds_back_split_characters(text: str) -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, joined = stream(tokenizer, ids)
    assert joined == text and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # a multi-byte character goes out whole, once complete


def test_invalid_bytes_go_out_as_replacement_characters_after_a_few_tokens() -> None:
    tokenizer = ByteTokenizer()
    continuation = 0x80 + 3  # a lone UTF-8 continuation byte, never completed
    ids = [continuation] * 12 + tokenizer.encode("ok", add_special_tokens=False)
    pieces, joined = stream(tokenizer, ids)
    assert joined == tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces[:8])  # streamed before the end, not held until the flush


def test_random_byte_ids_stream_every_ascii_character_once_and_in_order() -> None:
    """Invalid UTF-8 comes out as replacement characters, possibly grouped unlike a whole decode groups them;
    nothing valid around it is lost, repeated or held back until the end."""
    tokenizer = ByteTokenizer()
    rng = random.Random(0)

    def ascii_only(text: str) -> str:
        return re.sub(r"[^\x00-\x7f]", "", text)

    for _ in range(50):
        ids = [rng.randrange(0, 259) for _ in range(rng.randrange(1, 60))]
        pieces, joined = stream(tokenizer, ids)
        assert ascii_only(joined) == ascii_only(tokenizer.decode(ids, skip_special_tokens=True))
        early = ascii_only(tokenizer.decode(ids[:-8], skip_special_tokens=True))
        assert ascii_only("".join(pieces[:-4])).startswith(early)  # out within 4 tokens


@pytest.mark.parametrize("text", SAMPLES)
def test_fast_tokenizer_stream_equals_the_window_stream_and_the_whole_decode(text: str) -> None:
    if not (BAICHUAN / "tokenizer.model").is_file():
        pytest.skip("needs the Baichuan tokenizer in ../shared")
    tokenizer = baichuan()
    assert tokenizer.backend_tokenizer is not None
    ids = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert stream(tokenizer, ids, fast=True)[1] == whole
    assert stream(tokenizer, ids, fast=False)[1] == whole


def test_stop_strings_are_cut_even_when_split_across_tokens() -> None:
    tokenizer = ByteTokenizer()
    reply = ReplyText(tokenizer, ["<|im_end|>", "STOP"])
    shown = []
    for token in tokenizer.encode("The answer is 4.<|im_end|>more", add_special_tokens=False):
        shown.append(reply.push(token))
        if reply.stopped:
            break
    assert reply.stopped and "".join(shown) + reply.finish() == "The answer is 4."
    assert all("<" not in piece for piece in shown)


def test_a_partial_stop_string_at_the_end_is_dropped_and_other_text_kept() -> None:
    tokenizer = ByteTokenizer()
    reply = ReplyText(tokenizer, ["<|im_end|>"])
    shown = "".join(reply.push(t) for t in tokenizer.encode("x < y and <|im_", add_special_tokens=False))
    assert not reply.stopped
    assert shown + reply.finish() == "x < y and "
