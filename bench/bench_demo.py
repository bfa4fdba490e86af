"""The demo's targets: the whole `dvc repro` from nothing (< 15 min on 2 cores, peak < 6 GB), a
second repro with no change (< 10 s), and a training-param change rerunning only downstream.

Runs in a throwaway copy of the project (pipeline, params, code; no outputs, no DVC cache), so
nothing is restored from a cache. Peak memory is the largest sum of RSS over the whole process
tree (dvc plus the stage it runs), sampled every 0.2 s.

    python bench/bench_demo.py --data-dir ../shared/data [--param-change]
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
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def project_copy(target: Path) -> Path:
    target.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, target / name)
    shutil.copytree(REPO / "src", target / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (target / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", target / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "plots", target / ".dvc" / "plots")
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    return target


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def timed_repro(cwd: Path, env: dict[str, str]) -> dict[str, object]:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(ps))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = []
    assert proc.stdout is not None
    for line in proc.stdout:
        output.append(line)
        if line.startswith("Running stage"):
            print(f"  [{time.perf_counter() - started:7.1f} s] {line.strip()}", flush=True)
    proc.wait()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - started
    if proc.returncode:
        sys.exit("dvc repro failed:\n" + "".join(output[-60:]))
    ran = [line.split("'")[1] for line in output if line.startswith("Running stage '")]
    return {"seconds": round(seconds, 1), "peak_tree_rss_gb": round(peak[0] / 2**30, 2), "stages_run": ran}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("SPO_DATA_DIR", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--param-change", action="store_true", help="also time a train.beta change")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "demo.json"))
    args = parser.parse_args()

    env = dict(os.environ, SPO_DATA_DIR=str(Path(args.data_dir).resolve()), DVC_NO_ANALYTICS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with tempfile.TemporaryDirectory(prefix="spo-demo-") as tmp:
        work = project_copy(Path(tmp) / "project")
        print("dvc repro (everything)", flush=True)
        results = {"first": timed_repro(work, env)}
        print(f"  {results['first']}", flush=True)
        print("dvc repro (no change)", flush=True)
        results["second"] = timed_repro(work, env)
        print(f"  {results['second']}", flush=True)
        if args.param_change:
            params = (work / "params.yaml").read_text()
            (work / "params.yaml").write_text(params.replace("  beta: 0.1 ", "  beta: 0.2 ", 1))
            print("dvc repro (train.beta 0.1 -> 0.2)", flush=True)
            results["train_param_change"] = timed_repro(work, env)
            print(f"  {results['train_param_change']}", flush=True)
        judge = json.loads((work / "metrics" / "judge.json").read_text())
        results["win_rates"] = {k: {f: v.get(f) for f in ("win_rate", "ci_low", "ci_high", "n", "tie_rate")}
                                for k, v in judge.items()}
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    first, second = results["first"], results["second"]
    print(f"demo: {first['seconds']:.0f} s, peak {first['peak_tree_rss_gb']} GB; "
          f"no-change repro {second['seconds']:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
