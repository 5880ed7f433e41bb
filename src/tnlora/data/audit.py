"""A data audit: what a dataset holds that training would learn from without anyone noticing.

``audit_conversations(conversations, train=, eval=)`` (or ``audit_dataset(dataset, …)``) finds

- exact duplicates: records with the same system prompt and the same messages;
- near duplicates: records equal once their text is normalised (Unicode NFKC, case-folded, every run of
  whitespace and punctuation collapsed to one space), beyond the exact ones;
- examples that are in both the training data and the eval set (the ``val_size`` split or an eval dataset),
  exactly or after normalising;
- empty or whitespace-only replies (the readers refuse such records; with ``skip_invalid`` they are skipped
  and counted in the ``ReadReport``);
- replies given to many different prompts (the same reply after different prompts);
- length outliers: records with more than twice the 99th percentile of characters (system + every message);
- the share of each script among the letters (Han, Latin, other).

``DataAudit.render()`` is the text `tnlora data inspect` prints. ``drop_exact_duplicates`` is what the run key
``dedup: true`` does before training.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from tnlora.data.readers import Conversation, read_conversations

# A reply counts as given to "many" prompts from this many different prompts on.
MANY_PROMPTS = 3
# Length outliers: above this multiple of the 99th percentile of characters per record.
OUTLIER_FACTOR = 2.0
OUTLIER_PERCENTILE = 99
SHOWN = 5  # groups, replies and records named per finding
PREVIEW = 40  # characters of a text shown in the report


def exact_key(conv: Conversation) -> tuple:
    """What makes two records the same: the system prompt and every message (role and text)."""
    return (conv.system, tuple((m.role, m.content) for m in conv.messages))


def normalize_text(text: str) -> str:
    """NFKC, case-folded, each run of whitespace and punctuation one space, stripped."""
    out: list[str] = []
    gap = False
    for ch in unicodedata.normalize("NFKC", text).casefold():
        if ch.isspace() or unicodedata.category(ch).startswith("P"):
            gap = True
            continue
        if gap and out:
            out.append(" ")
        gap = False
        out.append(ch)
    return "".join(out)


def near_key(conv: Conversation) -> tuple:
    """``exact_key`` with every text normalised (``normalize_text``)."""
    return (
        normalize_text(conv.system or ""),
        tuple((m.role, normalize_text(m.content)) for m in conv.messages),
    )


def drop_exact_duplicates(conversations: Sequence[Conversation]) -> tuple[list[Conversation], int]:
    """The conversations without the records that exactly repeat an earlier one (the first is kept, order is
    kept), and how many were dropped."""
    seen: set[tuple] = set()
    kept: list[Conversation] = []
    for conv in conversations:
        key = exact_key(conv)
        if key not in seen:
            seen.add(key)
            kept.append(conv)
    return kept, len(conversations) - len(kept)


@dataclass
class RepeatGroup:
    """Records that are one record repeated: how many, the first one's index and source, a preview."""

    count: int
    first: int
    source: str
    preview: str
    variants: int = 1  # near duplicates: how many different records (exactly) the group holds


@dataclass
class Overlap:
    """Eval examples that are also in the training data."""

    label: str
    eval_examples: int
    exact: int
    near: int
    first_sources: list[str] = field(default_factory=list)


@dataclass
class SharedReply:
    """One reply given after several different prompts."""

    reply: str
    prompts: int
    records: int


@dataclass
class DataAudit:
    """What ``audit_conversations`` found (see the module docstring); ``render()`` gives the report."""

    records: int
    exact_groups: list[RepeatGroup]
    near_groups: list[RepeatGroup]
    near_repeats: int
    overlap: Overlap | None
    empty_replies: int
    first_empty: str | None
    shared_replies: list[SharedReply]
    length_p50: int
    length_p99: int
    length_max: int
    length_outliers: list[tuple[int, str]]
    letters: Counter[str]

    @property
    def exact_repeats(self) -> int:
        """Records that exactly repeat another one (a record seen n times repeats n − 1 times)."""
        return sum(g.count - 1 for g in self.exact_groups)

    @property
    def length_limit(self) -> float:
        """Records above this many characters are length outliers."""
        return OUTLIER_FACTOR * self.length_p99

    def script_shares(self) -> dict[str, float]:
        """Share of the letters per script, largest first ({} without letters)."""
        total = sum(self.letters.values())
        return {k: v / total for k, v in self.letters.most_common()} if total else {}

    def render(self) -> str:
        """The audit as the lines ``tnlora data inspect`` prints."""
        lines = [f"audit of {self.records} records:"]
        if self.exact_groups:
            lines.append(
                f"  exact duplicates (same system prompt and messages): {self.exact_repeats} records repeat another "
                f"one ({len(self.exact_groups)} distinct records); `dedup: true` drops the repeats before training"
            )
            lines += [f"    {g.count}× {g.preview}  (first: {g.source})" for g in self.exact_groups[:SHOWN]]
            if len(self.exact_groups) > SHOWN:
                lines.append(f"    … and {len(self.exact_groups) - SHOWN} more")
        else:
            lines.append("  exact duplicates (same system prompt and messages): none")
        rule = "same text after NFKC, case folding, whitespace and punctuation collapsed"
        if self.near_groups:
            lines.append(
                f"  near duplicates ({rule}): {self.near_repeats} more records repeat another one "
                f"({len(self.near_groups)} groups)"
            )
            lines += [f"    {g.count}× in {g.variants} variants, {g.preview}  (first: {g.source})"
                      for g in self.near_groups[:SHOWN]]  # fmt: skip
        else:
            lines.append(f"  near duplicates ({rule}): none beyond the exact ones")
        if self.overlap is not None:
            o = self.overlap
            leaked = o.exact + o.near
            line = f"  {o.label}: {leaked} of {o.eval_examples} examples also in the training data"
            if leaked:
                line += f" (exact {o.exact}, near {o.near}; first: {'; '.join(o.first_sources)})"
            lines.append(line)
        line = f"  empty or whitespace-only replies: {self.empty_replies or 'none'}"
        if self.first_empty:
            line += f" (skipped; first: {self.first_empty})"
        lines.append(line)
        if self.shared_replies:
            lines.append(f"  one reply after many different prompts (≥ {MANY_PROMPTS} prompts):")
            lines += [f"    {r.prompts} prompts ({r.records} records) → {_preview(r.reply)}" for r in self.shared_replies]
        else:
            lines.append(f"  one reply after many different prompts (≥ {MANY_PROMPTS} prompts): none")
        lines.append(
            f"  characters per record (system + messages): p50 {self.length_p50}, p{OUTLIER_PERCENTILE} "
            f"{self.length_p99}, max {self.length_max}; outliers (above {OUTLIER_FACTOR:g} × "
            f"p{OUTLIER_PERCENTILE} = {self.length_limit:g}): {len(self.length_outliers) or 'none'}"
        )
        lines += [f"    {n} characters: {source}" for n, source in self.length_outliers[:SHOWN]]
        shares = self.script_shares()
        if shares:
            shown = [f"{name} {100 * share:.1f}%" for name, share in shares.items()]
            lines.append(f"  letters by script: {', '.join(shown)}")
        return "\n".join(lines)


def audit_conversations(
    conversations: Sequence[Conversation],
    *,
    train: Sequence[Conversation] | None = None,
    eval: Sequence[Conversation] | None = None,
    eval_label: str = "the eval set",
    empty_replies: int = 0,
    first_empty: str | None = None,
) -> DataAudit:
    """Audit ``conversations`` (the records as read). With ``eval``, count the eval examples that are also in
    ``train`` (default: all of ``conversations``), e.g. the two parts of the ``val_size`` split or the records and
    an eval dataset. ``empty_replies`` / ``first_empty``: records the reader skipped for an empty reply."""
    exact = _groups(conversations, exact_key)
    near = _groups(conversations, near_key)
    exact_count = {key: len(idx) for key, idx in exact.items()}
    near_groups, near_repeats = [], 0
    for idx in near.values():
        # the records of this group beyond one per distinct record
        distinct = {exact_key(conversations[i]) for i in idx}
        if len(distinct) > 1:
            near_repeats += len(distinct) - 1
            near_groups.append(dataclasses.replace(_repeat_group(conversations, idx), variants=len(distinct)))
    near_groups.sort(key=lambda g: (-g.count, g.first))
    exact_groups = sorted(
        (_repeat_group(conversations, idx) for key, idx in exact.items() if exact_count[key] > 1),
        key=lambda g: (-g.count, g.first),
    )

    overlap = None
    if eval is not None:
        base = conversations if train is None else train
        exact_keys = {exact_key(c) for c in base}
        near_keys = {near_key(c) for c in base}
        n_exact = n_near = 0
        first: list[str] = []
        for conv in eval:
            if exact_key(conv) in exact_keys:
                n_exact += 1
            elif near_key(conv) in near_keys:
                n_near += 1
            else:
                continue
            if len(first) < 3:
                first.append(conv.source)
        overlap = Overlap(eval_label, len(eval), n_exact, n_near, first)

    hand_empty = [c for c in conversations if any(m.role == "assistant" and not m.content.strip() for m in c.messages)]
    if hand_empty and first_empty is None:
        first_empty = hand_empty[0].source

    lengths = [_chars(c) for c in conversations]
    ordered = sorted(lengths)
    p50, p99 = _percentile(ordered, 50), _percentile(ordered, OUTLIER_PERCENTILE)
    outliers = sorted(
        ((n, conversations[i].source) for i, n in enumerate(lengths) if n > OUTLIER_FACTOR * p99), reverse=True
    )
    return DataAudit(
        records=len(conversations),
        exact_groups=exact_groups,
        near_groups=near_groups,
        near_repeats=near_repeats,
        overlap=overlap,
        empty_replies=empty_replies + len(hand_empty),
        first_empty=first_empty,
        shared_replies=_shared_replies(conversations),
        length_p50=p50,
        length_p99=p99,
        length_max=ordered[-1] if ordered else 0,
        length_outliers=outliers,
        letters=_letters(conversations),
    )


def audit_dataset(
    dataset: str | list[str],
    dataset_dir: str | os.PathLike[str] | None = None,
    *,
    eval_dataset: str | list[str] | None = None,
    skip_invalid: bool = False,
) -> DataAudit:
    """Read ``dataset`` (and ``eval_dataset``) as training does and audit it."""
    conversations, report = read_conversations(dataset, dataset_dir, skip_invalid=skip_invalid)
    eval_convs = None
    if eval_dataset:
        eval_convs, _ = read_conversations(eval_dataset, dataset_dir, skip_invalid=skip_invalid)
    label = f"eval dataset {eval_dataset if isinstance(eval_dataset, str) else ','.join(eval_dataset or [])}"
    first_empty = report.first_error if report.empty_replies and report.first_error else None
    return audit_conversations(
        conversations, eval=eval_convs, eval_label=label, empty_replies=report.empty_replies, first_empty=first_empty
    )


# ---------------------------------------------------------------------------------------------------------------


def _groups(conversations: Sequence[Conversation], key) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, conv in enumerate(conversations):
        groups.setdefault(key(conv), []).append(i)
    return groups


def _repeat_group(conversations: Sequence[Conversation], idx: list[int]) -> RepeatGroup:
    conv = conversations[idx[0]]
    return RepeatGroup(count=len(idx), first=idx[0], source=conv.source, preview=_record_preview(conv))


def _record_preview(conv: Conversation) -> str:
    return f"{_preview(conv.messages[-2].content)} → {_preview(conv.messages[-1].content)}"


def _preview(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= PREVIEW else flat[: PREVIEW - 1] + "…"


def _shared_replies(conversations: Sequence[Conversation]) -> list[SharedReply]:
    prompts: dict[str, set[tuple]] = {}
    records: Counter[str] = Counter()
    for conv in conversations:
        reply = conv.messages[-1].content.strip()
        prompts.setdefault(reply, set()).add((conv.system, tuple((m.role, m.content) for m in conv.messages[:-1])))
        records[reply] += 1
    shared = [SharedReply(r, len(p), records[r]) for r, p in prompts.items() if len(p) >= MANY_PROMPTS]
    shared.sort(key=lambda s: (-s.prompts, -s.records, s.reply))
    return shared[:SHOWN]


def _chars(conv: Conversation) -> int:
    return len(conv.system or "") + sum(len(m.content) for m in conv.messages)


def _percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of sorted values (0 when empty)."""
    if not ordered:
        return 0
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@functools.cache
def _script(ch: str) -> str:
    """"Han", "Latin" or "other" for a letter (by its Unicode name)."""
    name = unicodedata.name(ch, "")
    if name.startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH")):
        return "Han"
    if name.startswith("LATIN "):
        return "Latin"
    return "other"


def _letters(conversations: Sequence[Conversation]) -> Counter[str]:
    """Letters (Unicode category L*) per script over every text of every record."""
    counts: Counter[str] = Counter()
    for conv in conversations:
        for text in (conv.system or "", *(m.content for m in conv.messages)):
            for ch, n in Counter(text).items():
                if unicodedata.category(ch).startswith("L"):
                    counts[_script(ch)] += n
    return counts
