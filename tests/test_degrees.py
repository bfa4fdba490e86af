"""Degree variants (spo.degrees) and the ``degrees`` stage."""

from __future__ import annotations

import json
import math
import re
import statistics

import pytest
from conftest import tmp_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spo.degrees import (
    TOKEN_RE,
    build_degree_variants,
    build_levels,
    normalise,
    phrases_at_level,
    render,
    render_with_origins,
    words,
)
from spo.errors import InputError

BUTTERFLIES = (
    " About 150 species of butterflies live in Oregon, with about 100 species are moths, and about 20 "
    "species are common here year-round, and another 10 species are seen here year-round. I suggest you "
    "keep an eye out for skippers, gossamer wings, and red admirals."
)
# rake-nltk 1.0.6, 174 English stop words, regex sentence/word tokenizers: 19 ranked phrases,
# 17 once "year" and "round" repeats are dropped (see test_worked_example_rake_derivation)
BUTTERFLY_PHRASES = [
    "another 10 species", "20 species", "150 species", "100 species", "red admirals", "gossamer wings",
    "butterflies live", "year", "suggest", "skippers", "seen", "round", "oregon", "moths", "keep", "eye",
    "common",
]
# the spec's levels 1..3, with the debris it shows uncleaned
SPEC_LEVELS = [
    "About of butterflies live in Oregon, with about are moths, and about are common here year-round, and "
    "are seen here year-round. I suggest you keep an eye out for skippers, , and .",
    "About of in Oregon, with about are moths, and about are common here -, and are here -. I you keep an "
    "eye out for , , and .",
    "About of in , with about are , and about are here -, and are here -. I you an out for , , and .",
]


def tokens(text: str) -> list[str]:
    return [t.casefold() for t in TOKEN_RE.findall(text)]


def same_word(level_word: str, text_word: str) -> bool:
    """Equal, or equal but for a first letter raised to upper case (a word that removal made a
    sentence start)."""
    return level_word == text_word or level_word == text_word[0].upper() + text_word[1:]


def is_subsequence(small: list[str], big: list[str]) -> bool:
    """Up to a raised first letter (:func:`same_word`), on either side."""
    it = iter(big)
    return all(any(same_word(x, y) or same_word(y, x) for y in it) for x in small)


def contains(seq: list[str], sub: list[str]) -> bool:
    k = len(sub)
    return any(seq[i : i + k] == sub for i in range(len(seq) - k + 1))


def kept_origins(text: str, spans) -> list[int]:
    """The origins of the non-space characters of a rendering, checked to be their own (a letter
    that removal made a sentence start may be raised to upper case)."""
    level, origins = render_with_origins(text, spans)
    assert len(origins) == len(level) and level == render(text, spans)
    solid = [(c, o) for c, o in zip(level, origins) if not c.isspace()]
    assert all(0 <= o < len(text) and c in (text[o], text[o].upper()) for c, o in solid), (text, spans, level, origins)
    assert all(a < b for (_, a), (_, b) in zip(solid, solid[1:])), (text, spans, level, origins)
    assert all(o == -1 or 0 <= o < len(text) for o in origins)
    return [o for _, o in solid]


def assert_nested(text: str, removed_spans) -> None:
    """The non-space characters of each level are a subset of the previous level's."""
    previous = None
    for spans in removed_spans:
        kept = set(kept_origins(text, spans))
        if previous is not None:
            assert kept <= previous, (text, spans, sorted(kept - previous))
        previous = kept


# --- worked example -------------------------------------------------------------------------


def test_worked_example_rake_derivation() -> None:
    stopwords = pytest.importorskip("stopwords")
    rake_nltk = pytest.importorskip("rake_nltk")
    rake = rake_nltk.Rake(
        stopwords=set(stopwords.get_stopwords("english")) - {""},
        sentence_tokenizer=lambda t: [s for s in re.split(r"(?<=[.!?])\s+", t) if s],
        word_tokenizer=lambda s: re.findall(r"\w+|[^\w\s]+", s),
    )
    rake.extract_keywords_from_text(BUTTERFLIES.strip())
    ranked = rake.get_ranked_phrases()
    assert len(ranked) == 19
    assert ranked[:10] == [
        "another 10 species", "20 species", "150 species", "100 species", "red admirals", "gossamer wings",
        "butterflies live", "year", "year", "suggest",
    ]
    seen: set[str] = set()
    distinct = [p for p in ranked if not (p.lower() in seen or seen.add(p.lower()))]
    assert distinct == BUTTERFLY_PHRASES


def test_worked_example_levels() -> None:
    dv = build_degree_variants(BUTTERFLIES, BUTTERFLY_PHRASES, 4)
    assert dv.levels[0] is BUTTERFLIES or dv.levels[0] == BUTTERFLIES
    assert dv.phrases_removed == [0, 6, 12, 17]
    assert dv.labels == [0, 1, 2, 3]
    assert dv.n_phrases == 17
    assert dv.distinct
    for k in (1, 2, 3):
        assert words(dv.levels[k]) == words(SPEC_LEVELS[k - 1])
    assert dv.levels[1] == (
        " About of butterflies live in Oregon, with about are moths, and about are common here year-round, "
        "and are seen here year-round. I suggest you keep an eye out for skippers, and."
    )
    # a separator that still separates something stays (it is not part of the removed words); one
    # that removal orphans goes: "for skippers, gossamer wings, and" minus the items is "for, and"
    assert dv.levels[2] == (
        " About of in Oregon, with about are moths, and about are common here, and are here. "
        "I you keep an eye out for, and."
    )
    assert dv.levels[3] == " About of in, with about are, and about are here, and are here. I you an out for, and."
    assert all(", ," not in level and " ," not in level for level in dv.levels)
    # level 1 removes the six top phrases' occurrences, nothing else
    removed = "".join(BUTTERFLIES[s:e] + "|" for s, e in dv.removed_spans[1])
    assert removed == "150 species|100 species|20 species|another 10 species|gossamer wings|red admirals|"
    assert dv.removed_fraction[0] == 0.0
    assert dv.removed_fraction[1] == pytest.approx(sum(e - s for s, e in dv.removed_spans[1]) / len(BUTTERFLIES))
    assert dv.removed_fraction == sorted(dv.removed_fraction)


# --- unit cases -----------------------------------------------------------------------------


def test_n_levels_below_two_is_an_error() -> None:
    for n in (-1, 0, 1):
        with pytest.raises(ValueError):
            build_levels("text", ["text"], n)


def test_phrases_at_level_is_integer_ceil() -> None:
    assert [phrases_at_level(k, 17, 4) for k in range(4)] == [0, 6, 12, 17]
    assert [phrases_at_level(k, 1, 4) for k in range(4)] == [0, 1, 1, 1]
    assert [phrases_at_level(k, 0, 3) for k in range(3)] == [0, 0, 0]
    # no float error: 3 * 10 / 30 is exactly 1
    assert phrases_at_level(3, 10, 31) == 1


def test_matching_is_case_insensitive_on_word_boundaries_across_whitespace() -> None:
    # a line break inside an occurrence is not removed (see test_cleaning_keeps_levels_nested)
    assert build_levels("Look: Red\nadmirals fly.", ["red admirals"], 2)[1] == "Look:\nfly."
    dv = build_degree_variants("Look: Red\n admirals fly.", ["red admirals"], 2)
    assert dv.removed_spans[1] == [(6, 9), (11, 19)]
    assert build_levels("The party was art.", ["art"], 2)[1] == "The party was."
    assert build_levels("ART and Art and art", ["art"], 2)[1] == "And and"


def test_debris_cleaning() -> None:
    assert build_levels("skippers, gossamer wings, and red admirals.", ["gossamer wings", "red admirals"], 2)[1] == (
        "skippers, and."
    )
    # a text (or sentence) whose first word goes starts with the next one, capitalised as it was
    assert build_levels("Red, blue, green.", ["red"], 2)[1] == "Blue, green."
    assert build_levels("one two three", ["two"], 2)[1] == "one three"
    assert build_levels("here year-round, and", ["year", "round"], 2)[1] == "here, and"
    assert build_levels("a (red admirals) b", ["red admirals"], 2)[1] == "a b"
    assert build_levels("a (red admirals). b", ["red admirals"], 2)[1] == "a. b"
    assert build_levels("A. B. C.", ["b"], 2)[1] == "A. C."
    assert build_levels("List:\n- red\n- blue\n\nEnd", ["red"], 2)[1] == "List:\n- blue\n\nEnd"
    assert build_levels("List:\n- red\n- blue\n\nEnd", ["red", "blue"], 2)[1] == "List:\n\nEnd"
    # separators stay while they separate something; those removal orphans go (", ," -> ",",
    # ", ." -> ".", no leading ","), the last of a run kept; terminals stay
    assert build_levels("out for skippers, gossamer wings, and red admirals.",
                        ["skippers", "gossamer wings", "red admirals"], 2)[1] == "out for, and."
    assert build_levels("in Oregon, with moths", ["oregon"], 2)[1] == "in, with moths"
    assert build_levels("A, B, C.", ["b"], 2)[1] == "A, C."
    assert build_levels("A, B; C: D.", ["b", "c"], 2)[1] == "A: D."
    assert build_levels("A, B. C", ["b"], 2)[1] == "A. C"
    assert build_levels("Buy A , , red B", ["red"], 2)[1] == "Buy A, B"
    # text away from removal points stays as it was, double spaces included
    assert build_levels("Keep  this , odd text. Drop me.", ["drop"], 2)[1] == "Keep  this , odd text. Me."


def test_leading_space_is_kept_and_ends_are_stripped() -> None:
    assert build_levels(" About 150 species.", ["about"], 2)[1] == " 150 species."
    assert build_levels(" About 150 species.", ["species"], 2)[1] == " About 150."
    assert build_levels("About 150 species.\n", ["species"], 2)[1] == "About 150."
    assert build_levels(" all", ["all"], 2)[1] == ""


def test_level_removing_nothing_is_the_normalised_text() -> None:
    text = "  Odd   spacing ,here .\n\n\n\nand more  "
    assert normalise(text) == " Odd   spacing ,here .\n\n\n\nand more"
    dv = build_degree_variants(text, ["absent phrase"], 3)
    assert dv.levels == [normalise(text)] * 3
    assert not dv.distinct
    assert dv.removed_spans == [[], [], []]
    dv = build_degree_variants(text, [], 4)
    assert dv.levels == [normalise(text)] * 4 and dv.phrases_removed == [0, 0, 0, 0]


def test_every_level_has_the_same_end_normalisation() -> None:
    assert normalise(" About 150 species.\n\n") == " About 150 species."
    assert normalise("\n  About.\t") == "About."
    assert normalise("   ") == "" and normalise("") == ""
    # level 0 goes through the same normalisation: trailing whitespace tells no level apart
    dv = build_degree_variants(" Red admirals fly.  \n", ["red admirals"], 2)
    assert dv.levels == [" Red admirals fly.", " Fly."]
    assert dv.removed_spans[1] == [(1, 13)]  # coordinates of the original text
    for level in dv.levels:
        assert level == normalise(level) and level == level.rstrip()
    assert render_with_origins(" Red fly.  \n", []) == (" Red fly.", list(range(9)))
    assert render_with_origins("\n Red", []) == ("Red", [2, 3, 4])


def test_too_few_phrases_are_not_distinct() -> None:
    dv = build_degree_variants("red admirals and skippers", ["skippers"], 4)
    assert dv.phrases_removed == [0, 1, 1, 1]
    assert dv.levels == ["red admirals and skippers", "red admirals and", "red admirals and", "red admirals and"]
    assert not dv.distinct


def test_render_with_origins_worked_example() -> None:
    dv = build_degree_variants(BUTTERFLIES, BUTTERFLY_PHRASES, 4)
    for k in (1, 2, 3):
        level, origins = render_with_origins(BUTTERFLIES, dv.removed_spans[k])
        assert level == dv.levels[k] == render(BUTTERFLIES, dv.removed_spans[k])
        kept_origins(BUTTERFLIES, dv.removed_spans[k])
        # the final "." after the removed "red admirals" is the original one, not a copy
        assert level.endswith("and.") and origins[-1] == len(BUTTERFLIES) - 1
        last_and = BUTTERFLIES.rindex("and")
        assert origins[-4:-1] == [last_and, last_and + 1, last_and + 2]
    assert_nested(BUTTERFLIES, dv.removed_spans)
    # a kept comma carries its own index: of ", ," (level 1's "skippers, [gossamer wings], and")
    # the last is kept, the one after "wings"
    level, origins = render_with_origins(BUTTERFLIES, dv.removed_spans[1])
    comma = level.rindex(", and.")
    assert origins[comma] == BUTTERFLIES.index("wings,") + len("wings")
    # and the space after it is the text's own, not a synthesised one
    assert level[comma + 1] == " " and origins[comma + 1] == origins[comma] + 1


def test_render_with_origins_on_a_prefix() -> None:
    dv = build_degree_variants(BUTTERFLIES, BUTTERFLY_PHRASES, 4)
    for cut in (len(BUTTERFLIES), BUTTERFLIES.index(" gossamer"), BUTTERFLIES.index("red admirals") + 5, 20, 1, 0):
        for spans in dv.removed_spans:
            clipped = [(s, min(e, cut)) for s, e in spans if s < cut]
            level, origins = render_with_origins(BUTTERFLIES[:cut], clipped)
            assert level == normalise(level) and len(origins) == len(level)
            kept_origins(BUTTERFLIES[:cut], clipped)
    # a span that ends the text
    assert render_with_origins("Keep it, red admirals", [(9, 21)]) == ("Keep it", [0, 1, 2, 3, 4, 5, 6])


# cases where an earlier version of the cleaning kept at level k+1 a character level k had
# dropped (found by the property test and the HH-sample check)
NESTING_CASES = [
    ("x -y z", ["y", "x"]),
    ("like \u201cE.T.: the Extra-Terrestrial\u201d, or", ["t", "extra", "terrestrial", "e"]),
    ("here: https://www.amazon.com/gp/product?ie=UTF8&psc=1",
     ["https", "www", "amazon", "com", "gp", "product", "ie", "utf8", "psc", "1"]),
    ("Z A , , red B", ["red", "a"]),
    ("admirals; red. red admirals", ["red", "red ."]),
    ("a.,x. b", ["x", "., x"]),
    ("red red (red) red ", ["red", "red red ("]),
    ('say "yes)E"E" now', ["e", "yes ) e"]),
    ("red, red, red red redredred\nred red", ["red red redredred", "red redredred red"]),
]


@pytest.mark.parametrize(("text", "phrases"), NESTING_CASES)
def test_cleaning_keeps_levels_nested(text, phrases) -> None:
    for n in (2, 3, 4):
        assert_nested(text, build_degree_variants(text, phrases, n).removed_spans)


def test_cleaning_rules_that_keep_levels_nested() -> None:
    # a bullet is only a bullet at a line start of the text, not one that removal made
    assert build_levels("x -y z", ["y", "x"], 3) == ["x -y z", "x z", "z"]
    assert build_levels("List:\n-red\n-blue", ["red"], 2)[1] == "List:\n-blue"
    # groups are split at removal points, so one glued across a removed word keeps its kind
    levels = build_levels("like \u201cE.T.: the Extra-Terrestrial\u201d, or", ["t", "extra", "terrestrial", "e"], 3)
    assert levels[1:] == ["like \u201cE. the Terrestrial\u201d, or", "like \u201c. the \u201d, or"]
    # removed punctuation still counts when the kept punctuation around it collapses: the ";"
    # that "; ." -> "." dropped at level 1 stays dropped when level 2 removes the "." as well
    assert build_levels("admirals; red. red admirals", ["red", "red ."], 3) == [
        "admirals; red. red admirals", "admirals. admirals", "admirals admirals"
    ]
    assert build_levels("a.,x. b", ["x", "., x"], 3) == ["a.,x. b", "a. b", "a b"]
    # a bracket goes with its partner: level 1 drops "()", level 2 also removes the "("
    assert build_levels("a (red admirals) b", ["red admirals", "( red"], 3) == ["a (red admirals) b", "a b", "a b"]
    # quotes glued around removal points pair up whatever the order: level 1 drops '"E"', so
    # level 2 (which also removes 'yes)') may not keep one of them
    assert build_levels('say "yes)E"E" now', ["e", "yes ) e"], 3) == ['say "yes)E"E" now', 'say "yes) now', "say now"]
    # a line break is never removed, so a line-end comma dropped at level 1 stays dropped
    text = "red, red, red red redredred\nred red"
    levels = build_levels(text, ["red red redredred", "red redredred red"], 3)
    assert levels[1:] == ["red, red\nred red", "red, red\nred"]


def test_occurrences_made_by_removal_are_removed_too() -> None:
    assert build_levels("a c b", ["c", "a b"], 2) == ["a c b", ""]
    # and levels stay nested when a later level removes more
    levels = build_levels("x a c b y", ["c", "a b", "b"], 4)
    for k in range(3):
        assert is_subsequence(words(levels[k + 1]), words(levels[k]))


# --- properties -----------------------------------------------------------------------------

WORDS = ["red", "Red", "admirals", "art", "party", "a", "b", "year", "round", "café", "Straße", "日本", "x_y", "10"]
SEPS = [" ", "  ", ", ", ". ", "-", "\n", "\n\n\n", " (", ") ", "; ", "! ", "\t", "' ", " — ", "…"]


@st.composite
def text_and_phrases(draw):
    n = draw(st.integers(0, 25))
    parts = []
    for _ in range(n):
        parts.append(draw(st.sampled_from(WORDS)
                          | st.text(st.characters(categories=("L", "N")), min_size=1, max_size=4)))
        parts.append(draw(st.sampled_from(SEPS) | st.text(st.characters(categories=("P", "S", "Z")), max_size=3)))
    text = draw(st.sampled_from(["", " "])) + "".join(parts)
    toks = TOKEN_RE.findall(text)
    from_text = st.nothing()
    if toks:
        from_text = st.integers(0, len(toks) - 1).flatmap(
            lambda i: st.integers(1, 3).map(lambda k: " ".join(toks[i : i + k]))
        )
    phrase = from_text | st.sampled_from(WORDS + ["absent", "red admirals", "year-round", "", "  "])
    phrases = draw(st.lists(phrase, max_size=12))
    if phrases and draw(st.booleans()):
        phrases = phrases + [phrases[0].upper()]  # a duplicate
    return text, phrases


@settings(max_examples=int(__import__("os").environ.get("DEGREES_EXAMPLES", "400")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(text_and_phrases(), st.integers(2, 8), st.floats(0, 1))
def test_level_properties(data, n_levels, cut_at) -> None:
    text, phrases = data
    dv = build_degree_variants(text, phrases, n_levels)
    levels = dv.levels
    assert len(levels) == n_levels == len(dv.labels) == len(dv.removed_spans) == len(dv.removed_fraction)
    assert levels[0] == normalise(text)
    assert dv.labels == list(range(n_levels))
    assert dv.distinct == (len(set(levels)) == n_levels)
    for k in range(n_levels):
        m = math.ceil(k * len(phrases) / (n_levels - 1)) if len(phrases) < 10**6 else None
        assert dv.phrases_removed[k] == m == phrases_at_level(k, len(phrases), n_levels)
        assert 0.0 <= dv.removed_fraction[k] <= 1.0
        spans = dv.removed_spans[k]
        assert all(s < e for s, e in spans) and all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
        if not spans:
            assert levels[k] == normalise(text)
        # the same rendering and ends for every level; every non-space character is its own
        assert render_with_origins(text, spans)[0] == levels[k]
        assert levels[k] == normalise(levels[k]) and levels[k] == levels[k].rstrip()
        kept_origins(text, spans)
        cut = round(cut_at * len(text))  # a level rebuilt from a prefix, as the trainer does
        kept_origins(text[:cut], [(s, min(e, cut)) for s, e in spans if s < cut])
        if k + 1 < n_levels:
            assert is_subsequence(words(levels[k + 1]), words(levels[k]))
            assert set(dv.removed_spans[k]) <= set(dv.removed_spans[k + 1]) or all(
                any(s2 <= s and e <= e2 for s2, e2 in dv.removed_spans[k + 1]) for s, e in spans
            )
            assert dv.removed_fraction[k] <= dv.removed_fraction[k + 1]
        # the words of a level are the words of the text outside the removed spans
        kept = [m.group() for m in re.finditer(r"\w+", text) if not any(s <= m.start() < e for s, e in spans)]
        assert len(words(levels[k])) == len(kept) and all(map(same_word, words(levels[k]), kept))
        level_tokens = tokens(levels[k])
        for phrase in phrases[: dv.phrases_removed[k]]:
            seq = tokens(phrase)
            if seq and all(re.fullmatch(r"\w+", t) for t in seq):
                assert not contains(level_tokens, seq), (phrase, levels[k])
        if k >= 1 and spans:
            assert levels[k] == levels[k].strip() or (text.startswith(" ") and levels[k][1:] == levels[k].strip())
    assert_nested(text, dv.removed_spans)


# --- the stage ------------------------------------------------------------------------------


def _write(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _kw(phrases):
    return [{"phrase": p, "score": 1.0, "spans": []} for p in phrases]


def _stage_inputs(tmp_path):
    rows = {
        "train": [
            {"id": "r1", "prompt": "\n\nHuman: butterflies?\n\nAssistant:", "chosen": BUTTERFLIES,
             "rejected": " I don't know."},
            {"id": "r2", "prompt": "p", "chosen": "Red admirals, skippers and moths.", "rejected": "No idea."},
        ],
        "test": [{"id": "t1", "prompt": "p", "chosen": "One two three four.", "rejected": "Five six."}],
    }
    keywords = {
        "train": [
            {"id": "r1", "method": "rake", "chosen": _kw(BUTTERFLY_PHRASES), "rejected": _kw(["know"])},
            {"id": "r2", "method": "rake", "chosen": _kw(["red admirals", "skippers", "moths", "Moths"]),
             "rejected": _kw([])},
        ],
        "test": [{"id": "t1", "method": "rake", "chosen": _kw(["one", "two", "three"]), "rejected": _kw(["six"])}],
    }
    for split in rows:
        _write(tmp_path / "data" / "validated" / f"{split}.jsonl", rows[split])
        _write(tmp_path / "data" / "keywords" / f"{split}.jsonl", keywords[split])
    return rows, keywords


def test_stage_writes_variants_metrics_and_plot(tmp_path) -> None:
    from spo.stages import degrees as stage

    rows, _ = _stage_inputs(tmp_path)
    cfg = tmp_config(tmp_path, None)
    summary = stage.run(cfg)

    out = {s: [json.loads(line) for line in (tmp_path / "data" / "degrees" / f"{s}.jsonl").open()] for s in rows}
    assert not (tmp_path / "data" / "degrees" / "eval.jsonl").exists()
    assert [r["id"] for r in out["train"]] == ["r1", "r2"]
    r1 = out["train"][0]
    assert r1["n_levels"] == 4
    assert r1["chosen"]["levels"] == build_levels(BUTTERFLIES, BUTTERFLY_PHRASES, 4)
    assert set(r1["chosen"]) == {
        "levels", "labels", "removed_spans", "phrases_removed", "n_phrases", "distinct", "removed_fraction"
    }
    assert r1["rejected"]["phrases_removed"] == [0, 1, 1, 1] and not r1["rejected"]["distinct"]
    # the duplicate "Moths" is dropped before levels are built
    assert out["train"][1]["chosen"]["n_phrases"] == 3
    assert out["train"][1]["chosen"]["levels"][1:] == ["Skippers and moths.", "And moths.", "And."]

    metrics = json.loads((tmp_path / "metrics" / "degrees.json").read_text())
    responses = [r[side] for split in out.values() for r in split for side in ("chosen", "rejected")]
    assert metrics["rows"] == 3 and metrics["responses"] == 6 == len(responses)
    assert metrics["splits"] == {"train": 2, "test": 1}
    nd = metrics["responses_not_distinct"]
    for side in ("chosen", "rejected"):
        side_resp = [r[side] for split in out.values() for r in split]
        assert nd[side]["count"] == sum(not r["distinct"] for r in side_resp)
        assert nd[side]["fraction"] == pytest.approx(nd[side]["count"] / 3)
    assert nd["total"]["count"] == nd["chosen"]["count"] + nd["rejected"]["count"] == 3
    for k in range(4):
        level = metrics[f"level_{k}"]
        fractions = [r["removed_fraction"][k] for r in responses]
        assert level["removed_fraction_mean"] == pytest.approx(sum(fractions) / 6)
        assert level["removed_fraction_median"] == pytest.approx(statistics.median(fractions))
        assert level["phrases_removed_mean"] == pytest.approx(sum(r["phrases_removed"][k] for r in responses) / 6)
    assert metrics["level_0"]["removed_fraction_mean"] == 0.0
    assert summary["rows"] == 3
    assert (tmp_path / "metrics" / "degrees_removed_fraction.png").read_bytes()[:4] == b"\x89PNG"
    prov = json.loads((tmp_path / "data" / "degrees" / "provenance.json").read_text())
    assert prov["stage"] == "degrees" and set(prov["inputs"]) == {"rows", "keywords"}
    assert set(prov["inputs"]["keywords"]) == {"train.jsonl", "test.jsonl"}


def test_stage_refuses_keywords_that_do_not_match_rows(tmp_path) -> None:
    from spo.stages import degrees as stage

    _, keywords = _stage_inputs(tmp_path)
    cfg = tmp_config(tmp_path, None)
    kw_file = tmp_path / "data" / "keywords" / "train.jsonl"
    _write(kw_file, [keywords["train"][1], keywords["train"][0]])
    with pytest.raises(InputError) as err:
        stage.run(cfg)
    message = str(err.value)
    assert "keywords/train.jsonl:1" in message and "validated/train.jsonl:1" in message
    assert "'r2'" in message and "'r1'" in message
    assert not (tmp_path / "data" / "degrees" / "train.jsonl").exists()

    _write(kw_file, keywords["train"][:1])
    with pytest.raises(InputError, match=r"at line 2 keywords id '<missing>', row id 'r2'"):
        stage.run(cfg)

    kw_file.unlink()
    with pytest.raises(InputError, match="missing keywords file"):
        stage.run(cfg)
