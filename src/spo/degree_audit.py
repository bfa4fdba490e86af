"""The shortcut audit of degree variants: can a classifier tell a variant's level without
reading the content?

SPO's degree heads are meant to learn how much key content a variant lacks.  If removal leaves
a trace that is not the missing content itself (a single space where the text has two after a
sentence, a comma orphaned by a removed word, a lowercase sentence start), a head can reach a
high degree accuracy by counting the trace, and the accuracy proves nothing.  This module puts
numbers on that: it computes content-free features of every variant, fits simple classifiers
on the variants of half the responses and scores them on the other half.

Two kinds of probe, reported side by side:

- **formatting probes** (whitespace, punctuation, capitalisation, brackets and quotes, and all
  of them together): features that say nothing about which words are present.  A formatting
  probe above chance is a defect of the degree data, and the stage warns or fails on it
  (``degrees.audit``).
- **the length probe** (word and character counts): removing content shortens the text by
  design, so length carries the level to some degree whatever the builder does.  It is
  reported as the floor a head must clear to show that it reads content, never barred.

Every response contributes all N of its levels, so the classes are balanced and chance is
1/N.  Responses, not variants, are split (both sides of a row go to the same half) so that no
probe sees a response in training whose other levels it is scored on.  Intervals come from a
bootstrap over the held-out responses, all levels of one response resampled together: the N
levels of a response are not N independent trials.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_WORD_RE = re.compile(r"\w+")
# a sentence gap: a terminal (optionally closed by a quote or bracket) then horizontal whitespace
# then the next sentence's first character
_SENTENCE_GAP_RE = re.compile(r"[.!?\u2026][\"'\u2019\u201d)\]]*([ \t]+)(?=[\"'\u201c\u2018(\[]*\w)")
_INLINE_SPACE_RE = re.compile(r"(?<=\S)[ \t]+(?=\S)")
_SENTENCE_START_RE = re.compile(r"[.!?\u2026][\"'\u2019\u201d)\]]*\s+[\"'\u201c\u2018(\[]*(\w)")
_LINE_START_RE = re.compile(r"(?m)^[ \t]*[\"'\u201c\u2018(\[*\-\u2022]*[ \t]*(\w)")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"[ \t][,.;:!?)\]}]")
_REPEATED_SEPARATOR_RE = re.compile(r"[,;:][ \t]*[,;:.!?]")
_LINE_STARTS_WITH_PUNCT_RE = re.compile(r"(?m)^[ \t]*[,;:.!?]")
_EMPTY_PAIR_RE = re.compile(r"\(\s*\)|\[\s*\]|\{\s*\}|\"\s*\"|\u201c\s*\u201d")
_ORPHAN_CONNECTOR_RE = re.compile(r"(?:^|[ \t])[-\u2013\u2014/&+][ \t]|[ \t][-\u2013\u2014/][,.;:!?]")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


# a run of punctuation between words, not inside one: "don't", "year-round" and "3.5" are words
_MARK_RE = re.compile(r"(?<!\w)[^\w\s]+|[^\w\s]+(?!\w)")


def _punctuation_counts(text: str) -> list[int]:
    """Commas, ``;:``, terminals and other marks, counted in the punctuation between words
    (a mark inside a word, as in "don't" or "year-round", goes with the word)."""
    counts = [0, 0, 0, 0]
    for mark in _MARK_RE.findall(text):
        for c in mark:
            if c == ",":
                counts[0] += 1
            elif c in ";:":
                counts[1] += 1
            elif c in ".!?\u2026":
                counts[2] += 1
            else:
                counts[3] += 1
    return counts


def whitespace_features(text: str) -> list[float]:
    """Whitespace style: of the gaps after a sentence, the share of one space and of two or
    more; of the gaps between words inside a sentence, the share that is not one space."""
    gaps = [m.group(1) for m in _SENTENCE_GAP_RE.finditer(text)]
    sentence_gap_ends = {m.end() for m in _SENTENCE_GAP_RE.finditer(text)}
    inline = [m for m in _INLINE_SPACE_RE.finditer(text) if m.end() not in sentence_gap_ends]
    return [
        _ratio(sum(g == " " for g in gaps), len(gaps)),
        _ratio(sum(len(g) > 1 for g in gaps), len(gaps)),
        float(bool(gaps)),
        _ratio(sum(m.group() != " " for m in inline), len(inline)),
    ]


def punctuation_features(text: str) -> list[float]:
    """The mix of punctuation (the share of commas, of ``;:``, of terminals and of the rest
    among all punctuation marks), and the debris removal could leave: a space before
    ``,.;:!?``, repeated separators, a line that starts with punctuation, orphaned connectors.

    The mix, not the rate per word: keeping every separator that still separates something
    keeps the mix, while the rate per word rises as words go (see
    :func:`punctuation_per_word_features`, a length probe).
    """
    counts = _punctuation_counts(text)
    total = sum(counts)
    return [
        *(_ratio(c, total) for c in counts),
        float(len(_SPACE_BEFORE_PUNCT_RE.findall(text))),
        float(len(_REPEATED_SEPARATOR_RE.findall(text))),
        float(len(_LINE_STARTS_WITH_PUNCT_RE.findall(text))),
        float(len(_ORPHAN_CONNECTOR_RE.findall(text))),
    ]


def capitalisation_features(text: str) -> list[float]:
    """The share of sentence starts and of line starts that are lowercase, and whether the
    text's first letter is."""
    sentence_starts = [m.group(1) for m in _SENTENCE_START_RE.finditer(text)]
    line_starts = [m.group(1) for m in _LINE_START_RE.finditer(text)]
    first = next((c for c in text if c.isalpha()), "")
    return [
        _ratio(sum(c.islower() for c in sentence_starts), len(sentence_starts)),
        _ratio(sum(c.islower() for c in line_starts), len(line_starts)),
        float(first.islower()),
    ]


def bracket_features(text: str) -> list[float]:
    """Bracket and quote balance, and brackets or quotes around nothing."""
    return [
        float(abs(text.count("(") - text.count(")"))),
        float(abs(text.count("[") - text.count("]"))),
        float(text.count('"') % 2),
        float(abs(text.count("\u201c") - text.count("\u201d"))),
        float(len(_EMPTY_PAIR_RE.findall(text))),
    ]


def length_features(text: str) -> list[float]:
    """Length alone: the log word count."""
    return [math.log1p(len(_WORD_RE.findall(text)))]


def punctuation_per_word_features(text: str) -> list[float]:
    """Commas, ``;:``, terminals and other punctuation per word: how long the text's sentences
    and clauses are.  Removing words from a sentence and keeping its end makes the sentence
    shorter, so this is length measured against the response's own structure."""
    n_words = len(_WORD_RE.findall(text))
    return [_ratio(c, n_words) for c in _punctuation_counts(text)]


def word_length_features(text: str) -> list[float]:
    """Mean characters per word: key phrases are mostly long content words, so what is left
    after removing them is shorter words; a trace of which words are missing, not of their
    content."""
    found = _WORD_RE.findall(text)
    return [_ratio(sum(map(len, found)), len(found))]


Features = Callable[[str], list[float]]
# probes a degree variant must not be told apart by: a defect of the builder when above chance
FORMATTING_PROBES: dict[str, tuple[Features, ...]] = {
    "whitespace": (whitespace_features,),
    "punctuation": (punctuation_features,),
    "capitalisation": (capitalisation_features,),
    "brackets_quotes": (bracket_features,),
    "formatting": (whitespace_features, punctuation_features, capitalisation_features, bracket_features),
}
# what removing content changes by design: reported beside the heads' accuracy, never barred
LENGTH_PROBES: dict[str, tuple[Features, ...]] = {
    "length": (length_features,),
    "punctuation_per_word": (punctuation_per_word_features,),
    "word_length": (word_length_features,),
    "length_all": (length_features, punctuation_per_word_features, word_length_features),
}
PROBES: dict[str, tuple[Features, ...]] = {**FORMATTING_PROBES, **LENGTH_PROBES}


@dataclass(frozen=True)
class ProbeResult:
    """Held-out accuracy of one probe, overall and per level, with its response-bootstrap interval."""

    accuracy: float
    interval: tuple[float | None, float | None]
    per_level: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "ci_low": self.interval[0], "ci_high": self.interval[1],
                "per_level": self.per_level}


@dataclass(frozen=True)
class AuditResult:
    """Every probe's result, chance, and how many responses trained and scored them."""

    n_levels: int
    train_responses: int
    test_responses: int
    probes: dict[str, ProbeResult] = field(default_factory=dict)

    @property
    def chance(self) -> float:
        return 1.0 / self.n_levels

    def shortcuts(self, margin: float) -> dict[str, float]:
        """The formatting probes more than ``margin`` above chance, with their accuracy."""
        return {name: r.accuracy for name, r in self.probes.items()
                if name in FORMATTING_PROBES and r.accuracy > self.chance + margin}

    def to_json(self) -> dict[str, Any]:
        formatting = [self.probes[n].accuracy for n in FORMATTING_PROBES if n in self.probes]
        return {
            "n_levels": self.n_levels,
            "chance": self.chance,
            "train_responses": self.train_responses,
            "test_responses": self.test_responses,
            "formatting_max": max(formatting) if formatting else None,
            "probes": {name: r.to_json() for name, r in self.probes.items()},
        }


def in_test_half(key: str, seed: int) -> bool:
    """Whether the response keyed ``key`` (a row id) is scored rather than trained on: a hash,
    so the split does not depend on row order or on which other rows are present."""
    digest = hashlib.sha256(f"spo-degree-audit\0{seed}\0{key}".encode()).digest()
    return digest[0] & 1 == 1


def audit(responses: Sequence[tuple[str, Sequence[str]]], *, seed: int = 0, bootstrap: int = 1000) -> AuditResult:
    """Fit every probe on the levels of one half of ``responses`` and score it on the other.

    ``responses`` are ``(key, levels)`` pairs, ``levels[k]`` the variant of label k; only
    responses whose N levels are distinct belong here (the degree loss uses no other).  The
    key decides the half (:func:`in_test_half`): give both sides of a row the row's id.  A
    standardised multinomial logistic regression per probe: a gradient-boosted tree on the same
    features did no better on the HH and TL;DR samples (docs/degrees.md).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from spo.judging.statistics import bootstrap_ci

    if not responses:
        raise ValueError("the shortcut audit needs at least one response with distinct levels")
    n_levels = len(responses[0][1])
    if any(len(levels) != n_levels for _, levels in responses):
        raise ValueError("every response must have the same number of levels")
    test_half = np.array([in_test_half(key, seed) for key, _ in responses])
    result = AuditResult(n_levels=n_levels, train_responses=int((~test_half).sum()),
                         test_responses=int(test_half.sum()))
    if not result.train_responses or not result.test_responses:
        return result
    texts = [level for _, levels in responses for level in levels]
    families = {f for fs in PROBES.values() for f in fs}
    # one row per variant, response-major: variant k of response i is row i * N + k
    columns = {f: np.array([f(t) for t in texts], dtype=np.float64).reshape(len(responses), n_levels, -1)
               for f in families}
    labels = np.arange(n_levels)
    for name, probe_families in PROBES.items():
        x = np.concatenate([columns[f] for f in probe_families], axis=2)
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        model.fit(x[~test_half].reshape(-1, x.shape[2]), np.tile(labels, result.train_responses))
        predicted = model.predict(x[test_half].reshape(-1, x.shape[2])).reshape(-1, n_levels)
        correct = predicted == labels
        result.probes[name] = ProbeResult(
            accuracy=float(correct.mean()),
            # the mean of per-response means is the accuracy (every response has N levels), so
            # resampling those means resamples responses with all their levels
            interval=bootstrap_ci(correct.mean(axis=1), bootstrap, seed) if bootstrap else (None, None),
            per_level=[float(v) for v in correct.mean(axis=0)],
        )
    return result
