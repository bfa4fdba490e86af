"""The pipeline end to end: the data stages through the CLI and `dvc repro` (twice), then every stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_helpers import _env, _project_copy, read_params, shrink_params, write_params

from spo.degrees import normalise
from spo.io import read_jsonl

pytestmark = pytest.mark.slow
STAGES = ("prepare", "validate", "keywords", "degrees")


def _count(path: Path) -> int:
    return len(read_jsonl(path)) if path.exists() else 0


def test_four_stages_through_the_cli_on_a_200_row_slice(tmp_path: Path, hh_slice: Path) -> None:
    work = _project_copy(tmp_path)
    for stage in STAGES:
        result = subprocess.run(["spo", stage], cwd=work, env=_env(hh_slice), capture_output=True, text=True)
        assert result.returncode == 0, f"spo {stage} failed:\n{result.stderr}"
        assert f"{stage}:" in result.stderr, "each stage ends with a one-line summary"

    quarantined_prepare = _count(work / "data/quarantine/prepare.jsonl")
    quarantined_validate = _count(work / "data/quarantine/validate.jsonl")
    prepared = sum(_count(work / "data/prepared" / f"{s}.jsonl") for s in ("train", "eval", "test"))
    assert prepared + quarantined_prepare == 200
    validated_ids = []
    for split in ("train", "eval", "test"):
        rows = read_jsonl(work / "data/validated" / f"{split}.jsonl")
        keywords = read_jsonl(work / "data/keywords" / f"{split}.jsonl")
        degrees = read_jsonl(work / "data/degrees" / f"{split}.jsonl")
        assert [r["id"] for r in rows] == [k["id"] for k in keywords] == [d["id"] for d in degrees]
        for row, kw, deg in zip(rows, keywords, degrees):
            for side in ("chosen", "rejected"):
                assert all(row[side][s:e].lower() == p["phrase"].lower() or " " in p["phrase"]
                           for p in kw[side] for s, e in p["spans"])
                levels = deg[side]["levels"]
                assert len(levels) == 4 and levels[0] == normalise(row[side])  # level 0: the response, ends normalised
        validated_ids += [r["id"] for r in rows]
    assert len(validated_ids) + quarantined_validate == prepared
    for metrics in ("validate", "keywords", "degrees"):
        assert (work / "metrics" / f"{metrics}.json").is_file()
    assert (work / "reports/validation/validation.html").is_file()


def test_dvc_repro_twice_skips_every_stage_and_a_param_reruns_only_downstream(tmp_path: Path, hh_slice: Path) -> None:
    """The data half (`dvc repro degrees`); the model stages have their own tests."""
    work = _project_copy(tmp_path)
    dvc = [sys.executable, "-m", "dvc"]
    first = subprocess.run([*dvc, "repro", "degrees"], cwd=work, env=_env(hh_slice), capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout

    second = subprocess.run([*dvc, "repro", "degrees"], cwd=work, env=_env(hh_slice), capture_output=True, text=True)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout

    params = (work / "params.yaml").read_text().replace("n_levels: 4 ", "n_levels: 3 ")
    (work / "params.yaml").write_text(params)
    third = subprocess.run([*dvc, "repro", "degrees"], cwd=work, env=_env(hh_slice), capture_output=True, text=True)
    assert third.returncode == 0, third.stdout + third.stderr
    assert [s for s in STAGES if f"Running stage '{s}'" in third.stdout] == ["degrees"]
    assert read_jsonl(work / "data/degrees/train.jsonl")[0]["n_levels"] == 3


def test_whole_pipeline_end_to_end_on_a_slice(tmp_path: Path, hh_slice: Path) -> None:
    """Every stage of dvc.yaml, data checks to report, with a very small model and step counts."""
    work = _project_copy(tmp_path)
    write_params(work, shrink_params(read_params(work)))

    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=_env(hh_slice), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # the grid of the default params: two variants x one seed, one matrix stage per cell
    for stage in (*STAGES, "base_model", "sft", "reference", "train@dpo-0", "train@dpo_spo-0", "generate",
                  "reward_model", "judge", "report"):
        assert f"Running stage '{stage}'" in result.stdout, stage
    for cell in ("dpo_s0", "dpo_spo_s0"):
        assert (work / f"models/policy/{cell}/model.safetensors").is_file(), cell
        assert json.loads((work / f"metrics/train_{cell}.json").read_text())["steps"] == 2, cell

    judge = json.loads((work / "metrics/judge.json").read_text())
    paired = judge.pop("paired_differences")  # DPO+SPO against its twin of the same seed, on the same prompts
    assert list(paired) == ["dpo_spo_s0_minus_dpo_s0_vs_chosen"]
    assert paired["dpo_spo_s0_minus_dpo_s0_vs_chosen"]["n"] <= 6
    grid, grid_differences = judge.pop("grid"), judge.pop("grid_differences")  # the families, pooled over seeds
    assert set(judge) == {"dpo_s0_vs_chosen", "dpo_spo_s0_vs_chosen", "dpo_spo_s0_vs_dpo_s0", "dpo_spo_s0_vs_sft"}
    assert all(c["n"] + c["invalid"] + c["not_judged"] == 6 for c in judge.values())
    assert set(grid) == {"dpo_vs_chosen", "dpo_spo_vs_chosen", "dpo_spo_vs_dpo", "dpo_spo_vs_sft"}
    assert all(family["seeds"] == [0] for family in grid.values())
    assert grid["dpo_spo_vs_dpo"]["comparisons"] == ["dpo_spo_s0_vs_dpo_s0"]
    assert list(grid_differences) == ["dpo_spo_minus_dpo_vs_chosen"]
    report = (work / "reports/report.md").read_text()
    win = judge["dpo_spo_s0_vs_dpo_s0"]
    assert (f"{100 * win['win_rate']:.1f}% [{100 * win['ci_low']:.1f}, {100 * win['ci_high']:.1f}] "
            f"(n={win['n']})") in report
    assert "data:image/png;base64," in (work / "reports/report.html").read_text()

    # dvc plots draws every declared plot from the run's files
    plots = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=work, env=_env(hh_slice),
                           capture_output=True, text=True)
    assert plots.returncode == 0, plots.stderr
    rendered = json.loads(plots.stdout)
    assert not rendered.get("errors"), rendered["errors"]
    drawn = set(rendered["data"])
    for plot in ("plots/loss_parts/dpo_s0.csv", "plots/loss_parts/dpo_spo_s0.csv",
                 "plots/reward_accuracy/dpo_spo_s0.csv", "plots/degree_accuracy/dpo_spo_s0.csv", "plots/win_rates.csv",
                 "plots/grid.csv", "metrics/degrees_removed_fraction.png"):
        assert any(key.endswith(plot) for key in drawn), plot

    # one training param: every cell's policy and everything downstream of them rerun, nothing upstream
    params = read_params(work)
    params["train"]["beta"] = 0.2
    write_params(work, params)
    rerun = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=_env(hh_slice), capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    ran = {line.split("'")[1] for line in rerun.stdout.splitlines() if line.startswith("Running stage '")}
    assert ran == {"train@dpo-0", "train@dpo_spo-0", "generate", "judge", "report"}
    assert json.loads((work / "metrics/train_dpo_spo_s0.json").read_text())["steps"] == 2

    # one variant changed: of the cells, its own alone are out of date (generate and judge read every
    # variant's settings, to name the cells and comparisons); the other variant's cell, the reference
    # log-probs and the prefix are not (bench/bench_grid.py measures the rerun)
    params["variants"]["dpo"]["set"] = {"beta": 0.3}
    write_params(work, params)
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=work, env=_env(hh_slice),
                            capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert set(json.loads(status.stdout)) == {"train@dpo-0", "generate", "judge"}
