"""RAKE through rake-nltk, fully offline, with spans.

rake-nltk's own scoring (word degree / frequency over the candidate phrases) is used as is; only
the tokenisation is ours, done once per text with character offsets, so that finding the spans
of the ranked phrases is a dictionary look-up instead of a regex per phrase.  Candidate phrases
are maximal runs of non-stop-word word tokens; punctuation runs and newlines break them (the
same phrases rake-nltk makes with our regex sentence and word tokenizers, except that rake-nltk
treats a multi-character punctuation run such as ``...`` or ``."`` as a word).
"""

from __future__ import annotations

import string
from collections import Counter, defaultdict

from rake_nltk import Rake
from rake_nltk.rake import Metric

from spo.config import RakeOptions
from spo.keywords.base import Extractor, KeyPhrase, StopwordsSpec, covered_chars, phrases_json
from spo.keywords.tokenize import Tokens, sentence_tokenize, word_tokenize


class _TokenRake(Rake):
    """rake-nltk's Rake fed with phrases built from our tokens."""

    def rank_tokens(self, toks: Tokens) -> list[tuple[float, str, tuple[str, ...]]]:
        """Distinct candidate phrases as (score, text, words), best first, in rake-nltk's order.

        Unlike ``extract_keywords_from_text`` this does not fill ``rank_list`` or
        ``ranked_phrases`` (nothing reads them here).
        """
        stop = self.stopwords
        lo, hi = self.min_length, self.max_length
        low = toks.low
        phrases: list[tuple[str, ...]] = []
        append = phrases.append
        for first, end in toks.lines:
            cur: list[str] = []
            for tok in low[first:end]:
                if tok in stop:
                    pass
                else:
                    c = tok[0]
                    if c.isalnum() or c == "_":
                        cur.append(tok)
                        continue
                if cur:
                    if lo <= len(cur) <= hi:
                        append(tuple(cur))
                    cur = []
            if cur and lo <= len(cur) <= hi:
                append(tuple(cur))
        if not phrases:
            return []
        self._build_frequency_dist(phrases)
        counts = Counter(phrases)
        self._build_word_co_occurance_graph(counts)
        return self._rank_distinct(counts)

    def _build_word_co_occurance_graph(self, counts: Counter[tuple[str, ...]]) -> None:
        """rake-nltk's word degrees without materialising the co-occurrence graph.

        rake-nltk adds 1 to graph[w][c] for every ordered pair (w, c) of word occurrences in
        a phrase and sums each row, so deg(w) = sum over w's occurrences of the phrase's
        length: the same integers, in O(words) instead of O(words^2) with nested defaultdicts,
        and once per distinct phrase (times its count) rather than once per occurrence.
        """
        degree: dict[str, int] = defaultdict(int)
        for phrase, count in counts.items():
            n = len(phrase) * count
            for word in phrase:
                degree[word] += n
        self.degree = degree

    def _rank_distinct(self, counts: Counter[tuple[str, ...]]) -> list[tuple[float, str, tuple[str, ...]]]:
        """rake-nltk's ranking (same scores, same order), one entry per distinct phrase.

        rake-nltk ranks every occurrence; repeats have equal (score, text) so they would only
        sit next to each other in the sorted list, and are dropped before scoring instead.
        """
        if self.metric != Metric.DEGREE_TO_FREQUENCY_RATIO:
            self._build_ranklist(list(counts))
            return [(score, phrase, tuple(phrase.split(" "))) for score, phrase in self.rank_list]
        degree, freq = self.degree, self.frequency_dist
        word_score = {w: 1.0 * degree[w] / f for w, f in freq.items()}
        ranked = []
        for phrase in counts:
            rank = 0.0
            for word in phrase:
                rank += word_score[word]
            ranked.append((rank, " ".join(phrase), phrase))
        # (score, text) decides the order, as in rake-nltk; the text determines the words
        ranked.sort(reverse=True)
        return ranked


def make_rake(stopwords: frozenset[str], options: RakeOptions, cls: type[Rake] = Rake) -> Rake:
    """A rake-nltk Rake that never touches NLTK data (explicit stop words and regex tokenizers)."""
    return cls(
        stopwords=set(stopwords),
        punctuations=set(string.punctuation),
        min_length=options.min_length,
        max_length=options.max_length,
        sentence_tokenizer=sentence_tokenize,
        word_tokenizer=word_tokenize,
    )


class RakeExtractor(Extractor):
    """RAKE (Rose et al. 2010) via rake-nltk; score = rake-nltk's phrase score (higher is better)."""

    method = "rake"

    def __init__(
        self,
        stopwords: StopwordsSpec = "english",
        max_phrases: int | None = None,
        options: RakeOptions | None = None,
        **option_kwargs,
    ) -> None:
        super().__init__(stopwords, max_phrases)
        self.options = options if options is not None else RakeOptions(**option_kwargs)
        self._rake = make_rake(self.stopwords, self.options, _TokenRake)

    def extract_tokens(self, toks: Tokens) -> list[KeyPhrase]:
        return [KeyPhrase(text, score, spans) for text, score, spans in self._located(toks)]

    def extract_json(self, text: str) -> tuple[str, int, int]:
        """The stage's fast path: serialise (text, score, spans) without KeyPhrase objects."""
        if not text or text.isspace():
            return "[]", 0, 0
        located = self._located(Tokens(text))
        return phrases_json(located), len(located), covered_chars([spans for _, _, spans in located])

    def _located(self, toks: Tokens) -> list[tuple[str, float, list[tuple[int, int]]]]:
        """Ranked (text, score, spans), at most ``max_phrases``: Base.finalize, specialised.

        Every ranked phrase occurs in the text and repeats are already merged, so no seen set
        is needed.  Occurrences are found from each word's positions (one pass over the tokens)
        instead of a ``list.index`` scan per phrase: single-word phrases, the common case, are
        a look-up; longer ones compare the tokens at their first word's positions, left to
        right without overlaps, skipping any that runs across a line break (``Tokens.cut``:
        two word tokens in a row have no punctuation between them, so only lines matter).
        """
        ranked = self._rake.rank_tokens(toks)
        if not ranked:
            return []
        if self.max_phrases is not None:
            ranked = ranked[: self.max_phrases]
        low = toks.low
        where: dict[str, list[int]] = {}
        for i, tok in enumerate(low):
            if tok in where:
                where[tok].append(i)
            else:
                where[tok] = [i]
        offsets = toks.offsets
        at = offsets.__getitem__
        out: list[tuple[str, float, list[tuple[int, int]]]] = []
        append = out.append
        for score, text, seq in ranked:
            positions = where[seq[0]]
            k = len(seq)
            if k == 1:
                append((text, score, list(map(at, positions))))
                continue
            spans = []
            free = 0
            multiline = len(toks.lines) > 1
            for pos in positions:
                if (
                    pos >= free
                    and tuple(low[pos : pos + k]) == seq
                    and not (multiline and toks.crosses(pos, k))
                ):
                    spans.append((offsets[pos][0], offsets[pos + k - 1][1]))
                    free = pos + k
            if spans:
                append((text, score, spans))
        return out
