"""The shortcut audit of the degree variants (spo.degree_audit, the degrees stage's audit).

What a user depends on: a degree accuracy means something only if nothing but the missing
content tells the levels apart.  These tests show that the audit's probes see the defects an
earlier builder had (so a green audit is not a probe that cannot fail), that the stage warns
and, by a setting, fails on them, and that on the real HH and TL;DR samples, with RAKE and with
the random-span control, every formatting probe stays within 5 points of chance.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import tmp_config

from spo.degree_audit import (
    FORMATTING_PROBES,
    LENGTH_PROBES,
    audit,
    capitalisation_features,
    in_test_half,
    punctuation_features,
    whitespace_features,
)
from spo.degrees import build_degree_variants
from spo.errors import StageFailed

# the example: HH responses put two spaces after a sentence
TWO_SPACED = " It is big.  Many live here.  They fly."


def test_the_builder_keeps_the_texts_whitespace_separators_and_capitals() -> None:
    levels = build_degree_variants(TWO_SPACED, ["many"], 2).levels
    assert levels[1] == " It is big.  Live here.  They fly."
    # the features the probes read are those of level 0: no trace of the removal point
    for features in (whitespace_features, punctuation_features, capitalisation_features):
        assert features(levels[1]) == features(levels[0]), features.__name__


def test_the_features_see_the_defects_of_the_earlier_builder() -> None:
    # what the builder used to make of TWO_SPACED minus "many": a single space, a lowercase start
    old = " It is big. live here.  They fly."
    assert whitespace_features(old)[0] == 0.5 != whitespace_features(TWO_SPACED)[0]
    assert capitalisation_features(old)[0] == 0.5 != capitalisation_features(TWO_SPACED)[0]
    # and of "in Oregon, with" minus "oregon": the comma deleted with the word
    assert punctuation_features("Live in with moths.")[0] == 0.0 < punctuation_features("Live in, with moths.")[0]


def _planted(levels: list[str]) -> list[str]:
    """Level k with its first k sentence gaps made single-spaced: the earlier builder's trace."""
    out = []
    for k, level in enumerate(levels):
        for _ in range(k):
            level = level.replace(".  ", ". ", 1)
        out.append(level)
    return out


def _hh_levels(shared_data: Path, limit: int) -> list[tuple[str, list[str]]]:
    """(row id, 4 levels) of HH responses with two-spaced sentences, every sentence's
    first word as its phrase list (so that removal touches sentence gaps)."""
    from conftest import read_gz

    out = []
    rows = read_gz(shared_data / "hh" / "train.jsonl.gz") + read_gz(shared_data / "hh" / "test.jsonl.gz")
    for i, row in enumerate(rows):
        response = row["chosen"].rsplit("\n\nAssistant:", 1)[-1]
        if response.count(".  ") < 3:
            continue
        firsts = [s.split()[0] for s in response.split(".  ")[1:] if s.split()]
        dv = build_degree_variants(response, firsts, 4)
        if dv.distinct:
            out.append((f"row{i}", dv.levels))
        if len(out) >= limit:
            break
    return out


def test_the_audit_finds_a_planted_shortcut_and_not_the_clean_levels(shared_data: Path) -> None:
    responses = _hh_levels(shared_data, 240)
    assert len(responses) == 240
    clean = audit(responses, bootstrap=200)
    planted = audit([(key, _planted(levels)) for key, levels in responses], bootstrap=200)
    assert clean.shortcuts(0.05) == {}
    assert planted.probes["whitespace"].accuracy > 0.45 and "whitespace" in planted.shortcuts(0.05)
    # the length probes read the same words either way: the plant is formatting only
    assert planted.probes["length"].accuracy == clean.probes["length"].accuracy
    low, high = planted.probes["whitespace"].interval
    assert low is not None and high is not None and low <= planted.probes["whitespace"].accuracy <= high


def test_the_split_is_by_response_key_and_does_not_depend_on_order() -> None:
    keys = [f"r{i}" for i in range(400)]
    halves = [in_test_half(k, 0) for k in keys]
    assert 150 < sum(halves) < 250
    assert [in_test_half(k, 0) for k in reversed(keys)] == halves[::-1]
    assert [in_test_half(k, 1) for k in keys] != halves  # the seed draws another split


def _stage_rows(tmp_path: Path, shared_data: Path, limit: int) -> None:
    """Validated rows and keywords for the degrees stage: HH responses, sentence-first-word phrases."""
    responses = _hh_levels(shared_data, limit)
    by_id = {key: levels[0] for key, levels in responses}
    rows, keywords = [], []
    for key, text in by_id.items():
        firsts = [s.split()[0] for s in text.split(".  ")[1:] if s.split()]
        rows.append({"id": key, "prompt": "p", "chosen": text, "rejected": text})
        keywords.append({"id": key, "method": "rake", "chosen": [{"phrase": p} for p in firsts],
                         "rejected": [{"phrase": p} for p in firsts]})
    for folder, lines in (("validated", rows), ("keywords", keywords)):
        path = tmp_path / "data" / folder / "train.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")


def test_the_stage_reports_the_audit_and_fails_on_a_shortcut_when_told_to(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from spo.stages import degrees as stage

    _stage_rows(tmp_path, shared_data, 160)
    cfg = tmp_config(tmp_path, None, "degrees.audit.min_responses=50", "degrees.audit.bootstrap=100")
    with caplog.at_level(logging.INFO, logger="spo.degrees"):
        stage.run(cfg)
    metrics = json.loads((tmp_path / "metrics" / "degrees.json").read_text())
    entry = metrics["shortcut_audit"]
    assert entry["split"] == "train" and entry["judged"] and entry["shortcuts"] == {}
    assert set(entry["probes"]) == set(FORMATTING_PROBES) | set(LENGTH_PROBES)
    assert entry["chance"] == 0.25 and entry["train_responses"] + entry["test_responses"] == 320
    assert (tmp_path / "metrics" / "degrees_shortcut_audit.png").read_bytes()[:4] == b"\x89PNG"
    assert "shortcut audit on" in caplog.text and "SHORTCUT" not in caplog.text

    # the earlier builder's whitespace, planted: a warning by default, a failure when asked
    real = stage.build_degree_variants

    def leaky(text, phrases, n_levels):
        dv = real(text, phrases, n_levels)
        return type(dv)(**{**dv.__dict__, "levels": _planted(dv.levels)})

    monkeypatch.setattr(stage, "build_degree_variants", leaky)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spo.degrees"):
        stage.run(cfg)
    assert "SHORTCUT: whitespace" in caplog.text
    cfg = tmp_config(tmp_path, None, "degrees.audit.min_responses=50", "degrees.audit.bootstrap=100",
                     "degrees.audit.on_shortcut=fail")
    with pytest.raises(StageFailed, match=r"formatting probes tell the degree level .*whitespace \d+\.\d%"):
        stage.run(cfg)
    # everything was written before the stage failed: the user can look at what it found
    metrics = json.loads((tmp_path / "metrics" / "degrees.json").read_text())
    assert "whitespace" in metrics["shortcut_audit"]["shortcuts"]
    assert (tmp_path / "data" / "degrees" / "train.jsonl").is_file()


def test_too_few_responses_are_reported_not_judged(tmp_path: Path, shared_data: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from spo.stages import degrees as stage

    _stage_rows(tmp_path, shared_data, 20)
    real = stage.build_degree_variants
    monkeypatch.setattr(stage, "build_degree_variants", lambda t, p, n: type(real(t, p, n))(
        **{**real(t, p, n).__dict__, "levels": _planted(real(t, p, n).levels)}))
    stage.run(tmp_config(tmp_path, None, "degrees.audit.on_shortcut=fail", "degrees.audit.bootstrap=50"))
    entry = json.loads((tmp_path / "metrics" / "degrees.json").read_text())["shortcut_audit"]
    assert not entry["judged"] and entry["shortcuts"] == {} and entry["test_responses"] < 200


@pytest.fixture(scope="module")
def prepared_samples(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    """The prepare stage's train rows of both real samples (validate only quarantines a few rows
    more; the audit needs the responses, not the checks)."""
    from spo.stages import prepare

    out = {}
    for dataset in ("hh", "tldr"):
        folder = tmp_path_factory.mktemp(f"audit_{dataset}")
        prepare.run(tmp_config(folder, shared_data, dataset=dataset))
        train = folder / "train_only"  # the audit reads the train split: keywords need no other
        train.mkdir()
        (folder / "data" / "prepared" / "train.jsonl").rename(train / "train.jsonl")
        out[dataset] = train
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["hh", "tldr"])
@pytest.mark.parametrize("method", ["rake", "random"])
def test_no_formatting_shortcut_on_the_real_samples(tmp_path: Path, prepared_samples: dict[str, Path],
                                                    dataset: str, method: str) -> None:
    """The acceptance bar of the degree data: on the real samples, every formatting probe within
    5 points of chance, on enough held-out responses to tell (the length probes are reported
    only; docs/degrees.md has the figures)."""
    from spo.stages import degrees, keywords

    source = prepared_samples[dataset]
    cfg = tmp_config(tmp_path, None, f"keywords.in_dir={source}", f"degrees.in_dir={source}",
                     f"keywords.method={method}", "keywords.workers=1", "degrees.audit.bootstrap=200",
                     "degrees.audit.on_shortcut=fail", dataset=dataset)
    keywords.run(cfg)
    degrees.run(cfg)  # on_shortcut=fail: a shortcut raises StageFailed naming the probe
    entry = json.loads((tmp_path / "metrics" / "degrees.json").read_text())["shortcut_audit"]
    assert entry["judged"] and entry["test_responses"] >= 700
    for name in FORMATTING_PROBES:
        assert entry["probes"][name]["accuracy"] <= entry["chance"] + 0.05, (name, entry["probes"][name])
    # removal shortens the text: the length probe is above chance, which is why it is reported
    assert entry["probes"]["length"]["accuracy"] > entry["chance"] + 0.03
