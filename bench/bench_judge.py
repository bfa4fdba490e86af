"""Benchmark the OpenAI judge's throughput against the loopback server.

    python bench/bench_judge.py [--n 100] [--latency 0.05] [--concurrency 1,8]

The scripted server (tests/judge_server.py) answers every chat completion after a fixed simulated
latency; for each concurrency level the judge scores N distinct pairs through a fresh SQLite cache
(every verdict committed as it arrives) and we report wall time and calls/s, plus the ideal
(concurrency / latency) for comparison.  Prints a table and writes bench/results/judge.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from judge_server import JudgeServer, slow  # noqa: E402

from spo.config import OpenAIJudgeConfig, RetryConfig  # noqa: E402
from spo.judging.base import JudgeRequest  # noqa: E402
from spo.judging.cache import JudgeCache  # noqa: E402
from spo.judging.openai_judge import OpenAIJudge  # noqa: E402

KEY_ENV = "SPO_BENCH_JUDGE_KEY"


def run(server: JudgeServer, n: int, concurrency: int, tag: str) -> dict:
    cfg = OpenAIJudgeConfig(base_url=server.base_url, model="bench-judge", api_key_env=KEY_ENV,
                            concurrency=concurrency, retry=RetryConfig(max_retries=0, timeout=30.0))
    requests = [JudgeRequest(f"\n\nHuman: question {tag} {i}?\n\nAssistant:", f"answer a{i}", f"answer b{i}",
                             "dialogue")
                for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        cache = JudgeCache(Path(tmp) / "cache.sqlite")
        judge = OpenAIJudge(cfg, "v1", cache)
        before = server.calls
        t0 = time.perf_counter()
        out = judge.judge_many(requests, progress=False)
        wall = time.perf_counter() - t0
        calls = server.calls - before
        t1 = time.perf_counter()
        judge.judge_many(requests, progress=False)  # all cached
        cached_wall = time.perf_counter() - t1
        judge.close()
        cache.close()
    assert all(v is not None and v.winner == "A" for v in out) and calls == n
    return {"concurrency": concurrency, "n": n, "calls": calls, "wall_s": round(wall, 3),
            "calls_per_s": round(calls / wall, 1), "cached_rerun_s": round(cached_wall, 3),
            "max_in_flight": server.max_in_flight}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "judge.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ[KEY_ENV] = "sk-bench-not-a-real-key"
    rows = []
    with JudgeServer(default=slow(args.latency)) as server:
        run(server, 8, 8, "warmup")
        for c in (int(x) for x in args.concurrency.split(",")):
            server.max_in_flight = 0
            row = run(server, args.n, c, f"c{c}")
            row["ideal_calls_per_s"] = round(c / args.latency, 1)
            rows.append(row)
    print(f"judge throughput, loopback server, simulated latency {args.latency * 1000:.0f} ms, N={args.n}")
    print(f"{'concurrency':>11} {'wall s':>8} {'calls/s':>8} {'ideal':>7} {'max in flight':>13} {'cached rerun s':>14}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['wall_s']:>8.2f} {r['calls_per_s']:>8.1f} {r['ideal_calls_per_s']:>7.1f} "
              f"{r['max_in_flight']:>13} {r['cached_rerun_s']:>14.3f}")
    result = {"benchmark": "judge_throughput", "latency_s": args.latency, "n": args.n, "rows": rows,
              "python": platform.python_version(), "machine": platform.platform(), "cpus": os.cpu_count(),
              "date": dt.date.today().isoformat()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
