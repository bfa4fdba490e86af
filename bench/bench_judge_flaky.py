"""The judge against a flaky, rate-limited endpoint: what is left unjudged, what it costs, and what
slowing down on 429s buys.

    python bench/bench_judge_flaky.py [--pairs 300] [--latency-ms 20,80] [--rate 40] [--seed 21]

Two endpoints, each met by two clients (``OpenAIJudge`` with params.yaml's ``judge.openai``:
concurrency 8, 5 retries, backoff from 1 s with full jitter; only the request timeout is 10 s):

* ``flaky`` — the endpoint of issue 21: a third of the calls answer 429 (no Retry-After) and a
  fifth 500, drawn at random whatever the load. Before issue 21 the first item to exhaust its
  retries stopped the stage (it stopped after 290 calls, 43 items unjudged, the other comparisons
  never started).
* ``rate-limited`` — a real rate limit: a token bucket of ``--rate`` requests per second (burst 4);
  a call beyond it is answered 429 with ``retry-after-ms`` = the time until the next token, and a
  fifth of the calls still answer 500.

The clients: ``adaptive`` (this project: calls in flight halved on a 429 and regained one by one,
Retry-After pausing every new call) and ``fixed`` (before issue 21: 8 in flight whatever the
endpoint says, Retry-After only delaying the retry of the call that received it).  For each run:
HTTP calls, 429s received, retries, requests not judged after 6 attempts, wall time; then a rerun
with the same client, which asks only for the requests left.  Writes bench/results/judge_flaky.json
when bench/results exists.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from judge_server import JudgeServer, Reply, rate_limited, server_error, verdict  # noqa: E402

from spo.config import load_config  # noqa: E402
from spo.judging.base import JudgeRequest, NotJudged  # noqa: E402
from spo.judging.cache import JudgeCache  # noqa: E402
from spo.judging.openai_judge import OpenAIJudge  # noqa: E402
from spo.judging.throttle import AdaptiveLimit  # noqa: E402

KEY_ENV = "SPO_BENCH_JUDGE_KEY"


class FixedLimit(AdaptiveLimit):
    """The client before issue 21: the configured concurrency always, no shared Retry-After pause."""

    def release(self, window: int, *, throttled: bool = False, ok: bool = False,
                retry_after: float | None = None) -> None:
        super().release(window)


class Endpoint:
    """Latency, then a 500 with probability p500, else a 429 (at random, or beyond a token bucket), else a verdict."""

    def __init__(self, kind: str, latency: tuple[float, float], rate: float, seed: int) -> None:
        self.kind, self.latency, self.rate = kind, latency, rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.tokens, self.burst, self.last = 4.0, 4.0, time.monotonic()
        self.replies: Counter[str] = Counter()

    def _take_token(self) -> float | None:
        """None if a token was taken, else the seconds until the next one."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return (1.0 - self.tokens) / self.rate

    def __call__(self, record: Any) -> Reply:
        with self.lock:
            delay, draw = self.rng.uniform(*self.latency), self.rng.random()
            wait = self._take_token() if self.kind == "rate-limited" else None
        if self.kind == "flaky" and draw < 1 / 3:  # no Retry-After: the client's own backoff paces the retry
            kind, reply = "429", rate_limited(0)
            reply.headers = {}
        elif self.kind == "rate-limited" and wait is not None:
            kind, reply = "429", rate_limited(0)
            reply.headers = {"retry-after-ms": str(max(1, round(1000 * wait)))}
        elif draw > 1 - 1 / 5:
            kind, reply = "500", server_error(500)
        else:
            kind, reply = "verdict", verdict("A")
        reply.delay = delay
        with self.lock:
            self.replies[kind] += 1
        return reply


def _requests(pairs: int) -> list[JudgeRequest]:
    out = []
    for i in range(pairs):
        prompt, a, b = f"\n\nHuman: flaky question {i}?\n\nAssistant:", f"answer a{i} is longer", f"answer b{i}"
        out += [JudgeRequest(prompt, a, b, "dialogue"), JudgeRequest(prompt, b, a, "dialogue")]
    return out


def run_one(kind: str, client: str, pairs: int, latency: tuple[float, float], rate: float, seed: int,
            params: Path = ROOT / "params.yaml") -> dict[str, Any]:
    os.environ.setdefault(KEY_ENV, "sk-bench-not-a-real-key")
    endpoint = Endpoint(kind, latency, rate, seed)
    requests = _requests(pairs)
    with tempfile.TemporaryDirectory() as scratch, JudgeServer(default=endpoint) as server:
        cfg = load_config(params).judge.openai.model_copy(deep=True)
        cfg.base_url, cfg.model, cfg.api_key_env = server.base_url, "flaky-judge", KEY_ENV
        cfg.retry.timeout = 10.0
        cfg.budget.max_calls = cfg.budget.max_tokens = cfg.budget.max_cost_usd = None
        cfg.fail_fast_fraction = 1.0  # measure every item, even where more than half fail
        cache = Path(scratch) / "cache.sqlite"
        figures: dict[str, Any] = {"endpoint": kind, "client": client}
        for run in ("first", "rerun"):
            judge = OpenAIJudge(cfg, "v1", JudgeCache(cache))
            if client == "fixed":
                judge.limit = FixedLimit(cfg.concurrency)
            calls_before, replies_before = server.calls, Counter(endpoint.replies)
            started = time.perf_counter()
            out = judge.judge_many(requests, progress=False)
            wall = time.perf_counter() - started
            missing = [v for v in out if isinstance(v, NotJudged)]
            replies = endpoint.replies - replies_before
            figures[run] = {
                "wall_s": round(wall, 2), "http_calls": server.calls - calls_before,
                "answered_429": replies["429"], "answered_500": replies["500"], "verdicts": replies["verdict"],
                "retries": judge.stats.retries, "not_judged": len(missing),
                "not_judged_reasons": dict(Counter(v.reason for v in missing)),
                "limit_decreases": judge.limit.decreases, "lowest_limit": judge.limit.lowest,
            }
            judge.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=300, help="distinct pairs, each judged in both orders")
    parser.add_argument("--latency-ms", default="20,80")
    parser.add_argument("--rate", type=float, default=40.0, help="the rate-limited endpoint's requests per second")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    low, high = (float(x) / 1000 for x in args.latency_ms.split(","))
    results = []
    for kind in ("flaky", "rate-limited"):
        for client in ("fixed", "adaptive"):
            figures = run_one(kind, client, args.pairs, (low, high), args.rate, args.seed)
            results.append(figures)
            first, rerun = figures["first"], figures["rerun"]
            print(f"{kind:>12} {client:>8}: {2 * args.pairs} requests, {first['http_calls']} calls "
                  f"({first['answered_429']} x 429, {first['answered_500']} x 500), {first['not_judged']} not judged "
                  f"{first['not_judged_reasons']} in {first['wall_s']} s (lowest limit {first['lowest_limit']}); "
                  f"rerun: {rerun['http_calls']} calls, {rerun['not_judged']} left, {rerun['wall_s']} s")
    record = {"benchmark": "judge_flaky", "pairs": args.pairs, "latency_ms": args.latency_ms, "rate": args.rate,
              "seed": args.seed, "runs": results, "python": platform.python_version(), "machine": platform.platform(),
              "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
              "date": dt.date.today().isoformat()}
    out = Path(args.out) if args.out else (ROOT / "bench" / "results" / "judge_flaky.json"
                                           if (ROOT / "bench" / "results").is_dir() else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
