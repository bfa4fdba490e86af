"""The control: random contiguous word spans matched in number and length to RAKE's phrases.

For a text, RAKE (same stop words, ``max_phrases`` and RAKE options) gives phrases with
character lengths l_1..l_n.  The control draws n distinct random spans of 1..``max_words``
consecutive word tokens that do not cross punctuation or a newline and are not made only of
stop words, one per RAKE phrase, each the available span whose length is closest to l_i (equal-length
spans drawn at random; when two lengths are equally close the one that keeps the running total
nearer RAKE's is taken).  As for every method, a phrase's spans are all its occurrences, and no
occurrence of a pick may overlap an occurrence of an earlier pick.  So the count
matches RAKE exactly unless the text runs out of spans, and the total length matches whenever
the text has spans of the right lengths (closely otherwise).  The draw is seeded by a hash of
(seed, text): the same text gives the same spans whatever the processing order.
score = 1 / rank (decreasing with rank; the ranking is the draw order).
"""

from __future__ import annotations

import hashlib
import random

from spo.config import RakeOptions, RandomOptions
from spo.keywords.base import Extractor, KeyPhrase, StopwordsSpec
from spo.keywords.rake import RakeExtractor
from spo.keywords.tokenize import WORD, Tokens


def text_rng(seed: int, text: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}\x00{text}".encode("utf-8", "surrogatepass")).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


class RandomSpanExtractor(Extractor):
    method = "random"

    def __init__(
        self,
        stopwords: StopwordsSpec = "english",
        max_phrases: int | None = None,
        seed: int = 0,
        options: RandomOptions | None = None,
        rake: RakeOptions | dict | None = None,
        **option_kwargs,
    ) -> None:
        super().__init__(stopwords, max_phrases)
        self.seed = seed
        self.options = options if options is not None else RandomOptions(**option_kwargs)
        rake_options = RakeOptions(**rake) if isinstance(rake, dict) else rake
        self.reference = RakeExtractor(self.stopwords, max_phrases, options=rake_options)

    def extract_tokens(self, toks: Tokens) -> list[KeyPhrase]:
        targets = [len(kp.phrase) for kp in self.reference.extract_tokens(toks)]
        if not targets:
            return []
        rng = text_rng(self.seed, toks.text)
        stop = self.stopwords
        max_words = self.options.max_words
        low, kind, brk = toks.low, toks.kind, toks.brk

        # candidate spans (first token, n words) bucketed by rendered length
        buckets: dict[int, list[tuple[int, int]]] = {}
        n_tok = len(toks)
        for i in range(n_tok):
            if kind[i] != WORD:
                continue
            length = -1
            all_stop = True
            for k in range(1, max_words + 1):
                j = i + k - 1
                if j >= n_tok or kind[j] != WORD or (k > 1 and brk[j]):
                    break
                length += len(low[j]) + 1
                all_stop = all_stop and low[j] in stop
                if not all_stop:
                    buckets.setdefault(length, []).append((i, k))
        for key in sorted(buckets):
            rng.shuffle(buckets[key])
        lengths = sorted(buckets)
        if not lengths:
            return []
        max_len = lengths[-1]

        used = bytearray(n_tok)
        seen: set[tuple[str, ...]] = set()
        out: list[KeyPhrase] = []
        wanted_total = 0
        got_total = 0

        def take(length: int) -> tuple[tuple[str, ...], list[int]] | None:
            bucket = buckets.get(length)
            while bucket:
                i, k = bucket.pop()
                if any(used[i : i + k]):
                    continue
                seq = tuple(low[i : i + k])
                if seq in seen:
                    continue
                seen.add(seq)
                positions = toks.find(seq)
                # every occurrence is removed later, so none may overlap an earlier pick
                if any(any(used[p : p + k]) for p in positions):
                    continue
                return seq, positions
            return None

        for target in targets:
            wanted_total += target
            pick = None
            for d in range(0, max(target, max_len) + 1):
                # prefer the side that brings the running total back towards RAKE's
                deficit = wanted_total - (got_total + target)
                order = (target + d, target - d) if deficit >= 0 else (target - d, target + d)
                for length in order if d else (target,):
                    if length > 0:
                        pick = take(length)
                        if pick:
                            break
                if pick:
                    break
            if pick is None:
                break
            seq, positions = pick
            k = len(seq)
            for p in positions:
                used[p : p + k] = b"\x01" * k
            phrase = toks.render(positions[0], k)
            got_total += len(phrase)
            out.append(KeyPhrase(phrase, 1.0 / (len(out) + 1), toks.spans(positions, k)))
        return out
