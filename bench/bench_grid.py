"""The grid's wall time, and what its shared prefix saves against one run per cell.

Side by side, in throwaway copies of the project (no outputs, no DVC cache, so nothing is
restored from a cache), on the same data and params:

1. the grid: ``dvc repro`` of ``variants`` (dpo, dpo_spo) x ``grid.seeds`` (0, 1 by default),
   with each stage's wall time (from one "Running stage" line to the next);
2. one cell alone: the same pipeline with a single variant and seed, what a run per cell costs
   (the pipeline before the grid ran two policies per run and no seeds): the grid's cells done
   separately cost ``cells x`` this;
3. one variant changed in the grid's copy (``variants.dpo.set: {beta: 0.2}``): the stages
   ``dvc repro`` reruns, which must be that variant's cells and what reads them (generate,
   judge, report), never the prefix or the other variant's cells.

    python bench/bench_grid.py --data-dir ../shared/data [--seeds 0,1] [-S generate.max_prompts=50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import yaml
from bench_demo import project_copy
from bench_pipeline_containers import timed_dvc_repro as repro  # each stage's wall time

PREFIX = ("prepare", "validate", "keywords", "degrees", "base_model", "sft", "reference", "reward_model")


def configure(root: Path, overrides: list[str], variants: dict, seeds: list[int]) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["variants"], params["grid"]["seeds"] = variants, seeds
    for item in overrides:
        dotted, value = item.split("=", 1)
        node = params
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = yaml.safe_load(value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "SPO_DATA_DIR": str(Path(args.data_dir).resolve()), "DVC_NO_ANALYTICS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    grid_variants = {"dpo": {"loss": "dpo", "spo": False}, "dpo_spo": {"loss": "dpo", "spo": True}}
    with tempfile.TemporaryDirectory(prefix="spo-bench-grid-") as tmp:
        grid_root, single_root = project_copy(Path(tmp) / "grid"), project_copy(Path(tmp) / "single")
        configure(grid_root, args.overrides, grid_variants, seeds)
        configure(single_root, args.overrides, {"dpo_spo": {"loss": "dpo", "spo": True}}, seeds[:1])
        print(f"grid: {len(grid_variants)} variants x {len(seeds)} seeds", flush=True)
        grid = repro(grid_root, env)
        print("one cell alone", flush=True)
        single = repro(single_root, env)
        print("one variant changed in the grid", flush=True)
        configure(grid_root, args.overrides, {**grid_variants, "dpo": {"loss": "dpo", "spo": False,
                                                                       "set": {"beta": 0.2}}}, seeds)
        changed = repro(grid_root, env)
        judge = json.loads((grid_root / "metrics" / "judge.json").read_text())
    cells = len(grid_variants) * len(seeds)
    shared = sum(v for k, v in grid["stages"].items() if k in PREFIX)  # type: ignore[union-attr]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "cells": cells, "overrides": args.overrides,
        "grid": grid, "one_cell_alone": single,
        "separate_runs_seconds": round(cells * float(single["seconds"]), 1),  # type: ignore[arg-type]
        "grid_over_separate": round(float(grid["seconds"]) / (cells * float(single["seconds"])), 3),  # type: ignore[arg-type]
        "prefix_seconds_in_grid": round(shared, 1),
        "rerun_after_one_variant_changed": changed,
        "families": sorted(judge.get("grid", {})),
    }
    print(json.dumps(result, indent=2))
    print(f"grid of {cells} cells: {grid['seconds']} s; one cell alone {single['seconds']} s, so {cells} separate "
          f"runs {result['separate_runs_seconds']} s (grid/separate {result['grid_over_separate']}); prefix "
          f"{result['prefix_seconds_in_grid']} s computed once; after one variant changed, reran "
          f"{', '.join(changed['stages'])}")  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
