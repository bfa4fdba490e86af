"""The TL;DR variant of the demo, switched on by one param (`data.dataset: tldr`), end to end.

Every stage of dvc.yaml on a slice of the real TL;DR sample with a very small model (as the HH
end-to-end test in test_pipeline.py): the rows are TL;DR summaries, the judge asks for the
summarisation task and adds ROUGE against the reference (chosen) summary, and the report names
the data set.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import read_gz, write_raw
from pipeline_helpers import DVC, _env, read_params, small_project, write_params

from spo.config import load_config
from spo.io import read_jsonl

pytestmark = pytest.mark.slow
ROWS_PER_SPLIT = 100
DATA_STAGES = ("prepare", "validate", "keywords", "degrees")
ROUGE_TYPES = {"rouge1", "rouge2", "rougeL"}


@pytest.fixture(scope="module")
def tldr_slice(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A 200-row slice of the real TL;DR sample: the first 100 rows of each source split."""
    folder = tmp_path_factory.mktemp("tldr_slice")
    for split in ("train", "test"):
        rows = read_gz(shared_data / "tldr" / f"{split}.jsonl.gz", limit=ROWS_PER_SPLIT)
        write_raw(folder, "tldr", split, rows, gz=True)
    return folder


def test_the_tldr_pipeline_end_to_end_on_a_slice(tmp_path: Path, tldr_slice: Path) -> None:
    work = small_project(tmp_path)
    params = read_params(work)
    params["data"]["dataset"] = "tldr"
    # IPO and KTO selected in params, as the loss x SPO experiment does: trained, generated, judged
    params["variants"].update(ipo_spo={"loss": "ipo", "spo": True}, kto={"loss": "kto", "spo": False})
    write_params(work, params)
    cfg = load_config(work / "params.yaml")
    assert cfg.data.dataset == "tldr"
    cells = cfg.cells()  # the grid: every variant once per seed (grid.seeds: [0])
    assert [cell.name for cell in cells] == ["dpo_s0", "dpo_spo_s0", "ipo_spo_s0", "kto_s0"]
    comparisons = {c.name: c for c in cfg.judge_comparisons()}
    assert {f"{cell.name}_vs_chosen" for cell in cells} <= set(comparisons)
    assert {"dpo_spo_s0_vs_dpo_s0", "ipo_spo_s0_vs_sft", "kto_s0_vs_chosen"} <= set(comparisons)

    result = subprocess.run([*DVC, "repro"], cwd=work, env=_env(tldr_slice), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    stages = (*DATA_STAGES, "base_model", "sft", "reference", *(f"train@{cell.variant}-{cell.seed}" for cell in cells),
              "generate", "reward_model", "judge", "report")
    ran = re.findall(r"Running stage '([^']+)'", result.stdout)
    assert sorted(ran) == sorted(stages)
    for cell in cells:
        variant = cfg.variants[cell.variant]
        trained = json.loads((work / f"metrics/train_{cell.name}.json").read_text())
        assert (trained["loss"], trained["spo"]) == (variant.loss, variant.spo), cell.name

    # the rows are TL;DR posts and summaries, read from the slice
    assert f"read {2 * ROWS_PER_SPLIT} tldr rows from {tldr_slice}" in result.stderr
    prepared = [row for split in ("train", "eval", "test") for row in read_jsonl(work / f"data/prepared/{split}.jsonl")]
    assert prepared and {row["source"] for row in prepared} == {"tldr"}
    assert all(row["prompt"].startswith("SUBREDDIT: r/") for row in prepared)
    validated = {row["id"]: row for split in ("train", "eval", "test")
                 for row in read_jsonl(work / f"data/validated/{split}.jsonl")}
    assert validated and {row["source"] for row in validated.values()} == {"tldr"}

    # every comparison judged, as a summarisation task, with ROUGE against the reference summary
    judge = json.loads((work / "metrics/judge.json").read_text())
    paired = judge.pop("paired_differences", None)  # SPO against its twin: checked in test_pipeline.py
    grid, grid_differences = judge.pop("grid"), judge.pop("grid_differences")  # pooled over seeds: the same
    assert set(judge) == set(comparisons)
    assert set(grid) == {"dpo_vs_chosen", "dpo_spo_vs_chosen", "ipo_spo_vs_chosen", "kto_vs_chosen",
                         "dpo_spo_vs_dpo", "dpo_spo_vs_sft", "ipo_spo_vs_sft"}
    assert all(family["dataset"] == "tldr" and family["seeds"] == [0] for family in grid.values())
    for name, stats in judge.items():
        assert stats["n"] + stats["invalid"] + stats["not_judged"] == cfg.generate.max_prompts, name
        assert stats["n"] > 0, name
        generated_sides = {stats["a"], stats["b"]} - {"chosen", "rejected"}
        assert set(stats["rouge"]) == generated_sides, name
        for side, scores in stats["rouge"].items():
            assert set(scores) == ROUGE_TYPES, (name, side)
            assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in scores.values()), (name, side, scores)
        lines = read_jsonl(work / f"outputs/judgments/{name}.jsonl")
        assert len(lines) == cfg.generate.max_prompts
        assert {line["task"] for line in lines} == {"summarization"}, name
        assert all(line["id"] in validated for line in lines)
    assert ({**judge, "paired_differences": paired, "grid": grid, "grid_differences": grid_differences}
            == json.loads((work / "outputs/judgments/winrates.json").read_text()))
    test_ids = {row["id"] for row in read_jsonl(work / "data/validated/test.jsonl")}
    for name in cfg.generation_models():
        generated = read_jsonl(work / f"outputs/generations/{name}.jsonl")
        assert generated and {g["id"] for g in generated} <= test_ids, name

    # the report says which data set it is about
    report = (work / "reports/report.md").read_text()
    assert "# SPO report — tldr" in report
    assert "Data set: tldr;" in report
    assert "SPO report — tldr" in (work / "reports/report.html").read_text()
    assert "ROUGE F-measure of each model's summaries" in report
    for name in cfg.generation_models():
        assert f"| {name} | " in report, f"{name}'s ROUGE row"
