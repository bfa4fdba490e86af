"""Shared types of the key-phrase extractors: KeyPhrase, the extractor protocol, stop words."""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from spo.keywords.tokenize import Tokens

StopwordsSpec = str | Path | Iterable[str] | None


@dataclass(frozen=True, slots=True)
class KeyPhrase:
    """One ranked key phrase.

    ``phrase`` is the lowercased words joined by single spaces (punctuation inside a phrase,
    as in YAKE's ``year-round``, is kept attached as in the text); ``score`` is higher-is-better
    for every method; ``spans`` are the ``(start, end)`` character offsets of every
    case-insensitive, word-boundary occurrence of the phrase in the text, in text order.
    """

    phrase: str
    score: float
    spans: list[tuple[int, int]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"phrase": self.phrase, "score": self.score, "spans": [list(s) for s in self.spans]}


# json's own C string encoder: the bytes ``spo.io.dumps`` (ensure_ascii=True) writes for a str
json_str = json.encoder.encode_basestring_ascii
_float_repr = float.__repr__

# (phrase, score, spans): what the JSON serialisation needs of a key phrase
PhraseTuple = tuple[str, float, Sequence[tuple[int, int]]]


def phrases_json(items: Iterable[PhraseTuple]) -> str:
    """The JSON array of ``{"phrase", "score", "spans"}`` objects, as ``spo.io.dumps`` writes it.

    Why hand-written: in the ``keywords`` stage, building one dict per phrase and handing it to
    ``json.dumps`` cost half as much again as the extraction itself.  Here only the phrase text
    goes through json's C string encoder; scores are written as json writes a finite float
    (``float.__repr__``; anything else falls back to ``json.dumps``) and spans as ``[s,e]``
    pairs of ints, so the bytes are the same as ``dumps([kp.to_json() for kp in ...])``.
    """
    enc, frepr = json_str, _float_repr
    parts = [
        f'{{"phrase":{enc(phrase)},"score":'
        f"{frepr(score) if type(score) is float and math.isfinite(score) else _json_number(score)}"
        f',"spans":[{",".join([f"[{s},{e}]" for s, e in spans])}]}}'
        for phrase, score, spans in items
    ]
    return "[" + ",".join(parts) + "]"


def _json_number(value: object) -> str:
    return json.dumps(value, allow_nan=True)


def covered_chars(span_lists: Iterable[Sequence[tuple[int, int]]]) -> int:
    """Characters covered by the union of all the spans (phrases' spans may overlap)."""
    total = 0
    cur_s = cur_e = -1
    for s, e in sorted(chain.from_iterable(span_lists)):
        if s > cur_e:
            total += cur_e - cur_s
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
    return total + (cur_e - cur_s)


def load_stopwords(spec: StopwordsSpec = "english") -> frozenset[str]:
    """A non-empty lowercased stop-word set.

    ``spec`` is a language of the PyPI ``stopwords`` package (default ``english``: 174 words
    once its empty entry is dropped; each word with an ASCII apostrophe is also added with a
    typographic one, U+2019, as the tokenizer keeps both inside words), a path to a file with one
    word a line, or an iterable of words.  An empty set is refused: rake-nltk would silently fall
    back to NLTK's corpus, which needs a download.
    """
    if spec is None:
        spec = "english"
    if isinstance(spec, Path) or (isinstance(spec, str) and ("/" in spec or Path(spec).is_file())):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"stopwords file {path} not found")
        words = path.read_text(encoding="utf-8").splitlines()
    elif isinstance(spec, str):
        import stopwords as stopwords_pkg

        try:
            words = stopwords_pkg.get_stopwords(spec)
        except stopwords_pkg.LanguageNotAvailable:
            raise ValueError(
                f"stopwords {spec!r} is neither a file nor a language of the `stopwords` package"
            ) from None
    else:
        words = list(spec)
    result = {w.strip().lower() for w in words if w and w.strip()}
    if not result:
        raise ValueError(f"stopwords {spec!r} gave an empty stop-word set")
    # the tokenizer keeps typographic apostrophes inside words (you\u2019re): match those too
    result |= {w.replace("'", "\u2019") for w in result if "'" in w}
    return frozenset(result)


class Extractor(ABC):
    """Base class: ``extract(text) -> list[KeyPhrase]``, best first, at most ``max_phrases``."""

    method: str = ""

    def __init__(self, stopwords: StopwordsSpec = "english", max_phrases: int | None = None) -> None:
        if max_phrases is not None and max_phrases < 1:
            raise ValueError("max_phrases must be >= 1 or None")
        self.stopwords = load_stopwords(stopwords)
        self.max_phrases = max_phrases

    def extract(self, text: str) -> list[KeyPhrase]:
        if not text or text.isspace():
            return []
        return self.extract_tokens(Tokens(text))

    @abstractmethod
    def extract_tokens(self, toks: Tokens) -> list[KeyPhrase]:
        """The method itself, on a text tokenised once (shared by ranking and span finding)."""

    def extract_json(self, text: str) -> tuple[str, int, int]:
        """``extract(text)`` as the stage writes it: (JSON array, number of phrases, covered chars).

        Extractors may override this with a path that skips the KeyPhrase objects; the JSON must
        stay byte-identical to ``phrases_json`` of ``extract(text)``.
        """
        phrases = self.extract(text)
        items = [(kp.phrase, kp.score, kp.spans) for kp in phrases]
        return phrases_json(items), len(items), covered_chars([kp.spans for kp in phrases])

    def finalize(self, toks: Tokens, ranked: Iterable[tuple]) -> list[KeyPhrase]:
        """Turn ranked ``(score, token sequence[, phrase text])`` tuples into KeyPhrases.

        Drops repeats (case-insensitively, keeping the best rank) and sequences that do not occur
        in the text within one sentence, finds every occurrence that reads as the phrase (same
        spacing, no sentence or line break inside), and stops at ``max_phrases``.  The phrase text, when
        given, must be the rendering of the tokens (rake-nltk's words joined by spaces).
        """
        out: list[KeyPhrase] = []
        seen: set[tuple[str, ...]] = set()
        limit = self.max_phrases
        offsets = toks.offsets
        for item in ranked:
            key = tuple(item[1])
            if not key or key in seen:
                continue
            seen.add(key)
            positions = toks.find(key)
            if not positions:
                continue
            k = len(key) - 1
            if k:  # every span must read exactly as the phrase: the first occurrence's spacing
                first = toks.spacing(positions[0], k + 1)
                positions = [p for p in positions if toks.spacing(p, k + 1) == first]
            phrase = item[2] if len(item) > 2 else toks.render(positions[0], k + 1)
            spans = [(offsets[p][0], offsets[p + k][1]) for p in positions]
            out.append(KeyPhrase(phrase, float(item[0]), spans))
            if limit is not None and len(out) >= limit:
                break
        return out
