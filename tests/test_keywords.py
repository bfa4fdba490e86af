"""Key-phrase extractors: the worked example, spans on real rows, options and the control."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
from pathlib import Path

import pytest

from spo.keywords import METHODS, KeyPhrase, extract, get_extractor, load_stopwords

WORKED = (
    "About 150 species of butterflies live in Oregon, with about 100 species are moths, and about "
    "20 species are common here year-round, and another 10 species are seen here year-round.  I "
    "suggest you keep an eye out for skippers, gossamer wings, and red admirals."
)
ALL_METHODS = sorted(METHODS)


def shared_data() -> Path:
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir() and os.environ.get("SPO_SHARED_DATA"):
        path = Path(os.environ["SPO_SHARED_DATA"])
    return path


def _read(name: str, n: int) -> list[dict]:
    path = shared_data() / name / "train.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} not available (set SPO_SHARED_DATA)")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in itertools.islice(handle, n)]


@pytest.fixture(scope="module")
def real_texts() -> list[str]:
    texts = []
    for row in _read("hh", 40):
        for key in ("chosen", "rejected"):
            texts.append(row[key].rsplit("\n\nAssistant:", 1)[-1])
    for row in _read("tldr", 20):
        texts.extend([row["chosen"], row["rejected"]])
    return texts


def test_worked_example_rake() -> None:
    phrases = extract(WORKED, "rake")
    names = [kp.phrase for kp in phrases]
    assert names[:8] == [
        "another 10 species", "20 species", "150 species", "100 species",
        "red admirals", "gossamer wings", "butterflies live", "year",
    ]
    assert len(names) == 17 == len(set(names))
    assert phrases[0].score == pytest.approx(8.25)
    year = phrases[7]
    assert [WORKED[s:e] for s, e in year.spans] == ["year", "year"]
    assert set(names) >= {"round", "suggest", "skippers", "oregon", "moths"}


def test_worked_example_matches_bare_rake_nltk() -> None:
    """Same phrases, scores and order as rake-nltk itself, after de-duplication."""
    from spo.config import RakeOptions
    from spo.keywords.rake import make_rake

    bare = make_rake(load_stopwords("english"), RakeOptions())
    bare.extract_keywords_from_text(WORKED)
    ranked = bare.get_ranked_phrases_with_scores()
    assert len(ranked) == 19
    deduped, seen = [], set()
    for score, phrase in ranked:
        if phrase not in seen:
            seen.add(phrase)
            deduped.append((phrase, score))
    assert [(kp.phrase, kp.score) for kp in extract(WORKED)] == deduped


def test_default_stopwords() -> None:
    words = load_stopwords("english")
    assert "" not in words and "the" in words and "don't" in words and "don\u2019t" in words
    assert len({w.replace("\u2019", "'") for w in words}) == 174
    with pytest.raises(ValueError):
        load_stopwords([])
    with pytest.raises(ValueError):
        load_stopwords("klingon")


def test_stopwords_file_and_iterable(tmp_path: Path) -> None:
    path = tmp_path / "stop.txt"
    path.write_text("red\nand\n", encoding="utf-8")
    names = [kp.phrase for kp in extract("Red apples and green pears", stopwords=str(path))]
    assert names == ["green pears", "apples"]
    names = [kp.phrase for kp in extract("Red apples and green pears", stopwords={"Green", "and"})]
    assert names == ["red apples", "pears"]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_spans_point_at_phrase_on_real_rows(method: str, real_texts: list[str]) -> None:
    extractor = get_extractor(method, seed=3)
    total = 0
    for text in real_texts:
        phrases = extractor.extract(text)
        names = [kp.phrase for kp in phrases]
        assert len(names) == len(set(names)), "phrases must be de-duplicated"
        scores = [kp.score for kp in phrases]
        assert scores == sorted(scores, reverse=True), "ranked best first"
        for kp in phrases:
            assert isinstance(kp, KeyPhrase) and kp.spans
            assert kp.spans == sorted(kp.spans)
            for start, end in kp.spans:
                assert text[start:end].lower() == kp.phrase
                assert "\n" not in text[start:end]
                assert start == 0 or not text[start - 1].isalnum()
                assert end == len(text) or not text[end].isalnum()
            # every case-insensitive word-boundary occurrence is covered
            words = [re.escape(w) for w in kp.phrase.split(" ")]
            pattern = r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)"
            if kp.phrase[0].isalnum() and kp.phrase[-1].isalnum() and "'" not in kp.phrase:
                found = [m.span() for m in re.finditer(pattern, text, flags=re.IGNORECASE)]
                assert set(kp.spans) <= set(found)
                assert len(kp.spans) >= 1
        total += len(phrases)
    assert total > len(real_texts)


def test_dedupe_keeps_best_rank() -> None:
    text = "Big cats, sleep. Big cats; eat. Fish swim."
    phrases = extract(text)
    names = [kp.phrase for kp in phrases]
    assert names.count("big cats") == 1
    big = phrases[names.index("big cats")]
    assert [text[s:e] for s, e in big.spans] == ["Big cats", "Big cats"]


def test_case_insensitive_occurrences() -> None:
    text = "Gossamer Wings are pretty. I see gossamer\nwings. GOSSAMER wings fly."
    phrases = extract(text, "rake")
    by_name = {kp.phrase: kp for kp in phrases}
    # every case is an occurrence; the one split by a line break is not (the issue-14 rule below)
    assert [text[s:e] for s, e in by_name["gossamer wings"].spans] == ["Gossamer Wings", "GOSSAMER wings"]
    assert "see gossamer" in by_name and "wings" in by_name


# a paragraph break, a line break and a sentence end between words that an extractor may rank as one phrase
BOUNDARIES = (
    "Roast the garlic\n\nFor best results, peel it first. Roast the garlic slowly.",
    "Add the garlic. For best results use fresh garlic.\nFor best flavour, roast garlic for best results.",
    "Plant the seeds in spring\nwater them daily. Water them daily\n\nand plant seeds in spring.",
)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("text", BOUNDARIES)
def test_no_phrase_spans_a_sentence_or_paragraph_break(method: str, text: str) -> None:
    """No span may join two sentences or paragraphs, and every span reads exactly as its phrase:
    YAKE once returned 'garlic for best' with the span of 'garlic\\n\\nFor best'."""
    phrases = extract(text, method, seed=5)
    assert phrases
    for kp in phrases:
        assert kp.spans, kp
        for start, end in kp.spans:
            piece = text[start:end]
            assert "\n" not in piece, (kp.phrase, piece)
            assert not re.search(r"[.!?]\s", piece), (kp.phrase, piece)
            assert piece.lower() == kp.phrase, (kp.phrase, piece)


def test_yake_garlic_across_paragraphs() -> None:
    """The case the issue found: yake ranks 'garlic for best'; its only occurrence crosses a
    paragraph break, so the phrase is dropped instead of given that span."""
    text = (
        "Peel and crush the garlic\n\nFor best results, let it rest for ten minutes. Garlic needs time, "
        "and crushed garlic for best flavour is worth it."
    )
    for kp in extract(text, "yake"):
        for start, end in kp.spans:
            assert "\n" not in text[start:end] and text[start:end].lower() == kp.phrase


@pytest.mark.parametrize("method", ALL_METHODS)
def test_max_phrases(method: str) -> None:
    assert len(extract(WORKED, method, max_phrases=3, seed=1)) == 3
    assert len(extract(WORKED, method, max_phrases=1)) == 1


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("text", ["", "   \n ", "the of and", "...!"])
def test_empty_text(method: str, text: str) -> None:
    assert extract(text, method) == []


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="rake.*yake.*positionrank.*random"):
        extract("text", "textrank")


def test_unknown_option() -> None:
    with pytest.raises(ValueError):
        get_extractor("rake", window=3)


def test_rake_length_options() -> None:
    names = [kp.phrase for kp in extract(WORKED, min_length=2)]
    assert names[0] == "another 10 species" and all(" " in n for n in names)
    assert all(len(n.split()) <= 1 for n in (kp.phrase for kp in extract(WORKED, max_length=1)))


def test_yake_scores_higher_is_better() -> None:
    phrases = extract(WORKED, "yake")
    assert phrases and all(0 < kp.score <= 1 for kp in phrases)
    assert [kp.score for kp in phrases] == sorted((kp.score for kp in phrases), reverse=True)


def test_positionrank_options() -> None:
    phrases = extract(WORKED, "positionrank", max_words=1)
    assert phrases and all(" " not in kp.phrase for kp in phrases)
    assert extract(WORKED, "positionrank", window=2, damping=0.5)


def test_random_deterministic_and_matched(real_texts: list[str]) -> None:
    rake = get_extractor("rake")
    a = get_extractor("random", seed=7)
    b = get_extractor("random", seed=7)
    c = get_extractor("random", seed=8)
    texts = real_texts[:30]
    first = [a.extract(t) for t in texts]
    assert [b.extract(t) for t in reversed(texts)][::-1] == first  # order-independent
    assert [c.extract(t) for t in texts] != first
    wanted = got = 0
    for text, phrases in zip(texts, first):
        reference = rake.extract(text)
        assert len(phrases) <= len(reference)
        wanted += sum(len(kp.phrase) for kp in reference)
        got += sum(len(kp.phrase) for kp in phrases)
        assert [kp.score for kp in phrases] == sorted((kp.score for kp in phrases), reverse=True)
        stop = load_stopwords("english")
        for kp in phrases:
            assert 1 <= len(kp.phrase.split(" ")) <= 3
            assert not all(w in stop for w in kp.phrase.split(" "))
        covered = sorted(s for kp in phrases for s in kp.spans)
        assert all(e1 <= s2 for (_, e1), (s2, _) in zip(covered, covered[1:])), "no overlaps"
    assert abs(got - wanted) <= 0.02 * wanted


def test_random_count_matches_worked_example() -> None:
    phrases = extract(WORKED, "random", seed=0)
    assert len(phrases) == 17
    assert abs(sum(len(kp.phrase) for kp in phrases) - sum(len(kp.phrase) for kp in extract(WORKED))) <= 2


def test_extract_reuses_extractor() -> None:
    from spo import keywords

    extract(WORKED, "rake", max_phrases=5)
    size = len(keywords._CACHE)
    extract(WORKED, "rake", max_phrases=5)
    assert len(keywords._CACHE) == size


def test_keyphrase_is_frozen() -> None:
    kp = extract(WORKED)[0]
    with pytest.raises(AttributeError):
        kp.phrase = "x"  # type: ignore[misc]


def test_rake_matches_rake_nltk_on_real_rows(real_texts: list[str]) -> None:
    """Same phrases, scores and order as bare rake-nltk wherever punctuation is plain ASCII
    single characters (elsewhere we deliberately break phrases at any punctuation run)."""
    from spo.config import RakeOptions
    from spo.keywords.rake import make_rake
    from spo.keywords.tokenize import is_word, word_tokenize

    bare = make_rake(load_stopwords("english"), RakeOptions())
    ours = get_extractor("rake")
    compared = 0
    for text in real_texts:
        if any(not is_word(t) and (len(t) > 1 or not t.isascii()) for t in word_tokenize(text)):
            continue
        bare.extract_keywords_from_text(text)
        deduped, seen = [], set()
        for score, phrase in bare.get_ranked_phrases_with_scores():
            if phrase not in seen:
                seen.add(phrase)
                deduped.append((phrase, score))
        assert [(kp.phrase, kp.score) for kp in ours.extract(text)] == deduped
        compared += 1
    assert compared >= 20
