"""The pipeline end to end: the data stages through the CLI and `dvc repro` (twice), then every stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from spo.io import read_jsonl

pytestmark = pytest.mark.slow
STAGES = ("prepare", "validate", "keywords", "degrees")


def _env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SPO_DATA_DIR"] = str(data_dir)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _project_copy(tmp_path: Path) -> Path:
    """A throwaway checkout: the pipeline definition, params and the code DVC hashes as deps."""
    work = tmp_path / "project"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (work / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", work / ".dvc" / "config")
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    return work


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
                assert all(row[side][s:e].lower() == p["phrase"].lower() or " " in p["phrase"] for p in kw[side] for s, e in p["spans"])
                levels = deg[side]["levels"]
                assert len(levels) == 4 and levels[0] == row[side]
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
    import yaml

    work = _project_copy(tmp_path)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["model"]["tiny"].update(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
    )
    small = {"max_length": 96, "max_prompt_length": 64}
    params["sft"].update(small, eval_steps=2, eval_rows=8, sample_prompts=1)
    params["sft"]["optim"].update(max_steps=3, batch_size=4, micro_batch_size=4)
    params["train"].update(small, eval_steps=1, eval_rows=8, save_steps=1, logging_steps=1)
    params["train"]["optim"].update(max_steps=2, batch_size=4, micro_batch_size=2)
    params["train"]["spo"]["hidden_size"] = 16
    params["generate"].update(max_prompts=6, batch_size=4, max_prompt_length=64)
    params["generate"]["sampling"]["max_new_tokens"] = 8
    params["reward_model"].update(small)
    params["reward_model"]["optim"].update(max_steps=2, batch_size=4, micro_batch_size=4)
    params["judge"]["bootstrap_samples"] = 100
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=_env(hh_slice), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for stage in (*STAGES, "base_model", "sft", "train@dpo", "train@dpo_spo", "generate", "reward_model", "judge", "report"):
        assert f"Running stage '{stage}'" in result.stdout, stage

    judge = json.loads((work / "metrics/judge.json").read_text())
    assert set(judge) == {"dpo_vs_chosen", "dpo_spo_vs_chosen", "dpo_spo_vs_dpo", "dpo_spo_vs_sft"}
    assert all(c["n"] + c["invalid"] + c["not_judged"] == 6 for c in judge.values())
    report = (work / "reports/report.md").read_text()
    win = judge["dpo_spo_vs_dpo"]
    assert f"{100 * win['win_rate']:.1f}% [{100 * win['ci_low']:.1f}, {100 * win['ci_high']:.1f}] (n={win['n']})" in report
    assert "data:image/png;base64," in (work / "reports/report.html").read_text()
