"""YAKE (Campos et al. 2020) through the PyPI ``yake`` package (runs offline)."""

from __future__ import annotations

import yake

from spo.config import YakeOptions
from spo.keywords.base import Extractor, KeyPhrase, StopwordsSpec
from spo.keywords.tokenize import Tokens, word_tokenize


class YakeExtractor(Extractor):
    """score = 1 / (1 + yake_score): YAKE's lower-is-better score mapped into (0, 1], order kept.

    YAKE's phrases are re-tokenised with our tokenizer and located in the text; a phrase YAKE
    returns that cannot be found as a token sequence (its tokenizer differs in rare cases) is
    dropped.
    """

    method = "yake"

    def __init__(
        self,
        stopwords: StopwordsSpec = "english",
        max_phrases: int | None = None,
        options: YakeOptions | None = None,
        **option_kwargs,
    ) -> None:
        super().__init__(stopwords, max_phrases)
        self.options = options if options is not None else YakeOptions(**option_kwargs)
        o = self.options
        self._yake = yake.KeywordExtractor(
            lan="en",
            n=o.max_ngram,
            dedup_lim=o.dedup_lim,
            window_size=o.window_size,
            top=o.top,
            stopwords=set(self.stopwords),
        )

    def extract_tokens(self, toks: Tokens) -> list[KeyPhrase]:
        try:
            found = self._yake.extract_keywords(toks.text)
        except (ValueError, ZeroDivisionError, IndexError):  # yake on degenerate text
            return []
        ranked = (
            (1.0 / (1.0 + float(score)), [w.lower() for w in word_tokenize(kw)]) for kw, score in found
        )
        return self.finalize(toks, ranked)
