"""One set of stages, two orchestrators, timed side by side: `dvc repro` on the host against the
compiled Kubeflow pipeline run by kfp.local's DockerRunner in the CPU image (no network), on the
same slice, params and seed; plus the compile time and the bare cost of a container.

Per step: the wall time dvc spends on a stage (from its "Running stage" line to the next) and
the wall time of the step's container (start to exit, recorded by spo.pipelines.local). Their
difference is the container's overhead over a plain process: the container start and teardown
and kfp's executor around the same `spo.stages.<stage>.run(cfg)`.

    make docker-start image
    python bench/bench_pipeline_containers.py [--image TAG] [--full]

Default: the test slice (100 HH rows per source split, the tiny settings of
tests/pipeline_helpers.shrink_params). --full: the whole demo (params.yaml as it is, the full
sample), about 10 minutes each way on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import read_gz, write_raw  # noqa: E402
from pipeline_helpers import DVC, _env, _project_copy, read_params, shrink_params, write_params  # noqa: E402

from spo.config import load_config  # noqa: E402
from spo.pipelines.compile import compile_pipeline  # noqa: E402
from spo.pipelines.local import run_local, summary  # noqa: E402
from spo.stages.judge import SUMMARIES  # noqa: E402


def kfp_to_dvc(params: Path) -> dict[str, str]:
    """The grid's KFP train tasks -> their dvc stages: the loop's iteration ``train@<variant>_s<seed>``
    (spo.pipelines.local names it by its cell) is dvc.yaml's matrix stage ``train@<variant>-<seed>``."""
    return {f"train@{cell.name}": f"train@{cell.variant}-{cell.seed}" for cell in load_config(params).cells()}


def stage_of(task: str, grid: dict[str, str]) -> str:
    """The dvc stage a KFP task runs (``grid``: :func:`kfp_to_dvc`)."""
    return grid.get(task, task.replace("-", "_"))


def slice_of(shared: Path, target: Path, rows: int) -> Path:
    for split in ("train", "test"):
        write_raw(target, "hh", split, read_gz(shared / "hh" / f"{split}.jsonl.gz", limit=rows), gz=True)
    return target


def timed_dvc_repro(work: Path, env: dict[str, str]) -> dict[str, object]:
    """The whole repro's wall time and each stage's, from dvc's "Running stage" lines."""
    started = time.perf_counter()
    proc = subprocess.Popen([*DVC, "repro"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    marks: list[tuple[str, float]] = []
    output = []
    assert proc.stdout is not None
    for line in proc.stdout:
        output.append(line)
        if line.startswith("Running stage '"):
            marks.append((line.split("'")[1], time.perf_counter()))
            print(f"  dvc [{marks[-1][1] - started:6.1f} s] {line.strip()}", flush=True)
    proc.wait()
    ended = time.perf_counter()
    if proc.returncode:
        sys.exit("dvc repro failed:\n" + "".join(output[-60:]))
    stages = {name: round((marks[i + 1][1] if i + 1 < len(marks) else ended) - at, 2)
              for i, (name, at) in enumerate(marks)}
    return {"seconds": round(ended - started, 1), "stages": stages}


def container_floor(image: str, repeats: int = 5) -> dict[str, float]:
    """The bare cost of a step's container: `docker run` of `true`, and of importing the runtime."""
    def median_of(command: list[str]) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run(["docker", "run", "--rm", "--network=none", image, *command], check=True,
                           stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - started)
        return round(statistics.median(times), 2)

    return {"docker_run_true_s": median_of(["true"]),
            "docker_run_import_runtime_s": median_of(["python3", "-c", "import spo.pipelines.runtime, kfp.dsl"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("SPO_DATA_DIR", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--image", default=None, help="the CPU image (default: build/image-cpu.ref)")
    parser.add_argument("--full", action="store_true", help="the whole demo instead of the test slice")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    image = args.image or (REPO / "build" / "image-cpu.ref").read_text().strip()
    name = "pipeline_containers_full" if args.full else "pipeline_containers"
    out = Path(args.out or REPO / "bench" / "results" / f"{name}.json")

    with tempfile.TemporaryDirectory(prefix="spo-kfp-bench-") as tmp:
        tmp_path = Path(tmp)
        data = Path(args.data_dir).resolve() if args.full else slice_of(Path(args.data_dir), tmp_path / "slice", 100)
        work = _project_copy(tmp_path)
        if not args.full:
            write_params(work, shrink_params(read_params(work)))
        grid = kfp_to_dvc(work / "params.yaml")

        started = time.perf_counter()
        pipeline = compile_pipeline(tmp_path / "pipeline.yaml", params=work / "params.yaml",
                                    platform=REPO / "configs/platform/local.yaml", image=image)
        compile_in_process = time.perf_counter() - started
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "spo", "pipeline", "compile", "-p", str(work / "params.yaml"),
                        "--image", image, "-o", str(tmp_path / "cli.yaml")], check=True, env=_env(data),
                       stdout=subprocess.DEVNULL)
        compile_cli = time.perf_counter() - started
        print(f"compile: {compile_in_process:.2f} s in process, {compile_cli:.2f} s as `spo pipeline compile`")

        print("dvc repro", flush=True)
        dvc = timed_dvc_repro(work, _env(data))
        print(f"kfp.local DockerRunner ({image})", flush=True)
        run = run_local(pipeline, tmp_path / "kfp", data_dir=data, runner="docker")
        kfp = summary(run)
        judge_dvc = json.loads((work / "metrics" / "judge.json").read_text())
        judge_kfp = json.loads(run.output("judge", "metrics").read_text())
        compared = [k for k in judge_dvc if k not in SUMMARIES]  # each cell's comparisons, not the summaries
        same_win_rates = set(judge_dvc) == set(judge_kfp) and all(
            judge_dvc[k]["win_rate"] == judge_kfp[k]["win_rate"] for k in compared)

    order = list(dvc["stages"])  # the pipeline's order, as dvc ran it; configure (KFP only) first
    steps = {}
    for task, seconds in sorted(run.step_seconds.items(), key=lambda item: order.index(stage_of(item[0], grid))
                                if stage_of(item[0], grid) in order else -1):
        stage = stage_of(task, grid)
        dvc_s = dvc["stages"].get(stage)
        steps[task] = {"kfp_container_s": round(seconds, 2), "dvc_stage_s": dvc_s,
                       "overhead_s": round(seconds - dvc_s, 2) if dvc_s is not None else None}
    overheads = [s["overhead_s"] for s in steps.values() if s["overhead_s"] is not None]
    results = {
        "image": image, "slice": "full demo" if args.full else "test slice (100 rows per split, tiny settings)",
        "compile_s": {"in_process": round(compile_in_process, 2), "cli": round(compile_cli, 2)},
        "dvc_repro_s": dvc["seconds"], "kfp_docker_s": kfp["seconds"],
        "kfp_outside_containers_s": round(kfp["seconds"] - sum(run.step_seconds.values()), 1),
        "steps": steps,
        "overhead_per_step_s": {"median": round(statistics.median(overheads), 2), "max": max(overheads),
                                "min": min(overheads)},
        "container_floor": container_floor(image),
        "same_win_rates": same_win_rates,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"{'step':20} {'dvc s':>8} {'kfp s':>8} {'overhead':>9}")
    for task, s in steps.items():
        print(f"{task:20} {s['dvc_stage_s'] if s['dvc_stage_s'] is not None else '-':>8} "
              f"{s['kfp_container_s']:>8} {s['overhead_s'] if s['overhead_s'] is not None else '-':>9}")
    print(f"pipeline in containers: {kfp['seconds']:.0f} s vs dvc repro {dvc['seconds']:.0f} s; per-step "
          f"overhead median {results['overhead_per_step_s']['median']} s; compile {compile_in_process:.1f} s; "
          f"same win rates: {same_win_rates} -> {out}")


def plot(results: dict, path: Path) -> None:
    """Per-step wall time, dvc beside kfp-in-a-container."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [t for t, s in results["steps"].items() if s["dvc_stage_s"] is not None]
    x = range(len(steps))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.bar([i - 0.2 for i in x], [results["steps"][t]["dvc_stage_s"] for t in steps], 0.4, label="dvc repro")
    ax.bar([i + 0.2 for i in x], [results["steps"][t]["kfp_container_s"] for t in steps], 0.4,
           label="kfp.local DockerRunner")
    ax.set_xticks(list(x), steps, rotation=30, ha="right")
    ax.set_ylabel("wall time per step (s)")
    ax.set_title(f"{results['slice']}: dvc {results['dvc_repro_s']:.0f} s, "
                 f"in containers {results['kfp_docker_s']:.0f} s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
