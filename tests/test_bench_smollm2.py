"""bench/gpu_smollm2.sh runs: its --smoke mode carries the real SmolLM2 GGUF through the device plan
(split in two, each half gathered by its own call, joined and checked) and runs the same comparison
(DPO vs DPO+SPO, full fine-tuning, generation, the local reward judge) on the CPU with a few steps,
pairs and prompts, so the script is known to work the day a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from smollm2 import requires_smollm2

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@requires_smollm2
def test_smollm2_gpu_benchmark_smoke_mode_runs_the_whole_plan(tmp_path: Path) -> None:
    out = tmp_path / "smollm2.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TMPDIR": str(tmp_path)}
    # a few minutes on 2 idle cores: the bound only stops a hang; no figure is asserted but present / > 0
    proc = subprocess.run([str(REPO / "bench" / "gpu_smollm2.sh"), "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "part 2 of 2" in proc.stderr and "joined and verified" in proc.stdout  # the two calls, then the join
    result = json.loads(out.read_text())
    assert set(result["stages"]) >= {"base_model", "reference", "train dpo_s0", "train dpo_spo_s0", "generate",
                                     "reward_model", "judge"}
    assert all(stage["seconds"] > 0 for stage in result["stages"].values())
    for cell in ("dpo_s0", "dpo_spo_s0"):
        assert result["train"][cell]["steps"] == 2 and result["train"][cell]["ms_per_step"] > 0
    assert {"base", "dpo_s0", "dpo_spo_s0"} <= set(result["generate"])
    assert result["reward_model"]["held_out_pairs"] > 0
    assert set(result["judge"]) == {"dpo_s0_vs_chosen", "dpo_spo_s0_vs_chosen", "dpo_spo_s0_vs_dpo_s0",
                                    "dpo_s0_vs_base", "dpo_spo_s0_vs_base"}
    assert all(j["win_rate"] is not None and j["n"] > 0 for j in result["judge"].values())
    table = proc.stdout[proc.stdout.index("SmolLM2-135M-Instruct, full fine-tuning"):]  # the table comes last
    for row in ("| dpo_s0 |", "| dpo_spo_s0 |", "| dpo_spo_s0_vs_dpo_s0 |", "| reward_model |"):
        assert row in table
