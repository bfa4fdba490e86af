"""Two CPU processes (torchrun, gloo) follow the loss trajectory of one process with the same global batch.

Catches unsynchronised gradients (each process would drift on its own data) and metrics that are
not reduced across processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _losses(out: Path) -> list[tuple[float, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["loss"], r["pairs"]) for r in records if r["split"] == "train"]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE)}
    two = tmp_path / "two"
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(HERE / "test_train_ddp_worker.py"), str(two)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    from test_train_ddp_worker import main

    one = tmp_path / "one"
    main(str(one))  # in this process: one process, accumulation 2 (same global batch of 4 pairs)

    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 3
    assert [p for _, p in b] == [4.0, 4.0, 4.0]  # pairs summed over both processes
    for (la, _), (lb, _) in zip(a, b):
        assert lb == pytest.approx(la, rel=1e-4)
    wa, wb = torch.load(one / "weights.pt"), torch.load(two / "weights.pt")
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)
    assert not (two / "metrics.jsonl").read_text().count('"step": 1,') > 1  # one writer
