"""The `keywords` stage on a small prepared folder: outputs, order, metrics, worker invariance."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import os
from pathlib import Path

import pytest

from spo.config import SpoConfig
from spo.io import read_jsonl, write_jsonl
from spo.stages import keywords as stage

HAND_ROWS = [
    ("About 150 species of butterflies live in Oregon, with about 100 species are moths.", "I don't know."),
    ("Gossamer wings and red admirals are common.\nKeep an eye out.", ""),
    ("the of and", "Red apples are good in flavour. Red apples!"),
]


def _shared_data() -> Path:
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir() and os.environ.get("SPO_SHARED_DATA"):
        path = Path(os.environ["SPO_SHARED_DATA"])
    return path


def _real_rows(n: int) -> list[tuple[str, str, str]]:
    path = _shared_data() / "hh" / "train.jsonl.gz"
    if not path.is_file():
        return []
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for row in itertools.islice(handle, n):
            row = json.loads(row)
            prompt, chosen = row["chosen"].rsplit("\n\nAssistant:", 1)
            rejected = row["rejected"].rsplit("\n\nAssistant:", 1)[-1]
            rows.append((prompt + "\n\nAssistant:", chosen.strip(), rejected.strip()))
    return rows


@pytest.fixture()
def prepared(tmp_path: Path) -> Path:
    in_dir = tmp_path / "validated"
    rows = [
        {"id": f"hand-{i}", "prompt": "Human: hi", "chosen": c, "rejected": r}
        for i, (c, r) in enumerate(HAND_ROWS)
    ]
    rows += [
        {"id": f"hh-{i}", "prompt": p, "chosen": c, "rejected": r} for i, (p, c, r) in enumerate(_real_rows(40))
    ]
    write_jsonl(in_dir / "train.jsonl", rows)
    write_jsonl(in_dir / "test.jsonl", rows[:5][::-1])
    return in_dir


def _cfg(tmp_path: Path, in_dir: Path, name: str, **keywords) -> SpoConfig:
    return SpoConfig.model_validate(
        {
            "seed": 11,
            "keywords": {
                "in_dir": str(in_dir),
                "out_dir": str(tmp_path / name),
                "metrics_file": str(tmp_path / f"{name}.json"),
                "chunk_size": 4,
                **keywords,
            },
        }
    )


def test_stage_outputs_and_metrics(tmp_path: Path, prepared: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(tmp_path, prepared, "out", workers=1)
    with caplog.at_level(logging.INFO, logger="spo.keywords"):
        metrics = stage.run(cfg)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json", "test.jsonl", "train.jsonl"]
    train_in = read_jsonl(prepared / "train.jsonl")
    train_out = read_jsonl(out / "train.jsonl")
    assert [r["id"] for r in train_out] == [r["id"] for r in train_in]
    for src, row in zip(train_in, train_out):
        assert set(row) == {"id", "method", "chosen", "rejected"} and row["method"] == "rake"
        for side in ("chosen", "rejected"):
            for kp in row[side]:
                assert set(kp) == {"phrase", "score", "spans"}
                for s, e in kp["spans"]:
                    assert " ".join(src[side][s:e].lower().split()) == kp["phrase"]
    assert [r["id"] for r in read_jsonl(out / "test.jsonl")] == [r["id"] for r in train_in[:5][::-1]]
    assert {"150 species", "100 species", "butterflies live"} <= {kp["phrase"] for kp in train_out[0]["chosen"]}
    assert train_out[1]["rejected"] == [] and train_out[2]["chosen"] == []

    n_rows = len(train_in) + 5
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved == metrics
    assert metrics["rows"] == n_rows and metrics["responses"] == 2 * n_rows
    assert metrics["method"] == "rake" and metrics["workers"] == 1
    assert metrics["responses_without_phrases"] >= 2
    assert 0 < metrics["covered_char_fraction_mean"] < 1
    assert metrics["phrases_per_response_mean"] > 0 and metrics["phrases_per_response_median"] >= 0
    assert metrics["seconds"] >= 0 and "responses_per_second" in metrics
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stage"] == "keywords" and prov["config_hash"] == cfg.section_hash("keywords")
    assert set(prov["inputs"]) == {"train.jsonl", "test.jsonl"}
    assert any("keywords: read" in r.getMessage() and "wrote" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("method", ["rake", "random"])
def test_stage_same_output_for_any_worker_count(tmp_path: Path, prepared: Path, method: str) -> None:
    one = stage.run(_cfg(tmp_path, prepared, "one", workers=1, method=method))
    two = stage.run(_cfg(tmp_path, prepared, "two", workers=2, method=method))
    assert one["workers"] == 1 and two["workers"] == 2
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_stage_other_methods_and_max_phrases(tmp_path: Path, prepared: Path) -> None:
    for method in ("yake", "positionrank"):
        stage.run(_cfg(tmp_path, prepared, method, workers=1, method=method, max_phrases=2))
        rows = read_jsonl(tmp_path / method / "train.jsonl")
        assert all(r["method"] == method and len(r["chosen"]) <= 2 for r in rows)
        assert any(r["chosen"] for r in rows)


def test_stage_missing_input(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no train"):
        stage.run(_cfg(tmp_path, tmp_path / "empty", "out"))


def test_stage_rejects_row_without_field(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in" / "train.jsonl", [{"id": 1, "chosen": "x"}])
    with pytest.raises(ValueError, match="rejected"):
        stage.run(_cfg(tmp_path, tmp_path / "in", "out", workers=1))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(("stopwords", "message"), [
    ("klingon", "'klingon' is neither a file nor a language"), ("no/such/stopwords.txt", "not found")])
def test_bad_stopwords_fail_at_once_naming_the_key_with_any_worker_count(
        tmp_path: Path, prepared: Path, workers: int, stopwords: str, message: str) -> None:
    """Found by a new user: with a worker pool an unknown language respawned failing workers forever."""
    import subprocess
    import sys

    from conftest import REPO

    command = [sys.executable, "-m", "spo", "keywords", "-p", str(REPO / "params.yaml")]
    paths = {"keywords.in_dir": prepared, "keywords.out_dir": tmp_path / "out",
             "keywords.metrics_file": tmp_path / "m.json"}
    for key, value in {**paths, "keywords.workers": workers, "keywords.stopwords": stopwords}.items():
        command += ["-S", f"{key}={value}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)  # a hang fails here, bounded
    assert done.returncode == 2, done.stderr[-2000:]
    assert "keywords.stopwords" in done.stderr and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_run_that_dies_midway_leaves_the_last_complete_output_folder(tmp_path: Path, prepared: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a new user: a killed run left some splits of the new run beside the old run's others, its
    provenance and a stray temporary, and `spo degrees` took it as complete."""
    from spo.keywords import parallel

    stage.run(_cfg(tmp_path, prepared, "out", method="rake", workers=1))
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    (tmp_path / ".out.tmp-killedrun").mkdir()  # what a SIGKILLed run leaves beside the folder
    (tmp_path / ".out.tmp-killedrun" / "train.jsonl").write_text("{}\n")
    calls = {"n": 0}
    real = parallel.process_rows

    def dies_on_the_second_split(method, extractor, rows):
        calls["n"] += 1
        if calls["n"] > 12:  # the train split's chunks are done, the test split's are not
            raise KeyboardInterrupt("killed")
        return real(method, extractor, rows)

    monkeypatch.setattr(parallel, "process_rows", dies_on_the_second_split)
    with pytest.raises(KeyboardInterrupt):
        stage.run(_cfg(tmp_path, prepared, "out", method="yake", workers=1))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == first  # the rake run, whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == []  # nothing stray
    monkeypatch.setattr(parallel, "process_rows", real)
    stage.run(_cfg(tmp_path, prepared, "out", method="yake", workers=1))
    assert json.loads((tmp_path / "out" / "train.jsonl").read_text().splitlines()[0])["method"] == "yake"
