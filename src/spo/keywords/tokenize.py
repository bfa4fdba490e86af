"""One offline tokenisation shared by every extractor: word/punctuation tokens with offsets.

The regex needs no downloaded data (no punkt): a token is a word (``\\w+`` with inner
apostrophes, ASCII or typographic, kept, so ``don't`` and ``don\u2019t`` meet the stop-word
list's ``don't``), or a run of punctuation.  Every non-space character belongs to some token,
so two consecutive tokens are separated by whitespace or by nothing at all.  A newline, and
end punctuation (``.``, ``!``, ``?``) followed by whitespace, end a sentence: no candidate phrase
and no occurrence of a phrase may run across one (``cut`` flags the token after each break), so a
phrase's span never joins two sentences or two paragraphs.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from operator import sub

# group 1: word, group 2: punctuation run, group 3: newline (acts as a sentence break)
WORD_RE = re.compile(r"\w+(?:['\u2019]\w+)*|[^\w\s]+")
# a token with the whitespace before it (regex \s and str.lstrip agree on what is whitespace)
_CHUNK_RE = re.compile(r"\s*(?:" + WORD_RE.pattern + ")")
SENTENCE_RE = re.compile(r"(?<=[.!?])\s+|\n+")
_SENTENCE_END = re.compile(r"[.!?]")

WORD, PUNCT = 1, 2


def word_tokenize(text: str) -> list[str]:
    """Words and punctuation runs (the word tokenizer handed to rake-nltk)."""
    return WORD_RE.findall(text)


def sentence_tokenize(text: str) -> list[str]:
    """Regex sentence split at end punctuation followed by space, and at newlines."""
    return [s for s in SENTENCE_RE.split(text) if s and not s.isspace()]


def is_word(tok: str) -> bool:
    """A word token (``\\w`` first character) rather than a punctuation run."""
    c = tok[0]
    return c.isalnum() or c == "_"


class Tokens:
    """The tokens of one text: lowercased forms, line ranges, character offsets.

    ``low`` holds the lowercased tokens; ``lines`` the ``(first, end)`` token ranges of the
    text's lines (a newline is a sentence break for candidate phrases); ``ends`` the end offset
    of every token; ``offsets``, ``kind`` and ``brk`` are computed on first use.

    Why this shape: the text is lowercased once and split with one ``findall`` of
    ``\\s*token`` chunks.  The chunk lengths, summed with ``accumulate``, give every token's end
    offset and the chunks, left-stripped, give the tokens, all in C loops; this costs about half
    of a separate ``finditer`` pass, whose match objects were the single most expensive part
    of tokenising.  Lines are found from the (few) newline positions by bisection on ``ends``.
    """

    __slots__ = ("text", "low", "lines", "ends", "_lens", "_offsets", "_kind", "_brk", "_cut")

    def __init__(self, text: str) -> None:
        self.text = text
        src = text.lower()
        lower_each = len(src) != len(text)  # a few characters lowercase to two (U+0130)
        if lower_each:
            src = text
        # rstrip: trailing whitespace can never start a chunk, and scanning it would be quadratic
        chunks = _CHUNK_RE.findall(src, 0, len(src.rstrip()))
        toks = list(map(str.lstrip, chunks))
        self.ends = ends = list(accumulate(map(len, chunks)))
        self._lens = None
        if lower_each:
            self._lens = list(map(len, toks))  # lengths in the text, before lowercasing
            toks = [tok.lower() for tok in toks]
        self.low = toks
        n = len(toks)
        if not n:
            self.lines: list[tuple[int, int]] = []
        elif "\n" in src:
            # a newline at offset i starts a line at the first token ending after i
            lines = []
            first = 0
            find = src.find
            nl = find("\n")
            while nl >= 0:
                cut = bisect_right(ends, nl, first)
                if cut > first:
                    lines.append((first, cut))
                    first = cut
                if cut == n:
                    break
                nl = find("\n", nl + 1)
            if first < n:
                lines.append((first, n))
            self.lines = lines
        else:
            self.lines = [(0, n)]
        self._offsets: list[tuple[int, int]] | None = None
        self._kind: list[int] | None = None
        self._brk: list[bool] | None = None
        self._cut: bytearray | None = None

    def __len__(self) -> int:
        return len(self.low)

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """(start, end) character offsets of every token."""
        if self._offsets is None:
            ends = self.ends
            starts = map(sub, ends, self._lens if self._lens is not None else map(len, self.low))
            self._offsets = list(zip(starts, ends))
        return self._offsets

    @property
    def kind(self) -> list[int]:
        """WORD or PUNCT per token."""
        if self._kind is None:
            self._kind = [WORD if is_word(tok) else PUNCT for tok in self.low]
        return self._kind

    @property
    def brk(self) -> list[bool]:
        """True for a token that starts a line after the first."""
        if self._brk is None:
            brk = [False] * len(self.low)
            for first, _ in self.lines[1:]:
                brk[first] = True
            self._brk = brk
        return self._brk

    @property
    def cut(self) -> bytearray:
        """1 for a token that begins a sentence after the first: after a newline, or after a
        punctuation run holding ``.``, ``!`` or ``?`` that whitespace follows (``e.g`` is no cut)."""
        if self._cut is None:
            cut = bytearray(len(self.low))
            for first, _ in self.lines[1:]:
                cut[first] = 1
            low, offsets, kind = self.low, self.offsets, self.kind
            for i in range(1, len(low)):
                if (
                    kind[i - 1] == PUNCT
                    and offsets[i][0] > offsets[i - 1][1]
                    and _SENTENCE_END.search(low[i - 1])
                ):
                    cut[i] = 1
            self._cut = cut
        return self._cut

    def crosses(self, pos: int, k: int) -> bool:
        """Whether tokens pos..pos+k-1 run across a sentence or line break."""
        return k > 1 and any(self.cut[pos + 1 : pos + k])

    def find(self, seq: Sequence[str]) -> list[int]:
        """Start positions of every non-overlapping occurrence of the token sequence ``seq``
        that stays within one sentence and one line (``crosses``)."""
        low = self.low
        first = seq[0]
        k = len(seq)
        want = list(seq)
        index = low.index
        found: list[int] = []
        pos = 0
        try:
            while True:
                pos = index(first, pos)
                if k == 1 or (low[pos : pos + k] == want and not self.crosses(pos, k)):
                    found.append(pos)
                    pos += k
                else:
                    pos += 1
        except ValueError:
            return found

    def spacing(self, pos: int, k: int) -> tuple[bool, ...]:
        """Whether whitespace separates each pair of neighbouring tokens in pos..pos+k-1: two
        occurrences render to the same phrase text only if their spacing is the same."""
        offsets = self.offsets
        return tuple(offsets[i][0] > offsets[i - 1][1] for i in range(pos + 1, pos + k))

    def spans(self, positions: list[int], k: int) -> list[tuple[int, int]]:
        offsets = self.offsets
        return [(offsets[p][0], offsets[p + k - 1][1]) for p in positions]

    def render(self, pos: int, k: int) -> str:
        """The lowercased tokens pos..pos+k-1, joined by one space where the text has whitespace."""
        low, offsets = self.low, self.offsets
        parts = [low[pos]]
        for i in range(pos + 1, pos + k):
            if offsets[i][0] > offsets[i - 1][1]:
                parts.append(" ")
            parts.append(low[i])
        return "".join(parts)
