"""Conversations → token ids and labels: render with a template, tokenise, mask, truncate, pack, collate.

Each piece of a conversation (template marker, message text, eos) is tokenised on its own and the ids are
concatenated, so the learned/masked boundary is exact. A piece is tokenised the way the tokenizer would see
it inside the whole rendered text: a "continuation" (no SentencePiece dummy prefix) unless it starts the
sequence or follows an added token such as eos, where the tokenizer starts a fresh chunk. For the built-in
templates the result equals ``tokenizer(render_prompt(...))`` (tested), so inference sees what training saw;
``encode_prompt`` gives those prompt ids directly.

Labels are -100 on system/user/prompt pieces and padding; the answer, the template's end marker and eos are
learned. ``cutoff_len`` never cuts an answer: older turns go first, then the tail of the last user message; an
example whose answer cannot fit beside (part of) its question is dropped and counted in ``EncodeStats``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tnlora.data.readers import Conversation, Message
from tnlora.data.templates import Template
from tnlora.io import atomic_path

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Bump when the encoding of a conversation changes, so old cache files are not reused.
ENCODING_VERSION = 1
# Conversations planned and tokenised together: big enough batches for the fast tokenizer, bounded memory.
ENCODE_BATCH = 1024
# Tokenised before a piece that continues earlier text; "\n" is one atomic token in both of our tokenizers.
_SENTINEL = "\n"


@dataclass
class EncodedExample:
    """Token ids and labels of one conversation (labels are not shifted; -100 = not learned).

    ``truncated`` says the prompt side was shortened to fit cutoff_len; ``dropped`` (with empty ids) says
    why the example could not be kept at all.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    dropped: str | None = None


@dataclass
class EncodeStats:
    """Counts from ``build_dataset``: examples in, kept, prompt-truncated, dropped (with the first reason)."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    first_dropped: str | None = None
    tokens: int = 0
    learned_tokens: int = 0

    def summary(self) -> str:
        line = (
            f"encoded {self.kept}/{self.examples} examples, {self.tokens} tokens ({self.learned_tokens} learned); "
            f"{self.truncated} prompt-truncated, {self.dropped} dropped"
        )
        if self.first_dropped:
            line += f" (first: {self.first_dropped})"
        return line


@dataclass
class Piece:
    """One tokenised piece of a conversation."""

    kind: str  # "marker" (template text), "system", "user", "answer", "end" (end marker), "eos"
    text: str
    learned: bool
    turn: int  # -1 for the system block
    ids: list[int] | None = None  # None until tokenised


# --------------------------------------------------------------------------------------------------------------
# Planning: conversation → pieces of text


def plan_pieces(
    messages: Sequence[Message], system: str | None, template: Template, with_answers: bool = True
) -> list[Piece]:
    """The conversation as template pieces, in order. ``messages`` alternate user/assistant from user.

    With ``with_answers=False`` the last message must be a user turn and the pieces end with the assistant
    prefix (an inference prompt).
    """
    pieces: list[Piece] = []

    def add(kind: str, text: str, learned: bool, turn: int) -> None:
        if text or kind == "eos":
            pieces.append(Piece(kind, text, learned, turn))

    system_text = template.system_text(system)
    if system_text:
        add("marker", template.system_prefix, False, -1)
        add("system", system_text, False, -1)
        add("marker", template.system_suffix, False, -1)
    turn = 0
    for i, message in enumerate(messages):
        if message.role not in ("user", "assistant"):
            raise ValueError(f"message {i + 1}: role must be user or assistant, not {message.role!r}")
        if message.role == "user":
            turn = i // 2
            if turn > 0:
                add("marker", template.turn_separator, False, turn)
            add("marker", template.user_prefix, False, turn)
            add("user", message.content, False, turn)
            add("marker", template.user_suffix + template.assistant_prefix, False, turn)
        else:
            add("answer", message.content, True, turn)
            add("end", template.end_marker, True, turn)
            if template.add_eos:
                add("eos", "", True, turn)
    if not with_answers and (not messages or messages[-1].role != "user"):
        raise ValueError("a prompt must end with a user message")
    return _merge_markers(pieces)


def _merge_markers(pieces: list[Piece]) -> list[Piece]:
    # Neighbouring template strings are one piece: fewer tokenizer calls, same text.
    out: list[Piece] = []
    for piece in pieces:
        if out and piece.kind == "marker" and out[-1].kind == "marker" and out[-1].turn == piece.turn:
            out[-1].text += piece.text
        else:
            out.append(piece)
    return out


# --------------------------------------------------------------------------------------------------------------
# Tokenising pieces


class PieceEncoder:
    """Tokenises pieces in batches, caching repeated strings (template markers, default system text)."""

    def __init__(self, tokenizer: Any) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token")
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        self.added_ids = set(tokenizer.added_tokens_decoder)
        self.sentinel_ids = self._call([_SENTINEL], split_special=False)[0]
        self.cache: dict[tuple[str, bool, bool], list[int]] = {}

    def _call(self, texts: list[str], split_special: bool) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special)["input_ids"]

    def encode(self, sequences: list[list[Piece]]) -> None:
        """Fill ``piece.ids`` of every piece; pieces of one sequence are tokenised in order of dependence."""
        # A piece's form (fresh/continuation) depends on its predecessor's last id, known only after
        # tokenising it: resolve in rounds, each round one batch per (form, split) kind.
        pending = [(seq, 0) for seq in sequences]
        while pending:
            requests: dict[tuple[str, bool, bool], list[Piece]] = {}
            next_pending = []
            for seq, start in pending:
                index = start
                while index < len(seq):
                    piece = seq[index]
                    if piece.kind == "eos":
                        piece.ids = [self.eos_id]
                        index += 1
                        continue
                    if index > 0 and seq[index - 1].ids is None:
                        break  # the predecessor is in this round's batch
                    before = next((p.ids[-1] for p in reversed(seq[:index]) if p.ids), None)
                    fresh = before is None or before in self.added_ids
                    # Message text never turns into control tokens: "</s>" typed by a user stays text.
                    split_special = piece.kind in ("system", "user", "answer")
                    key = (piece.text, fresh, split_special)
                    if key in self.cache:
                        piece.ids = list(self.cache[key])
                        index += 1
                        continue
                    requests.setdefault(key, []).append(piece)
                    break
                if index < len(seq):
                    next_pending.append((seq, index))
            self._run(requests)
            pending = next_pending

    def _run(self, requests: dict[tuple[str, bool, bool], list[Piece]]) -> None:
        groups: dict[tuple[bool, bool], list[str]] = {}
        for text, fresh, split_special in requests:
            groups.setdefault((fresh, split_special), []).append(text)
        for (fresh, split_special), texts in groups.items():
            inputs = texts if fresh else [_SENTINEL + t for t in texts]
            for text, ids in zip(texts, self._call(inputs, split_special)):
                if not fresh:
                    ids = self._strip_sentinel(ids, text, split_special)
                self.cache[(text, fresh, split_special)] = ids
        for key, pieces in requests.items():
            for piece in pieces:
                piece.ids = list(self.cache[key])

    def _strip_sentinel(self, ids: list[int], text: str, split_special: bool) -> list[int]:
        n = len(self.sentinel_ids)
        if ids[:n] == self.sentinel_ids:
            return ids[n:]
        # A tokenizer that merges the sentinel with what follows: fall back to tokenising the piece alone.
        return self._call([text], split_special)[0]


# --------------------------------------------------------------------------------------------------------------
# One conversation


def encode_conversation(
    conv: Conversation,
    tokenizer: Any,
    template: Template,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> EncodedExample:
    """Ids and labels of one conversation, truncated to ``cutoff_len`` (see the module docstring)."""
    return _encode_batch([conv], PieceEncoder(tokenizer), template, cutoff_len, train_on_prompt, mask_history)[0]


def encode_prompt(
    messages: Sequence[Message | dict[str, str]],
    tokenizer: Any,
    template: Template,
    system: str | None = None,
) -> list[int]:
    """Prompt ids for inference, tokenised exactly as the prompt side of training examples.

    ``messages`` alternate user/assistant and end with a user message (a leading system message is used as
    ``system`` when that is None); the ids end with the template's assistant prefix.
    """
    msgs = [m if isinstance(m, Message) else Message(str(m["role"]), str(m["content"])) for m in messages]
    if msgs and msgs[0].role == "system":
        system = msgs[0].content if system is None else system
        msgs = msgs[1:]
    pieces = plan_pieces(msgs, system, template, with_answers=False)
    PieceEncoder(tokenizer).encode([pieces])
    return [i for p in pieces for i in p.ids or []]


def encode_pieces(conv: Conversation, tokenizer: Any, template: Template) -> list[Piece]:
    """The untruncated pieces of a conversation with their ids (for inspection)."""
    pieces = plan_pieces(conv.messages, conv.system, template)
    PieceEncoder(tokenizer).encode([pieces])
    return pieces


def _encode_batch(
    convs: Sequence[Conversation],
    encoder: PieceEncoder,
    template: Template,
    cutoff_len: int,
    train_on_prompt: bool,
    mask_history: bool,
) -> list[EncodedExample]:
    plans = [plan_pieces(c.messages, c.system, template) for c in convs]
    encoder.encode(plans)
    out = []
    for conv, pieces in zip(convs, plans):
        truncated = False
        if _length(pieces) > cutoff_len:
            pieces, truncated, reason = _fit(conv, pieces, encoder, template, cutoff_len)
            if reason is not None:
                out.append(EncodedExample([], [], truncated=True, dropped=f"{conv.source}: {reason}"))
                continue
        out.append(_assemble(pieces, truncated, train_on_prompt, mask_history))
    return out


def _assemble(pieces: list[Piece], truncated: bool, train_on_prompt: bool, mask_history: bool) -> EncodedExample:
    last_turn = max((p.turn for p in pieces), default=0)
    input_ids: list[int] = []
    labels: list[int] = []
    for piece in pieces:
        learned = piece.learned and (not mask_history or piece.turn == last_turn)
        ids = piece.ids or []
        input_ids += ids
        labels += ids if (learned or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    return EncodedExample(input_ids, labels, truncated=truncated)


def _fit(
    conv: Conversation, pieces: list[Piece], encoder: PieceEncoder, template: Template, cutoff_len: int
) -> tuple[list[Piece], bool, str | None]:
    """Shorten the prompt side: drop the oldest turns, then cut the tail of the last user message.

    Returns (pieces, truncated, reason to drop or None). The answer is never cut; when it does not fit even
    with the last user message cut to nothing, the example is dropped.
    """
    messages = list(conv.messages)
    while len(messages) > 2:
        messages = messages[2:]
        pieces = plan_pieces(messages, conv.system, template)
        encoder.encode([pieces])
        if _length(pieces) <= cutoff_len:
            return pieces, True, None
    excess = _length(pieces) - cutoff_len
    user = next((p for p in pieces if p.kind == "user"), None)
    if user is not None and user.ids and excess < len(user.ids):
        user.ids = user.ids[: len(user.ids) - excess]  # keep the head: the instruction usually leads
        return pieces, True, None
    answer = sum(len(p.ids or []) for p in pieces if p.learned)
    return pieces, True, f"the answer ({answer} tokens) leaves no room for its prompt in cutoff_len {cutoff_len}"


def _length(pieces: Sequence[Piece]) -> int:
    return sum(len(p.ids or []) for p in pieces)


# --------------------------------------------------------------------------------------------------------------
# Whole datasets, with an on-disk cache


def build_dataset(
    conversations: Sequence[Conversation],
    tokenizer: Any,
    template: Template,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    num_workers: int = 1,
    refresh: bool = False,
) -> tuple[list[EncodedExample], EncodeStats]:
    """Encode every conversation; dropped ones are left out and counted. Logs ``EncodeStats.summary()``.

    With ``cache_dir`` the result is stored there (atomically) under a hash of the conversations' text, the
    tokenizer, the template and these settings, and a later call with the same inputs reads it back
    without tokenising (``refresh``: encode again and replace the cached file). ``num_workers`` > 1 tokenises
    batches of ``ENCODE_BATCH`` conversations in that many processes (at most one per CPU and per batch); the
    result is the same as in one process.
    """
    if cutoff_len < 1:
        raise ValueError("cutoff_len must be positive")
    cache_file = None
    if cache_dir is not None:
        key = dataset_fingerprint(conversations, tokenizer, template, cutoff_len, train_on_prompt, mask_history)
        cache_file = Path(cache_dir) / f"{key}.npz"
        cached = None if refresh else _read_cache(cache_file)
        if cached is not None:
            logger.info("%s (cached: %s)", cached[1].summary(), cache_file)
            return cached
    stats = EncodeStats(examples=len(conversations))
    examples: list[EncodedExample] = []
    settings = (template, cutoff_len, train_on_prompt, mask_history)
    for batch in _encoded_batches(conversations, tokenizer, settings, num_workers):
        for example in batch:
            if example.dropped:
                stats.dropped += 1
                stats.first_dropped = stats.first_dropped or example.dropped
                continue
            stats.truncated += example.truncated
            stats.tokens += len(example.input_ids)
            stats.learned_tokens += sum(label != IGNORE_INDEX for label in example.labels)
            examples.append(example)
    stats.kept = len(examples)
    if cache_file is not None:
        try:
            _write_cache(cache_file, examples, stats)
        except OSError as exc:  # a cache that cannot be written only costs time next run
            logger.warning("could not write the dataset cache %s: %s", cache_file, exc)
    logger.info("%s", stats.summary())
    return examples, stats


def _encoded_batches(
    conversations: Sequence[Conversation], tokenizer: Any, settings: tuple, num_workers: int
) -> Iterator[list[EncodedExample]]:
    """Encoded batches of ``ENCODE_BATCH`` conversations, in order, from this process or a pool of workers."""
    batches = [conversations[i : i + ENCODE_BATCH] for i in range(0, len(conversations), ENCODE_BATCH)]
    workers = min(num_workers, len(batches), _usable_cpus())
    if workers <= 1:
        encoder = PieceEncoder(tokenizer)
        for batch in batches:
            yield _encode_batch(batch, encoder, *settings)
        return
    import multiprocessing

    # spawn, not fork: the parent may hold torch and tokenizer threads, which a forked child would inherit
    # half-initialised.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(tokenizer, settings)) as pool:  # fmt: skip
        yield from pool.map(_encode_in_worker, batches)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Each worker process's encoder and settings, set once by _start_worker (a process-local object, not shared).
_WORKER: dict[str, Any] = {}


def _start_worker(tokenizer: Any, settings: tuple) -> None:
    _WORKER["encoder"] = PieceEncoder(tokenizer)
    _WORKER["settings"] = settings


def _encode_in_worker(batch: Sequence[Conversation]) -> list[EncodedExample]:
    return _encode_batch(batch, _WORKER["encoder"], *_WORKER["settings"])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything that decides a tokenizer's ids (backend JSON, added tokens, class)."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_added_vocab().items())).encode())
    h.update(str((len(tokenizer), tokenizer.eos_token_id)).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    return h.hexdigest()


def dataset_fingerprint(
    conversations: Iterable[Conversation],
    tokenizer: Any,
    template: Template,
    cutoff_len: int,
    train_on_prompt: bool,
    mask_history: bool,
) -> str:
    """Cache key: conversation text (not file paths) + tokenizer + template + settings."""
    h = hashlib.sha256()
    settings = [ENCODING_VERSION, cutoff_len, train_on_prompt, mask_history, template.to_dict()]
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for conv in conversations:
        record = [conv.system, [[m.role, m.content] for m in conv.messages]]
        h.update(json.dumps(record, ensure_ascii=False).encode())
        h.update(b"\x00")
    return h.hexdigest()[:40]


def _write_cache(path: Path, examples: list[EncodedExample], stats: EncodeStats) -> None:
    offsets = np.cumsum([0] + [len(e.input_ids) for e in examples], dtype=np.int64)
    flat_ids = np.fromiter((i for e in examples for i in e.input_ids), dtype=np.int32, count=int(offsets[-1]))
    flat_labels = np.fromiter((i for e in examples for i in e.labels), dtype=np.int32, count=int(offsets[-1]))
    truncated = np.array([e.truncated for e in examples], dtype=bool)
    meta = json.dumps(stats.__dict__)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, input_ids=flat_ids, labels=flat_labels, offsets=offsets, truncated=truncated,
                 stats=np.array(meta))  # fmt: skip


def _read_cache(path: Path) -> tuple[list[EncodedExample], EncodeStats] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            ids, labels, offsets = data["input_ids"].tolist(), data["labels"].tolist(), data["offsets"].tolist()
            truncated = data["truncated"].tolist()
            stats = EncodeStats(**json.loads(str(data["stats"])))
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("ignoring unreadable dataset cache %s", path)
        return None
    examples = [
        EncodedExample(ids[a:b], labels[a:b], truncated=t) for a, b, t in zip(offsets, offsets[1:], truncated)
    ]
    return examples, stats


def default_cache_dir() -> Path:
    """Where the CLI keeps tokenised datasets unless told otherwise: ~/.cache/tnlora/datasets."""
    return Path.home() / ".cache" / "tnlora" / "datasets"
