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

from collections import defaultdict

from rake_nltk import Rake
from rake_nltk.rake import Metric

from spo.config import RakeOptions
from spo.keywords.base import Extractor, KeyPhrase, StopwordsSpec
from spo.keywords.tokenize import Tokens, sentence_tokenize, word_tokenize


class _TokenRake(Rake):
    """rake-nltk's Rake fed with phrases built from our tokens."""

    def rank_tokens(self, toks: Tokens) -> list[tuple[float, str, tuple[str, ...]]]:
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
        self._build_word_co_occurance_graph(phrases)
        self._build_ranklist(phrases)
        return self.ranked_tokens

    def _build_word_co_occurance_graph(self, phrase_list: list[tuple[str, ...]]) -> None:
        """rake-nltk's word degrees without materialising the co-occurrence graph.

        rake-nltk adds 1 to graph[w][c] for every ordered pair (w, c) of word occurrences in
        a phrase and sums each row, so deg(w) = sum over w's occurrences of the phrase's
        length: the same integers, in O(words) instead of O(words^2) with nested defaultdicts.
        """
        degree: dict[str, int] = defaultdict(int)
        for phrase in phrase_list:
            n = len(phrase)
            for word in phrase:
                degree[word] += n
        self.degree = degree

    def _build_ranklist(self, phrase_list: list[tuple[str, ...]]) -> None:
        """rake-nltk's ranking (same scores, same order); also keeps each phrase's tokens."""
        if self.metric != Metric.DEGREE_TO_FREQUENCY_RATIO:
            super()._build_ranklist(phrase_list)
            self.ranked_tokens = [(score, phrase, tuple(phrase.split(" "))) for score, phrase in self.rank_list]
            return
        degree, freq = self.degree, self.frequency_dist
        word_score = {w: 1.0 * degree[w] / f for w, f in freq.items()}
        ranked = []
        for phrase in phrase_list:
            rank = 0.0
            for word in phrase:
                rank += word_score[word]
            ranked.append((rank, " ".join(phrase), phrase))
        # (score, text) decides the order, as in rake-nltk; equal texts have equal tuples
        ranked.sort(reverse=True)
        self.ranked_tokens = ranked
        self.rank_list = [(score, text) for score, text, _ in ranked]
        self.ranked_phrases = [text for _, text, _ in ranked]


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
        ranked = self._rake.rank_tokens(toks)
        if not ranked:
            return []
        # Base.finalize, specialised: repeats are adjacent (same phrase, same score), and every
        # ranked phrase occurs in the text, so no look-ups of the seen set are needed.
        low = toks.low
        index = low.index
        offsets = toks.offsets
        limit = self.max_phrases
        out: list[KeyPhrase] = []
        previous = None
        for score, text, seq in ranked:
            if text == previous:
                continue
            previous = text
            first = seq[0]
            k = len(seq)
            spans = []
            pos = 0
            try:
                if k == 1:
                    while True:
                        pos = index(first, pos)
                        spans.append(offsets[pos])
                        pos += 1
                else:
                    want = list(seq)
                    while True:
                        pos = index(first, pos)
                        if low[pos : pos + k] == want:
                            spans.append((offsets[pos][0], offsets[pos + k - 1][1]))
                            pos += k
                        else:
                            pos += 1
            except (ValueError, IndexError):
                pass
            out.append(KeyPhrase(text, score, spans))
            if limit is not None and len(out) >= limit:
                break
        return out
