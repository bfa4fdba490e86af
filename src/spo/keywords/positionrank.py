"""PositionRank (Florescu & Caragea, ACL 2017) on networkx, without a POS tagger.

pke's implementation needs spaCy models, which cannot be downloaded here; with no tagger the
candidate words are all non-stop-word word tokens (the paper keeps nouns and adjectives).
Steps: (1) a weighted undirected graph over the candidate words, an edge between two candidate
words whose occurrences lie fewer than ``window`` candidate words apart (weight = count);
(2) personalised PageRank (``alpha = damping``) whose personalisation vector is, per word, the
sum of 1/position over its occurrences (position = 1-based index among all word tokens),
normalised; (3) candidate phrases are maximal runs of consecutive candidate words (broken by
stop words, punctuation and newlines), runs longer than ``max_words`` split into consecutive
chunks of ``max_words``; phrase score = sum of its words' PageRank scores.
"""

from __future__ import annotations

import networkx as nx

from spo.config import PositionRankOptions
from spo.keywords.base import Extractor, KeyPhrase, StopwordsSpec
from spo.keywords.tokenize import WORD, Tokens


class PositionRankExtractor(Extractor):
    """score = sum of the words' personalised PageRank scores (higher is better)."""

    method = "positionrank"

    def __init__(
        self,
        stopwords: StopwordsSpec = "english",
        max_phrases: int | None = None,
        options: PositionRankOptions | None = None,
        **option_kwargs,
    ) -> None:
        super().__init__(stopwords, max_phrases)
        self.options = options if options is not None else PositionRankOptions(**option_kwargs)

    def extract_tokens(self, toks: Tokens) -> list[KeyPhrase]:
        stop = self.stopwords
        window = self.options.window
        max_words = self.options.max_words
        seq: list[str] = []  # candidate word occurrences in text order
        bias: dict[str, float] = {}
        runs: list[tuple[int, int]] = []  # (first token, length)
        word_pos = 0
        run_start = -1
        for i, (tok, kind, brk) in enumerate(zip(toks.low, toks.kind, toks.brk)):
            if brk and run_start >= 0:
                runs.append((run_start, i - run_start))
                run_start = -1
            if kind == WORD:
                word_pos += 1
                if tok not in stop:
                    seq.append(tok)
                    bias[tok] = bias.get(tok, 0.0) + 1.0 / word_pos
                    if run_start < 0:
                        run_start = i
                    continue
            if run_start >= 0:
                runs.append((run_start, i - run_start))
                run_start = -1
        if run_start >= 0:
            runs.append((run_start, len(toks) - run_start))
        if not seq:
            return []

        graph = nx.Graph()
        graph.add_nodes_from(bias)
        for i, word in enumerate(seq):
            for other in seq[i + 1 : i + window]:
                if other == word:
                    continue
                if graph.has_edge(word, other):
                    graph[word][other]["weight"] += 1.0
                else:
                    graph.add_edge(word, other, weight=1.0)
        total = sum(bias.values())
        personalization = {w: b / total for w, b in bias.items()}
        scores = nx.pagerank(graph, alpha=self.options.damping, personalization=personalization, weight="weight")

        candidates: dict[tuple[str, ...], tuple[float, int]] = {}
        low = toks.low
        for start, length in runs:
            for s in range(start, start + length, max_words):
                phrase = tuple(low[s : min(s + max_words, start + length)])
                if phrase not in candidates:
                    candidates[phrase] = (sum(scores[w] for w in phrase), s)
        ranked = sorted(candidates.items(), key=lambda item: (-item[1][0], item[1][1]))
        return self.finalize(toks, ((score, phrase) for phrase, (score, _) in ranked))
