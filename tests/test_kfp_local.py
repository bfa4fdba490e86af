"""The compiled pipeline run for real, in containers of the project image (kfp.local's DockerRunner,
no network), against `dvc repro` on the same slice and seed: one set of stages, two orchestrators,
the same numbers. Needs a Docker daemon and the built image (CI builds both: .ci/run)."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from docker_helpers import project_image, require_docker
from pipeline_helpers import DVC, _env, small_project

from spo.config import load_config
from spo.errors import StageFailed
from spo.judging.grid import GRID
from spo.pipelines.compile import compile_pipeline
from spo.pipelines.local import run_local
from spo.stages.judge import PAIRED, SUMMARIES

pytestmark = pytest.mark.slow
TIMINGS = ("seconds", "responses_per_second", "tokens_per_second", "train_seconds", "generate_seconds")


def _numbers(data: dict) -> dict:
    """A metrics file without its timings (the only values two runs may differ in)."""
    return {k: (_numbers(v) if isinstance(v, dict) else v) for k, v in data.items() if k not in TIMINGS}


def _winrate_rows(report: str) -> list[list[str]]:
    """The report's win-rate rows, cells split, without the judge column: it names where the
    judge model lies (models/reward under DVC, the reward step's artifact under KFP)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## Win rates"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rows = [line.strip("| ").split(" | ") for line in lines[start:end] if line.startswith("| ") and "_vs_" in line]
    return [row[:-1] for row in rows]


def test_the_pipeline_in_containers_gives_the_numbers_of_dvc_repro(tmp_path: Path, hh_slice: Path) -> None:
    require_docker()
    image = project_image()
    work = small_project(tmp_path)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["grid"]["seeds"] = [0, 1]  # a real grid: two variants x two seeds, four cells
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([*DVC, "repro"], cwd=work, env=_env(hh_slice), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    pipeline = compile_pipeline(tmp_path / "pipeline.yaml", params=work / "params.yaml",
                                platform=REPO / "configs/platform/local.yaml", image=image)
    run = run_local(pipeline, tmp_path / "kfp", data_dir=hh_slice, runner="docker")

    def kfp_metrics(task: str) -> dict:
        return json.loads(run.output(task, "metrics").read_text())

    def dvc_metrics(name: str) -> dict:
        return json.loads((work / "metrics" / f"{name}.json").read_text())

    validation = dvc_metrics("validate")
    assert validation["rows_valid"] > 0 and _numbers(kfp_metrics("validate")) == _numbers(validation)
    assert _numbers(kfp_metrics("degrees")) == _numbers(dvc_metrics("degrees"))
    assert _numbers(kfp_metrics("keywords")) == _numbers(dvc_metrics("keywords"))
    # the grid: the train task in the loop, one iteration per cell (variants x grid.seeds), each named by its cell
    cells = [cell.name for cell in load_config(work / "params.yaml").cells()]
    assert cells == ["dpo_s0", "dpo_s1", "dpo_spo_s0", "dpo_spo_s1"]
    assert sorted(t for t in run.tasks if t.startswith("train")) == [f"train@{cell}" for cell in cells]
    for cell in cells:  # dvc.yaml's matrix stage train@<variant>-<seed> wrote metrics/train_<cell>.json
        trained, recorded = kfp_metrics(f"train@{cell}"), dvc_metrics(f"train_{cell}")
        assert trained["spo"] == recorded["spo"] == cell.startswith("dpo_spo")
        for key in ("loss", "steps", "pairs"):
            assert trained[key] == recorded[key], (cell, key)
        assert run.output(f"train@{cell}", "policy").is_dir() and (work / "models" / "policy" / cell).is_dir()
    judged, expected = kfp_metrics("judge"), dvc_metrics("judge")
    assert expected[PAIRED] and expected[GRID]
    assert {name: f["seeds"] for name, f in expected[GRID].items()} == {
        "dpo_vs_chosen": [0, 1], "dpo_spo_vs_chosen": [0, 1], "dpo_spo_vs_dpo": [0, 1], "dpo_spo_vs_sft": [0, 1]}
    for summary in SUMMARIES:  # DPO+SPO against its twin of the same seed; the families pooled over the seeds
        assert judged.pop(summary, None) == expected.pop(summary, None), summary
    assert set(judged) == set(expected) == {name.format(s=seed) for seed in (0, 1) for name in (
        "dpo_s{s}_vs_chosen", "dpo_spo_s{s}_vs_chosen", "dpo_spo_s{s}_vs_dpo_s{s}", "dpo_spo_s{s}_vs_sft")}
    for name, record in expected.items():
        for key in ("win_rate", "ci_low", "ci_high", "ties", "wins", "losses", "n", "lc_win_rate", "tie_rate"):
            assert judged[name][key] == record[key], (name, key)
    report = run.output("report", "report_md").read_text()
    assert len(_winrate_rows(report)) == 8
    assert _winrate_rows(report) == _winrate_rows((work / "reports" / "report.md").read_text())
    assert set(run.step_seconds) == set(run.tasks)  # every task ran in a container, timed
    assert run.output("validate", "report").read_text().lstrip().lower().startswith("<!doctype html")


def _failing_pipeline(tmp_path: Path, image: str) -> Path:
    """One fast-failing step (exits 1 at once): the case the local runner reported as a success."""
    from kfp import compiler, dsl

    @dsl.component(base_image=image, install_kfp_package=False)
    def fail_fast() -> None:
        raise SystemExit(1)

    @dsl.pipeline(name="fails")
    def fails() -> None:
        fail_fast()

    out = tmp_path / "fails.yaml"
    compiler.Compiler().compile(fails, str(out))
    return out


def test_a_failing_step_fails_the_local_run(tmp_path: Path, hh_slice: Path) -> None:
    require_docker()
    image = project_image()
    failing = _failing_pipeline(tmp_path, image)
    for attempt in range(5):  # the upstream race lost about one fast failure in seven: never here
        with pytest.raises(StageFailed, match="failed"):
            run_local(failing, tmp_path / f"run-{attempt}", runner="docker")
    # a bad knob fails the run at `configure`, before any stage runs
    pipeline = compile_pipeline(tmp_path / "pipeline.yaml", params=REPO / "params.yaml",
                                platform=REPO / "configs/platform/local.yaml", image=image)
    with pytest.raises(StageFailed, match="failed"):
        run_local(pipeline, tmp_path / "bad", data_dir=hh_slice, runner="docker", arguments={"n_levels": 1})
    assert not list((tmp_path / "bad" / "root").glob("*/prepare"))
