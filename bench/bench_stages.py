"""Wall time of the four data stages over the whole HH sample, process start-up included.

Runs `spo prepare`, `spo validate`, `spo keywords`, `spo degrees` as separate processes (as
`dvc repro` does) in a scratch folder and reports each stage's wall time and the total.
Usage: python bench/bench_stages.py [--data ../shared/data] [--dataset hh] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "validate", "keywords", "degrees")


def run_once(data: Path, dataset: str) -> dict[str, float]:
    env = dict(os.environ, SPO_DATA_DIR=str(data),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copy(REPO / "params.yaml", Path(scratch) / "params.yaml")
        times = {}
        for stage in STAGES:
            start = time.perf_counter()
            subprocess.run(["spo", stage, "-q", "-S", f"data.dataset={dataset}"], cwd=scratch, env=env, check=True)
            times[stage] = time.perf_counter() - start
        rows = sum(1 for s in ("train", "eval", "test") for _ in open(Path(scratch) / "data/validated" / f"{s}.jsonl"))
    times["total"] = sum(times.values())
    times["validated_rows"] = rows
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--dataset", default="hh", choices=("hh", "tldr"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs = [run_once(args.data.resolve(), args.dataset) for _ in range(args.repeat)]
    best = min(runs, key=lambda r: r["total"])
    print(f"four data stages over the {args.dataset} sample ({best['validated_rows']} validated rows), "
          f"{os.cpu_count()} cores, best of {args.repeat}:")
    for stage in (*STAGES, "total"):
        print(f"  {stage:<9} {best[stage]:6.2f} s   (runs: {', '.join(f'{r[stage]:.2f}' for r in runs)})")
    out = REPO / "bench" / "results" / f"stages_{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cores": os.cpu_count(), "python": platform.python_version()},
                               "runs": runs, "best": best}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
