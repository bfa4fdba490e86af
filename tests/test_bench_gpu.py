"""bench/gpu.sh runs: its --smoke mode (CPU, tiny model, one step per configuration) must produce
every configuration's row, so the script is known to work the day a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_smoke_mode_measures_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the smoke run takes under 30 s: the bound only stops a hang, and no figure is asserted but > 0
    proc = subprocess.run([str(REPO / "bench" / "gpu.sh"), "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["name"], r["lora"]): r for r in result["results"]}
    assert set(rows) == {(n, lora) for n in ("trl", "trl_pre", "dpo", "spo_m2", "spo_all", "spo_drop")
                         for lora in (False, True)}
    assert all("error" not in r and r["median_step_s"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
    assert {"full dpo/trl_pre", "lora spo_m2/dpo", "full spo_all/dpo"} <= set(result["ratios"])
