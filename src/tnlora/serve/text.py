"""Streamed text of generated tokens: incremental detokenization and the stop strings held back.

Decoding each new token alone is wrong (a multi-byte character spans tokens; SentencePiece's leading space
depends on the neighbour), and decoding the whole reply at every step costs O(n) per token. The detokenizer
decodes a short window of recent tokens twice per token (the window before the new token, the window with it)
and emits the difference once it no longer ends in an incomplete character; a fast tokenizer does the same in
one Rust call (``tokenizers.decoders.DecodeStream``). A finished reply of valid text is exactly
``tokenizer.decode(ids, skip_special_tokens=True)``; invalid bytes come out as replacement characters, though
not always as many as a decode of the whole would show.
"""

from __future__ import annotations

from typing import Any

from tnlora.infer.chat import StopStringFilter

REPLACEMENT = "\ufffd"
MAX_CHARACTER_TOKENS = 4


class IncrementalDetokenizer:
    """Text deltas of a growing list of token ids (special tokens skipped)."""

    def __init__(self, tokenizer: Any, fast: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters handed out so far
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text has been handed out
        self._stream = None
        backend = getattr(tokenizer, "backend_tokenizer", None) if fast is not False else None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that it completes (often the token's own text, sometimes "")."""
        self.ids.append(token_id)
        if self._stream is not None:
            delta = self._stream.step(self._backend, token_id) or ""
        else:
            delta = self._window_delta()
        self.emitted += len(delta)
        return delta

    def _window_delta(self, final: bool = False) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix :], skip_special_tokens=True)
        # An incomplete character at the end waits for the tokens that complete it (a UTF-8 character is at most
        # 4 bytes, so at most 4 tokens): past that it is invalid text and goes out as the replacement character.
        # (A window that changes its earlier text only happens after such replacement characters went out: the
        # text is invalid anyway, and moving on keeps the stream going.)
        incomplete = after.endswith(REPLACEMENT) and len(self.ids) - self._read < MAX_CHARACTER_TOKENS
        if len(after) <= len(before) or (incomplete and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """The rest of the reply's text, held back so far (e.g. an incomplete character at the end)."""
        if self._stream is None:
            rest = self._window_delta(final=True)
        else:
            # DecodeStream keeps no pending text to ask for: the whole reply's decode says what is missing.
            full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            rest = full[self.emitted :]
        self.emitted += len(rest)
        return rest


class ReplyText:
    """Token ids in, safe text out: the detokenizer followed by the stop-string filter."""

    def __init__(self, tokenizer: Any, stop_strings: list[str]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.filter = StopStringFilter(stop_strings) if stop_strings else None

    @property
    def stopped(self) -> bool:
        """Whether a stop string has appeared (the text before it has been returned)."""
        return self.filter is not None and self.filter.stopped

    def push(self, token_id: int) -> str:
        delta = self.detokenizer.push(token_id)
        if self.filter is None or not delta:
            return delta
        return self.filter.push(delta)

    def finish(self) -> str:
        """The text still held back once generation ended (a trailing partial stop string dropped)."""
        rest = self.detokenizer.flush()
        if self.filter is None:
            return rest
        return self.filter.push(rest) + self.filter.flush()


__all__ = ["IncrementalDetokenizer", "ReplyText"]
