"""Helpers shared by the tests that run the DVC pipeline in a throwaway project copy.

Not a test module: imported as ``from pipeline_helpers import ...`` (pytest puts tests/ on
sys.path, as for ``conftest`` and ``judge_server``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import REPO

DVC = (sys.executable, "-m", "dvc")


def _env(data_dir: Path) -> dict[str, str]:
    """The environment of a stage / dvc subprocess: the data samples in data_dir, this venv first on PATH."""
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
    shutil.copytree(REPO / ".dvc" / "plots", work / ".dvc" / "plots")  # the custom plot templates
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    return work


def shrink_params(params: dict[str, Any]) -> dict[str, Any]:
    """Make every model stage tiny: a very small model, short sequences, a few optimizer steps.

    Edits (and returns) a params.yaml mapping; the whole 12-stage `dvc repro` then runs in
    about 1.5 minutes on two CPU cores.
    """
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
    return params


def read_params(work: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((work / "params.yaml").read_text())


def write_params(work: Path, params: dict[str, Any]) -> None:
    import yaml

    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def small_project(tmp_path: Path) -> Path:
    """A project copy whose params.yaml has the tiny settings of :func:`shrink_params`."""
    work = _project_copy(tmp_path)
    write_params(work, shrink_params(read_params(work)))
    return work
