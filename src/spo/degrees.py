"""Degree variants of a response: N nested levels that remove more and more key content.

Level k in 0..N-1 removes every occurrence of the first ``ceil(k * |K| / (N - 1))`` phrases of
the ranked list K (``|K|`` taken literally, as given); level 0 removes nothing.  Every level,
level 0 included, is rendered by :func:`render_with_origins` and so ends the same way
(:func:`normalise`): no level can be told from the others by whitespace at its ends.  See
docs/degrees.md for the rules in prose.

Matching is done on tokens, not regexes: the text is tokenised once with
``\\w+|[^\\w\\s]+`` (words and punctuation runs, lowercased with ``casefold``), each phrase the
same way, and a phrase occurs wherever its token sequence does, so matching is
case-insensitive, on word boundaries ("art" never matches inside "party") and blind to the
whitespace between tokens ("red admirals" matches "Red\\nadmirals").

Removal deletes the union of the occurrence spans and then cleans the *debris* that removal
leaves, only around the removal points: each maximal run of non-word characters that touches a
removed span is rewritten (orphan hyphens/slashes/apostrophes glued to the removed text go, a
separator ``,;:`` right after a removal point goes with the removed text, brackets left around
nothing go, repeated separators collapse, a space before ``,.;:!?)]}`` goes, a line or text
starting with a separator loses it, lines emptied by removal disappear, runs of blank lines
stop at one).  Text away from removal points is left exactly as it was, so the cleaning leaves
no artefact the degree classifier could count.  Cleaning only ever deletes characters or
rewrites whitespace: every non-space character of a level is a character of the response, in
order (:func:`render_with_origins` says which), and more removal never brings a deleted
character back, so the non-space characters of level k+1 are a subset of those of level k and
its words a subsequence of level k's words.

Removal can bring two kept tokens together into a new occurrence of a phrase the level removes
("a c b" with phrases "c" and "a b"); such occurrences are removed too, until none is left, and
level k+1 starts from everything level k removed, so levels stay nested.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TOKEN_RE = re.compile(r"\w+|[^\w\s]+")
_PUNCT_RE = re.compile(r"[^\w\s]+")
_WORD_CHAR_RE = re.compile(r"\w")
WORD_RE = re.compile(r"\w+")

# punctuation that only makes sense glued to a word: dropped when it touches a removed span
_CONNECTORS = frozenset("-\u2010\u2011\u2012\u2013\u2014\u2015/\\'\u2019\u2018&+*~|^")
_SEPARATORS = frozenset(",;:")
_TERMINALS = frozenset(".!?\u2026")
_NO_SPACE_BEFORE = frozenset(",.;:!?)]}\u2026")
_OPENERS = frozenset("([{\u201c\u2018")
# opener -> closer of the brackets and quotes that go when they enclose only removed text
_PAIRS = {"(": ")", "[": "]", "{": "}", '"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "<": ">"}
_CLOSERS = {c: o for o, c in _PAIRS.items()}

Span = tuple[int, int]
# punctuation group of a debris region: its characters, their positions in the region, and
# whether whitespace came before it (a group of no character: removed punctuation that counts)
Group = tuple[str, list[int], bool]
# removal point of a debris region: its position there, and the punctuation tokens it removed
Gap = tuple[int, tuple[str, ...]]


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


def _removal(text: str, spans: Sequence[Span]) -> list[Span]:
    """The merged ``spans`` less every whitespace run of ``text`` that holds a line break.

    Removal never deletes a line break ("Red\\nadmirals" removed leaves the "\\n"): every level
    has the lines of the text, so the cleaning's line rules see the same lines at every level
    and cannot keep at level k+1 what they dropped at level k.
    """
    out: list[Span] = []
    for start, end in _merge(list(spans)):
        nl = text.find("\n", start, end)
        while nl >= 0:
            a = nl
            while a > start and text[a - 1].isspace():
                a -= 1
            if a > start:
                out.append((start, a))
            start = nl + 1
            while start < end and text[start].isspace():
                start += 1
            nl = text.find("\n", start, end)
        if start < end:
            out.append((start, end))
    return out


class _Text:
    """One text tokenised once, with an index from token to positions."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.index: dict[str, list[int]] = {}
        for i, (_, _, tok) in enumerate(self.tokens):
            self.index.setdefault(tok, []).append(i)

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


def normalise(text: str) -> str:
    """``text`` stripped at both ends, with one leading space kept when it starts with a space.

    The end normalisation of every level, level 0 included, so that trailing or leading
    whitespace never tells the levels apart.  HH responses start with a space (" About 150 ...")
    and keep it, so that prompt + level still reads as a dialogue.
    """
    return render_with_origins(text, ())[0]


def render(text: str, spans: Sequence[Span]) -> str:
    """The text of :func:`render_with_origins` (one code path, so the two never disagree)."""
    return render_with_origins(text, spans)[0]


def render_with_origins(text: str, spans: Sequence[Span]) -> tuple[str, list[int]]:
    """``text`` with ``spans`` deleted, the debris around them cleaned and the ends normalised,
    and for each character of the result the index in ``text`` of the character it is.

    ``spans`` are ``(start, end)`` character ranges of ``text`` (merged first, and a line break
    inside one is kept, see :func:`_removal`; they may end at ``len(text)``), e.g. a level's
    ``removed_spans`` clipped to a prefix of the response.  With no span the result is
    :func:`normalise` ``(text)``.  An origin of -1 marks whitespace the cleaning synthesised (a
    space between punctuation groups); a non-space character always carries its own index, and
    these indices strictly increase, because the cleaning only keeps or deletes the characters
    of ``text`` and rewrites whitespace.
    """
    merged = _removal(text, spans)
    pieces: list[str] = []
    origins: list[int] = []
    n = len(text)
    done = 0
    i = 0
    while i < len(merged):
        a, b, region, kept, crossed, i = _region(text, merged, i, done)
        pieces.append(text[done:a])
        origins.extend(range(done, a))
        cleaned, cleaned_origins = _rewrite(text, region, kept, crossed, at_start=a == 0, at_end=b == n)
        pieces.append(cleaned)
        origins.extend(cleaned_origins)
        done = b
    pieces.append(text[done:])
    origins.extend(range(done, n))
    lead = None
    if text.startswith(" "):
        lead = -1 if merged and merged[0][0] == 0 else 0
    level, level_origins = _trim("".join(pieces), origins, lead)
    return (_capitalise_new_sentence_starts(text, level, level_origins) if merged else level), level_origins


_WORD_START_RE = re.compile(r"(?<!\w)\w")


def _starts_sentence(text: str, i: int) -> bool:
    """Whether the word at ``text[i]`` begins the text, a line or a sentence (after ``.!?…`` and
    whitespace, closing quotes or brackets allowed between)."""
    spaced = False
    for j in range(i - 1, -1, -1):
        c = text[j]
        if _is_word(c):
            return False
        if c == "\n":
            return True
        if c.isspace():
            spaced = True
        elif c in _TERMINALS and spaced:
            return True
    return True


def _capitalise_new_sentence_starts(text: str, level: str, origins: list[int]) -> str:
    """``level`` with the first letter of each word that removal made a sentence start raised
    to upper case, where the sentence start it replaced was upper case.

    Removing a sentence's first word ("Many live here." minus "many") would otherwise leave a
    lowercase sentence start ("live here."), which ordinary text almost never has: a count of
    them would tell the level without reading the content.  Text whose sentences start in
    lower case stays so.  The raised letter is still the text's own character (its origin is
    unchanged), only its case differs.
    """
    chars: list[str] | None = None
    for match in _WORD_START_RE.finditer(level):
        i = match.start()
        o = origins[i]
        if not level[i].islower() or o < 0 or not _starts_sentence(level, i) or _starts_sentence(text, o):
            continue
        replaced = next((m.start() for m in reversed(list(_WORD_START_RE.finditer(text, 0, o)))
                         if _starts_sentence(text, m.start())), None)
        raised = level[i].upper()
        if replaced is not None and text[replaced].isupper() and len(raised) == 1:  # "ß".upper() is "SS"
            if chars is None:
                chars = list(level)
            chars[i] = raised
    return level if chars is None else "".join(chars)


def _trim(text: str, origins: list[int], lead: int | None) -> tuple[str, list[int]]:
    """Strip both ends; unless ``lead`` is None, prefix one space with origin ``lead``."""
    body = text.strip()
    if not body:
        return "", []
    start = len(text) - len(text.lstrip())
    kept = origins[start : start + len(body)]
    if lead is None:
        return body, kept
    return " " + body, [lead, *kept]


def _region(text: str, spans: list[Span], i: int, done: int) -> tuple[int, int, str, list[Span], list[Span], int]:
    """The maximal non-word run of kept text around ``spans[i]``, across the spans it touches.

    Returns the run's start and end in ``text``, its kept characters, the slices of ``text``
    they come from, the spans it crosses and the index of the first span after it.  ``done`` is
    where the previous run ended: no span lies between it and ``spans[i]``.
    """
    start, end = spans[i]
    a = start
    while a > done and not _is_word(text[a - 1]):
        a -= 1
    kept = [(a, start)]
    i += 1
    n = len(text)
    while True:
        stop = spans[i][0] if i < len(spans) else n
        word = _WORD_CHAR_RE.search(text, end, stop)
        run_end = word.start() if word else stop
        kept.append((end, run_end))
        if word or i == len(spans):
            return a, run_end, "".join([text[s:e] for s, e in kept]), kept, spans[i - len(kept) + 1 : i], i
        end = spans[i][1]
        i += 1


def _rewrite(text: str, region: str, kept: list[Span], crossed: list[Span], *, at_start: bool, at_end: bool,
             ) -> tuple[str, list[int]]:
    """The cleaned debris region (see :func:`_region`) and the index in ``text`` of each of its
    characters (-1: synthesised)."""
    idx = [j for s, e in kept for j in range(s, e)]
    if "\n" not in region and not region.strip():
        # the common case, words removed between spaces: what _clean_region gives, faster
        if at_start or at_end:
            return "", []
        points = list(itertools.accumulate(e - s for s, e in kept[:-1]))
        space, where = _space_between(region, points, 0, len(region))
        return space, [idx[p] if p >= 0 else -1 for p in where]
    gaps: list[Gap] = []
    offset = 0
    for (s, e), (start, end) in zip(kept, crossed):
        offset += e - s
        gaps.append((offset, tuple(_PUNCT_RE.findall(text, start, end))))
    cleaned, positions = _clean_region(region, tuple(gaps), at_start=at_start, at_end=at_end)
    return cleaned, [idx[p] if p >= 0 else -1 for p in positions]


def _counts(token: str) -> bool:
    """Whether removed punctuation still counts when the kept punctuation around it collapses.

    A removed "." still ends its sentence for the "; ." -> "." rule (and a removed "," still
    stands for its neighbours), so that removing it at a later level does not bring back the
    ";" an earlier level dropped.
    """
    return token[-1] in _TERMINALS or set(token) <= _SEPARATORS | _TERMINALS


@functools.lru_cache(maxsize=1 << 14)
def _clean_region(region: str, gaps: tuple[Gap, ...], *, at_start: bool, at_end: bool) -> tuple[str, tuple[int, ...]]:
    """Rewrite one maximal non-word run of the kept text that contains removal points.

    ``gaps`` are the removal points inside ``region``; ``at_start``/``at_end`` say that the
    region begins/ends the text (otherwise a word character is on that side).  Returns the
    rewritten run and, per character, its position in ``region`` (-1: synthesised whitespace).
    Cached: the same few runs (" , " around a removed word) make most of the work.
    """
    keep = _debris_mask(region, gaps, at_start)
    newlines = [p for p, c in enumerate(region) if c == "\n"]
    lines: list[list[int]] = [[] for _ in range(len(newlines) + 1)]
    line = 0
    for p, c in enumerate(region):
        if c == "\n":
            line += 1
        elif keep[p]:
            lines[line].append(p)
    line_gaps: list[list[Gap]] = [[] for _ in lines]
    for gap in gaps:
        line_gaps[bisect.bisect_left(newlines, gap[0])].append(gap)
    gap_lines = {number for number, on_line in enumerate(line_gaps) if on_line}
    right_word = not at_end
    points = [g for g, _ in gaps]

    if not newlines:
        groups = _groups(region, lines[0], line_gaps[0], line_start=at_start, line_end=",;:" if at_end else "")
        if not groups:
            if at_start or at_end:
                return "", ()
            space, where = _space_between(region, points, 0, len(region))
            return space, tuple(where)
        text, positions = _join(region, points, groups, 0 if not at_start else None)
        tail, tail_positions = _tail(region, points, lines[0], groups, right_word)
        return text + tail, (*positions, *tail_positions)

    # a first (last) line of the text that removal left without words disappears
    first = [] if at_start and 0 in gap_lines else _groups(
        region, lines[0], line_gaps[0], line_start=at_start, line_end=",;:" if at_end else ",;"
    )
    rows = [(0, *_join(region, points, first, 0 if not at_start else None))]
    for number in range(1, len(lines) - 1):
        if number not in gap_lines:  # a line emptied by removal disappears
            groups = _groups(region, lines[number], line_gaps[number], line_start=False, line_end="")
            rows.append((number, *_join(region, points, groups, None)))
    last = len(lines) - 1
    part = lines[last]
    groups = [] if at_end and last in gap_lines else _groups(
        region, part, line_gaps[last], line_start=True, line_end=",;:" if at_end else ""
    )
    indent = [] if last in gap_lines else list(itertools.takewhile(lambda p: region[p] in " \t", part))
    text, positions = _join(region, points, groups, None)
    tail, tail_positions = _tail(region, points, part, groups, right_word)

    chars: list[str] = []
    out: list[int] = []
    for number, row, row_positions in rows:
        chars.append(row)
        out.extend(row_positions)
        chars.append("\n")  # the newline that ended this line
        out.append(newlines[number])
    chars.extend([region[p] for p in indent])
    out.extend(indent)
    chars.append(text + tail)
    out.extend(positions + tail_positions)
    return _at_most_one_blank_line("".join(chars), out)


def _at_most_one_blank_line(text: str, positions: list[int]) -> tuple[str, tuple[int, ...]]:
    """Runs of 3+ newlines become 2 (the first two are kept)."""
    chars: list[str] = []
    out: list[int] = []
    for c, p in zip(text, positions):
        if c == "\n" and len(chars) >= 2 and chars[-1] == chars[-2] == "\n":
            continue
        chars.append(c)
        out.append(p)
    return "".join(chars), tuple(out)


def _debris_mask(region: str, gaps: Sequence[Gap], at_start: bool) -> list[bool]:
    """Which characters of ``region`` survive the character-level rules.

    Deleted characters are transparent to the later rules, so the rules only ever delete more
    as more is removed (what keeps the levels nested).
    """
    keep = [True] * len(region)
    points = [g for g, _ in gaps]
    for g in points:
        _drop_connectors(region, points, g, keep, at_start)
    while True:  # in rounds, every removal point judged on the same state: order cannot matter
        doomed = {p for g in points for p in _empty_pair(region, gaps, g, keep)}
        if not doomed:
            return keep
        for p in doomed:
            keep[p] = False


def _drop_connectors(region: str, points: list[int], g: int, keep: list[bool], at_start: bool) -> None:
    """Delete the connectors glued to removal point ``g`` ("year-round" minus both words)."""
    j = g - 1
    while j >= 0 and region[j] in _CONNECTORS:
        j -= 1
    if not _opens_line(region, points, j + 1, at_start):
        for i in range(j + 1, g):
            keep[i] = False
    j = g
    while j < len(region) and region[j] in _CONNECTORS:
        keep[j] = False
        j += 1


def _opens_line(region: str, points: list[int], pos: int, at_start: bool) -> bool:
    """Whether ``region[pos]`` opens a line of the original text ("- item", "* item": a bullet).

    Only spaces or tabs, and no removal point, may lie between the line start and ``pos``: a
    connector that removal brought to a line start is still debris.
    """
    nl = region.rfind("\n", 0, pos)
    if region[nl + 1 : pos].strip(" \t") or (nl < 0 and not at_start):
        return False
    return not any(nl < g <= pos for g in points)


def _empty_pair(region: str, gaps: Sequence[Gap], g: int, keep: list[bool]) -> list[int]:
    """The kept brackets or quotes glued to removal point ``g`` that enclose nothing but
    removed text: a pair around it ("(red admirals)" removed), or one whose partner it removed
    (a ")" after removed "(red admirals", a "(" before removed "red admirals)").
    """
    p = g - 1
    while p >= 0 and not keep[p]:
        p -= 1
    q = g
    while q < len(region) and not keep[q]:
        q += 1
    left = region[p] if p >= 0 else ""
    right = region[q] if q < len(region) else ""
    if left and _PAIRS.get(left) == right:
        return [p, q]
    removed = "".join(t for position, tokens in gaps if p < position <= q for t in tokens)
    found = []
    if right in _CLOSERS and _CLOSERS[right] in removed:
        found.append(q)
    if left in _PAIRS and _PAIRS[left] in removed:
        found.append(p)
    return found


def _split_groups(region: str, line: list[int], gaps: list[Gap]) -> list[Group]:
    """The groups of one line of ``region``: its kept characters ``line`` split at whitespace and
    at the removal points ``gaps`` of the line, with the removed punctuation that still counts
    (:func:`_counts`) as groups of no character in between.

    Splitting at removal points keeps every group one punctuation token of the text (less
    deleted characters), so more removal can shrink a group but never merge two into one of
    another kind; each group says whether whitespace came before it.
    """
    groups: list[Group] = []
    current: list[int] = []
    spaced = False  # whitespace since the last group
    current_spaced = False
    k = 0
    for p in line + [len(region)]:
        if (k < len(gaps) and gaps[k][0] <= p) or p == len(region) or region[p].isspace():
            if current:
                groups.append(("".join([region[q] for q in current]), current, current_spaced))
                current = []
            while k < len(gaps) and gaps[k][0] <= p:
                groups.extend((token, [], False) for token in gaps[k][1] if _counts(token))
                k += 1
        if p == len(region):
            break
        if region[p].isspace():
            spaced = True
            continue
        if not current:
            current_spaced, spaced = spaced, False
        current.append(p)
    return groups


def _only(group: Group, chars: frozenset[str]) -> Group:
    """The group less its characters not in ``chars``."""
    text, positions, spaced = group
    kept = [i for i, c in enumerate(text) if c in chars]
    return "".join([text[i] for i in kept]), [positions[i] for i in kept] if positions else [], spaced


def _groups(region: str, line: list[int], gaps: list[Gap], line_start: bool, line_end: str) -> list[Group]:
    """The punctuation groups of one line's share of a debris region, de-duplicated.

    ``line_end`` is the set of separators dropped at the end ("" when the region goes on to a
    word on the same line).  The rules only ever drop more as more is removed: of consecutive
    separators the last is kept (more removal deletes the first ones, never the last), and a
    separator is dropped after a terminal but not after other punctuation, which more removal
    may delete.
    """
    out: list[Group] = []
    for g in _split_groups(region, line, gaps):
        chars = set(g[0])
        if not chars <= _SEPARATORS | _TERMINALS:
            out.append(g)
            continue
        follows_separator = bool(out) and set(out[-1][0]) <= _SEPARATORS
        if chars & _TERMINALS:
            g = _only(g, _TERMINALS)
            if follows_separator:
                out[-1] = g  # ", ." -> "."
            elif (out and out[-1][0][-1] in _TERMINALS) or (not out and line_start):
                continue  # ". ." -> "."; a line does not start with "."
            else:
                out.append(g)
        else:
            g = (g[0][0], g[1][:1], g[2])
            if follows_separator:
                out[-1] = g  # ", ," -> ","
            elif (out and out[-1][0][-1] in _TERMINALS) or (not out and line_start):
                continue  # ". ," -> "."; a line does not start with ","
            else:
                out.append(g)
    while out and line_end and set(out[-1][0]) <= set(line_end):
        out.pop()
    return [g for g in out if g[1]]  # counted punctuation of removed text shows nothing


def _space_between(region: str, points: Sequence[int], left: int, right: int) -> tuple[str, list[int]]:
    """The whitespace of the text to put between what ends at ``left`` and what starts at
    ``right`` in ``region``, and its positions there (``[-1]``: one synthesised space).

    Removal joins two whitespace runs (``"big.  " + "Many" + " live"``) and one of them must go.
    The run that followed the left side stays (``"big.  live"``: the text's two spaces after a
    sentence), as if the removed words had taken the whitespace after them; where none followed
    it (``"here" + " ."``), the run before the right side.  Rewriting the run instead (one space
    for all) would leave a trace of every removal point that a classifier could count.  Only
    spaces and tabs count, and neither run crosses a removal point (``points``).
    """
    stop = min([p for p in points if p > left] + [right])
    j = left
    while j < stop and region[j] in " \t":
        j += 1
    if j > left:
        return region[left:j], list(range(left, j))
    start = max([p for p in points if p < right] + [left])
    j = right
    while j > start and region[j - 1] in " \t":
        j -= 1
    if j < right:
        return region[j:right], list(range(j, right))
    return " ", [-1]


def _join(region: str, points: Sequence[int], groups: list[Group], line_start: int | None) -> tuple[str, list[int]]:
    """The groups joined by the text's own whitespace (:func:`_space_between`) where whitespace
    separated them, but none before ``,.;:!?)]}``; before the first group only when a word is on
    its left, at ``line_start`` (None: no word there)."""
    chars: list[str] = []
    positions: list[int] = []
    left = line_start
    for text, group_positions, spaced in groups:
        if (spaced if chars else left is not None) and text[0] not in _NO_SPACE_BEFORE:
            space, where = _space_between(region, points, left or 0, group_positions[0])
            chars.append(space)
            positions.extend(where)
        chars.append(text)
        positions.extend(group_positions)
        left = group_positions[-1] + 1
    return "".join(chars), positions


def _tail(region: str, points: Sequence[int], line: list[int], groups: list[Group], right_word: bool,
          ) -> tuple[str, list[int]]:
    """The whitespace after the last group when a word follows on the same line, with its
    positions in ``region``."""
    if not right_word or not groups:
        return "", []
    last = groups[-1][0][-1]
    spaced = bool(line) and region[line[-1]].isspace()
    if last in _OPENERS and not spaced:
        return "", []
    if spaced or last in _NO_SPACE_BEFORE:
        return _space_between(region, points, groups[-1][1][-1] + 1, len(region))
    return "", []


def _level_spans(doc: _Text, seqs: list[tuple[str, ...]], base: list[Span]) -> tuple[list[Span], str]:
    """Remove every occurrence of ``seqs`` (plus ``base``) until no occurrence is left."""
    spans = list(base)
    for seq in seqs:
        spans.extend(doc.occurrences(seq))
    spans = _removal(doc.text, spans)
    # sequences whose ends are words: an occurrence made by removal can be mapped back.  A
    # one-token sequence cannot be made by removal (kept tokens are never altered), so only
    # multi-token phrases need the re-check.
    closable = [seq for seq in seqs if len(seq) > 1 and _is_word(seq[0][0]) and _is_word(seq[-1][0])]
    while True:
        level, origins = render_with_origins(doc.text, spans)
        if not closable or not spans:
            return spans, level
        found = _remaining(level, origins, closable)
        if not found:
            return spans, level
        spans = _removal(doc.text, spans + found)


def _remaining(level: str, origins: list[int], seqs: list[tuple[str, ...]]) -> list[Span]:
    """Original-text spans of occurrences of ``seqs`` that removal created in ``level``.

    ``seqs`` begin and end with words, and a word of a level is a word of the text character
    for character, so the origins of an occurrence's first and last characters bound it.
    """
    rendered = _Text(level)
    return [(origins[s], origins[e - 1] + 1) for seq in seqs for s, e in rendered.occurrences(seq)]


def build_degree_variants(text: str, phrases: Sequence[str], n_levels: int) -> DegreeVariants:
    """The ``n_levels`` nested degree variants of ``text`` for the ranked ``phrases``.

    Level 0 is :func:`normalise` ``(text)``, the response with only its ends normalised as every
    level's are; ``removed_spans`` are in the coordinates of ``text`` itself.
    """
    if not isinstance(n_levels, int) or n_levels < 2:
        raise ValueError(f"n_levels must be an integer >= 2, got {n_levels!r}")
    doc = _Text(text)
    seqs = [tuple(tok for _, _, tok in _tokenize(p)) for p in phrases]
    levels = [normalise(text)]
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
    """The ``n_levels`` strings of :func:`build_degree_variants`; index 0 is ``normalise(text)``."""
    return build_degree_variants(text, phrases, n_levels).levels


def words(text: str) -> list[str]:
    """The ``\\w+`` runs of a text (what the subsequence property is stated on)."""
    return WORD_RE.findall(text)
