"""bench/bench_logps.py runs and measures what docs/benchmarks.md says it measures (smoke sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_logps_smoke_reports_both_paths_and_the_logits_the_frozen_head_does_not_keep(tmp_path: Path) -> None:
    out = tmp_path / "logps.json"
    command = [sys.executable, str(REPO / "bench" / "bench_logps.py"), "--smoke", "--repeats", "1", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    one_chunk, four_chunks = report["rows"]
    assert (one_chunk["tokens"], one_chunk["chunk"], four_chunks["tokens"], four_chunks["chunk"]) == (64, 128, 256, 64)
    # One chunk: the recomputing path keeps the chunk's float32 logits (64 x 1,024 x 4 bytes) for the
    # backward; the frozen-head path keeps the gradient with respect to the hidden states instead.
    logits_mib = 64 * 1024 * 4 / 2**20
    assert one_chunk["recompute_saved_mib"] >= logits_mib
    assert one_chunk["frozen_saved_mib"] < logits_mib / 4
    for row in report["rows"]:
        assert row["recompute_s"] > 0 and row["frozen_s"] > 0
        assert row["time_ratio"] == row["frozen_s"] / row["recompute_s"]
