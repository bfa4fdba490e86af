"""Degree variants of a response: N nested levels that remove more and more key content.

Level k in 0..N-1 removes every occurrence of the first ``ceil(k * |K| / (N - 1))`` phrases of
the ranked list K (``|K|`` taken literally, as given); level 0 is the response unchanged, byte
for byte.  See docs/degrees.md for the rules in prose.

Matching is done on tokens, not regexes: the text is tokenised once with
``\\w+|[^\\w\\s]+`` (words and punctuation runs, lowercased with ``casefold``), each phrase the
same way, and a phrase occurs wherever its token sequence does, so matching is
case-insensitive, on word boundaries ("art" never matches inside "party") and blind to the
whitespace between tokens ("red admirals" matches "Red\\nadmirals").

Removal deletes the union of the occurrence spans and then cleans the *debris* that removal
leaves, only around the removal points: each maximal run of non-word characters that touches a
removed span is rewritten (orphan hyphens/slashes/apostrophes glued to the removed text go,
repeated separators collapse, a space before ``,.;:!?)]}`` goes, a line or text starting with a
separator loses it, lines emptied by removal disappear, runs of blank lines stop at one).
Text away from removal points is left exactly as it was, so the cleaning leaves no artefact
the degree classifier could count.  Cleaning only ever touches non-word characters and never
glues two words together, so the words of level k+1 are a subsequence of the words of level k.

Removal can bring two kept tokens together into a new occurrence of a phrase the level removes
("a c b" with phrases "c" and "a b"); such occurrences are removed too, until none is left, and
level k+1 starts from everything level k removed, so levels stay nested.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TOKEN_RE = re.compile(r"\w+|[^\w\s]+")
WORD_RE = re.compile(r"\w+")

# punctuation that only makes sense glued to a word: dropped when it touches a removed span
_CONNECTORS = frozenset("-\u2010\u2011\u2012\u2013\u2014\u2015/\\'\u2019\u2018&+*~|^")
_SEPARATORS = frozenset(",;:")
_TERMINALS = frozenset(".!?\u2026")
_NO_SPACE_BEFORE = frozenset(",.;:!?)]}\u2026")
_OPENERS = frozenset("([{\u201c\u2018")
_EMPTY_PAIRS = frozenset({"()", "[]", "{}", '""', "''", "\u201c\u201d", "\u2018\u2019", "<>"})

Span = tuple[int, int]


@dataclass(frozen=True)
class DegreeVariants:
    """The N degree variants of one response and what each removed."""

    levels: list[str]
    labels: list[int]
    removed_spans: list[list[Span]]
    phrases_removed: list[int]
    n_phrases: int
    distinct: bool
    removed_fraction: list[float]

    def to_json(self) -> dict[str, Any]:
        # built by hand: dataclasses.asdict deep-copies every string and dominated the stage
        return {
            "levels": self.levels,
            "labels": self.labels,
            "removed_spans": [[list(s) for s in spans] for spans in self.removed_spans],
            "phrases_removed": self.phrases_removed,
            "n_phrases": self.n_phrases,
            "distinct": self.distinct,
            "removed_fraction": self.removed_fraction,
        }


def phrases_at_level(k: int, n_phrases: int, n_levels: int) -> int:
    """ceil(k * n_phrases / (n_levels - 1)) in integer arithmetic."""
    return -(-k * n_phrases // (n_levels - 1))


def _tokenize(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group().casefold()) for m in TOKEN_RE.finditer(text)]


def _is_word(ch: str) -> bool:
    # exactly Python's \w for str patterns
    return ch.isalnum() or ch == "_"


def _merge(spans: list[Span]) -> list[Span]:
    """Sorted union; overlapping or touching spans merge."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1][1] = end
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


class _Text:
    """One text tokenised once, with an index from token to positions."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.index: dict[str, list[int]] = {}
        for i, (_, _, tok) in enumerate(self.tokens):
            self.index.setdefault(tok, []).append(i)
        self.word_tokens = [(s, e) for s, e, tok in self.tokens if _is_word(tok[0])]

    def occurrences(self, seq: Sequence[str]) -> list[Span]:
        """Spans of every occurrence (overlapping ones too) of a token sequence."""
        if not seq:
            return []
        tokens = self.tokens
        k = len(seq)
        want = list(seq)
        spans = []
        for pos in self.index.get(seq[0], ()):
            if pos + k <= len(tokens) and [t[2] for t in tokens[pos : pos + k]] == want:
                spans.append((tokens[pos][0], tokens[pos + k - 1][1]))
        return spans


def render(text: str, spans: Sequence[Span]) -> str:
    """``text`` with the (merged, sorted) ``spans`` deleted and the debris around them cleaned.

    With no span, ``text`` itself is returned.  Leading and trailing whitespace of the result
    is stripped, except that one leading space is kept when ``text`` starts with a space (HH
    responses do: " About 150 ...").
    """
    if not spans:
        return text
    pieces: list[str] = []
    gaps: list[int] = []
    pos = 0
    length = 0
    for start, end in spans:
        kept = text[pos:start]
        pieces.append(kept)
        length += len(kept)
        if not gaps or gaps[-1] != length:
            gaps.append(length)
        pos = end
    pieces.append(text[pos:])
    s = "".join(pieces)

    out: list[str] = []
    last = 0
    i = 0
    while i < len(gaps):
        g = gaps[i]
        a = g
        while a > 0 and not _is_word(s[a - 1]):
            a -= 1
        b = g
        while b < len(s) and not _is_word(s[b]):
            b += 1
        local: list[int] = []
        while i < len(gaps) and gaps[i] <= b:
            local.append(gaps[i] - a)
            i += 1
        out.append(s[last:a])
        out.append(_clean_region(s[a:b], local, at_start=a == 0, at_end=b == len(s)))
        last = b
    out.append(s[last:])
    result = "".join(out).strip()
    if result and text.startswith(" "):
        result = " " + result
    return result


def _groups(part: str, line_start: bool, line_end: str) -> list[str]:
    """The punctuation groups of one line's share of a debris region, de-duplicated.

    ``line_end`` is the set of separators dropped at the end ("" when the region goes on to a
    word on the same line).
    """
    out: list[str] = []
    for g in part.split():
        if g in _EMPTY_PAIRS:
            continue
        chars = set(g)
        if chars <= _SEPARATORS | _TERMINALS:
            if chars & _TERMINALS:
                g = "".join(c for c in g if c in _TERMINALS)
                if out and set(out[-1]) <= _SEPARATORS:
                    out[-1] = g  # ", ." -> "."
                elif (out and out[-1][-1] in _TERMINALS) or (not out and line_start):
                    continue  # ". ." -> "."; a line does not start with "."
                else:
                    out.append(g)
            else:
                if (out and out[-1][-1] in _SEPARATORS | _TERMINALS) or (not out and line_start):
                    continue  # ", ," -> ","; a line does not start with ","
                out.append(g[0])
        else:
            out.append(g)
    while out and line_end and set(out[-1]) <= set(line_end):
        out.pop()
    return out


def _join(groups: list[str], space_before: bool) -> str:
    text = ""
    for g in groups:
        if text or space_before:
            if g[0] not in _NO_SPACE_BEFORE:
                text += " "
        text += g
    return text


def _clean_region(region: str, gaps: list[int], *, at_start: bool, at_end: bool) -> str:
    """Rewrite one maximal non-word run of the kept text that contains removal points.

    ``gaps`` are the removal points inside ``region``; ``at_start``/``at_end`` say that the
    region begins/ends the text (otherwise a word character is on that side).
    """
    keep = [True] * len(region)
    for g in gaps:
        j = g - 1
        while j >= 0 and region[j] in _CONNECTORS:
            j -= 1
        # connectors that open a line ("-item", "* item") are list bullets, not debris
        before = region[: j + 1].rstrip(" \t")
        if before.endswith("\n") or (not before and at_start):
            j = g - 1
        for i in range(j + 1, g):
            keep[i] = False
        j = g
        while j < len(region) and region[j] in _CONNECTORS:
            keep[j] = False
            j += 1
    gap_lines = {region.count("\n", 0, g) for g in gaps}
    cleaned = "".join(c for c, k in zip(region, keep) if k)
    parts = cleaned.split("\n")
    right_word = not at_end

    def tail(groups: list[str], part: str) -> str:
        # space after the last group when a word follows on the same line
        if not right_word:
            return ""
        if not groups:
            return ""
        if groups[-1][-1] in _OPENERS and not part[-1:].isspace():
            return ""
        return " " if (part[-1:].isspace() or groups[-1][-1] in _NO_SPACE_BEFORE) else ""

    if len(parts) == 1:
        part = parts[0]
        groups = _groups(part, line_start=at_start, line_end=",;:" if at_end else "")
        if not groups:
            return "" if at_start or at_end else " "
        return _join(groups, space_before=not at_start) + tail(groups, part)

    # a first (last) line of the text that removal left without words disappears
    first = [] if at_start and 0 in gap_lines else _groups(
        parts[0], line_start=at_start, line_end=",;:" if at_end else ",;"
    )
    lines = [_join(first, space_before=not at_start)]
    for idx in range(1, len(parts) - 1):
        if idx in gap_lines:
            continue  # a line emptied by removal disappears
        lines.append(_join(_groups(parts[idx], line_start=False, line_end=""), space_before=False)
                     if parts[idx].strip() else "")
    last_idx = len(parts) - 1
    part = parts[-1]
    groups = [] if at_end and last_idx in gap_lines else _groups(part, line_start=True, line_end=",;:" if at_end else "")
    indent = "" if last_idx in gap_lines else re.match(r"[ \t]*", part).group()  # type: ignore[union-attr]
    lines.append(indent + _join(groups, space_before=False) + tail(groups, part))
    text = "\n".join(line.rstrip(" \t") if n < len(lines) - 1 else line for n, line in enumerate(lines))
    return re.sub(r"\n{3,}", "\n\n", text)


def _level_spans(doc: _Text, seqs: list[tuple[str, ...]], base: list[Span]) -> tuple[list[Span], str]:
    """Remove every occurrence of ``seqs`` (plus ``base``) until no occurrence is left."""
    spans = list(base)
    for seq in seqs:
        spans.extend(doc.occurrences(seq))
    spans = _merge(spans)
    # sequences whose ends are words: an occurrence made by removal can be mapped back.  A
    # one-token sequence cannot be made by removal (kept tokens are never altered), so only
    # multi-token phrases need the re-check.
    closable = [seq for seq in seqs if len(seq) > 1 and _is_word(seq[0][0]) and _is_word(seq[-1][0])]
    while True:
        level = render(doc.text, spans)
        if not closable or not spans:
            return spans, level
        found = _remaining(doc, spans, level, closable)
        if not found:
            return spans, level
        spans = _merge(spans + found)


def _remaining(doc: _Text, spans: list[Span], level: str, seqs: list[tuple[str, ...]]) -> list[Span]:
    """Original-text spans of occurrences of ``seqs`` that removal created in ``level``."""
    starts = [s for s, _ in spans]
    kept_words = []
    for ws, we in doc.word_tokens:
        j = bisect.bisect_right(starts, ws) - 1
        if j < 0 or spans[j][1] <= ws:
            kept_words.append((ws, we))
    tokens = _tokenize(level)
    word_no: list[int] = []
    n = 0
    for _, _, tok in tokens:
        word_no.append(n if _is_word(tok[0]) else -1)
        n += _is_word(tok[0])
    if n != len(kept_words):  # cannot happen: cleaning neither glues nor splits words
        return []
    index: dict[str, list[int]] = {}
    for i, (_, _, tok) in enumerate(tokens):
        index.setdefault(tok, []).append(i)
    found = []
    for seq in seqs:
        k = len(seq)
        for pos in index.get(seq[0], ()):
            if pos + k <= len(tokens) and all(tokens[pos + j][2] == seq[j] for j in range(k)):
                first = kept_words[word_no[pos]]
                last = kept_words[word_no[pos + k - 1]]
                found.append((first[0], last[1]))
    return found


def build_degree_variants(text: str, phrases: Sequence[str], n_levels: int) -> DegreeVariants:
    """The ``n_levels`` nested degree variants of ``text`` for the ranked ``phrases``."""
    if not isinstance(n_levels, int) or n_levels < 2:
        raise ValueError(f"n_levels must be an integer >= 2, got {n_levels!r}")
    doc = _Text(text)
    seqs = [tuple(tok for _, _, tok in _tokenize(p)) for p in phrases]
    levels = [text]
    removed: list[list[Span]] = [[]]
    counts = [0]
    fractions = [0.0]
    spans: list[Span] = []
    for k in range(1, n_levels):
        m = phrases_at_level(k, len(seqs), n_levels)
        if m == counts[-1] and k > 1:
            level = levels[-1]  # same phrases as the previous level: same variant
        else:
            spans, level = _level_spans(doc, seqs[:m], spans)
        levels.append(level)
        removed.append(list(spans))
        counts.append(m)
        fractions.append(sum(e - s for s, e in spans) / len(text) if text else 0.0)
    return DegreeVariants(
        levels=levels,
        labels=list(range(n_levels)),
        removed_spans=removed,
        phrases_removed=counts,
        n_phrases=len(seqs),
        distinct=len(set(levels)) == n_levels,
        removed_fraction=fractions,
    )


def build_levels(text: str, phrases: Sequence[str], n_levels: int) -> list[str]:
    """The ``n_levels`` strings of :func:`build_degree_variants`; index 0 is ``text``."""
    return build_degree_variants(text, phrases, n_levels).levels


def words(text: str) -> list[str]:
    """The ``\\w+`` runs of a text (what the subsequence property is stated on)."""
    return WORD_RE.findall(text)
