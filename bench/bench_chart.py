"""What the Helm chart costs at install and in CI: Helm's engine rendering and linting charts/spo,
strict validation of the rendered objects, the checkov scan, and the upload hook's own command
(params, compile, upload) against a loopback KFP API — first install, then an upgrade that
changes nothing.

    make setup checkov
    python bench/bench_chart.py [--repeat 5]

Writes bench/results/chart.json; docs/benchmarks.md records the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from chart_helpers import CHART, KUBERNETES_VERSION, objects, one, render, write_manifests  # noqa: E402
from kfp_api_server import KfpApiServer  # noqa: E402
from test_chart import CASES, CHECKOV, _run_pod  # noqa: E402


def timed(fn, repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4), "runs": repeat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import helm_python as helm
    import kubernetes_validate

    results: dict[str, object] = {"machine": f"{platform.node()} {platform.machine()}, {platform.python_version()}",
                                  "date": time.strftime("%Y-%m-%d")}
    results["render_default"] = timed(lambda: render({}), args.repeat)
    results["lint_default"] = timed(lambda: helm.lint(str(CHART), values={}, strict=True), args.repeat)
    docs = [d for values in CASES.values() for d in objects(values)]
    results["objects"] = len(docs)
    results["validate_all"] = timed(lambda: [kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
                                             for d in docs], args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "manifests"
        for case, values in CASES.items():
            write_manifests(objects(values), folder / case)
        command = [str(CHECKOV), "-d", str(folder), "--framework", "kubernetes", "-o", "json", "--compact",
                   "--skip-download", "--quiet", "--soft-fail"]
        results["checkov_scan"] = timed(lambda: subprocess.run(command, capture_output=True, check=True), 1)
        values = {"run": {"schedule": "0 0 3 * * *"}}
        rendered = objects(values)
        hook, config = one(rendered, "Job"), one(rendered, "ConfigMap")["data"]
        with KfpApiServer("bench-token") as server:
            hook_times = []
            for attempt in range(3):  # install, then two upgrades that change nothing
                started = time.perf_counter()
                done = _run_pod(hook, config, Path(tmp) / f"hook-{attempt}", server.url, "bench-token")
                hook_times.append(round(time.perf_counter() - started, 2))
                assert done.returncode == 0, done.stderr[-2000:]
            results["hook_seconds"] = {"install": hook_times[0], "upgrades_unchanged": hook_times[1:],
                                       "uploads": len(server.calls("POST",
                                                                   r"/apis/v2beta1/pipelines/upload(_version)?")),
                                       "recurring_runs": len(server.state.recurring_runs)}
    out = REPO / "bench" / "results" / "chart.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    print(f"chart: render {results['render_default']['median_s'] * 1000:.0f} ms, lint "
          f"{results['lint_default']['median_s'] * 1000:.0f} ms, {results['objects']} objects validated in "
          f"{results['validate_all']['median_s']:.2f} s, checkov {results['checkov_scan']['median_s']:.1f} s, hook "
          f"{hook_times[0]:.1f} s then {hook_times[1]:.1f} s -> {out}")


if __name__ == "__main__":
    main()
