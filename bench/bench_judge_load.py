"""The OpenAI judge under load: 2,000 judgments with injected latency and errors, and its invariants.

    python bench/bench_judge_load.py [--pairs 1000] [--latency-ms 20,80] [--p500 0.05] [--p429 0.02]
                                     [--ptimeout 0.01] [--timeout 1.0] [--seed 14]

``--pairs`` distinct (prompt, a, b) pairs are judged in both orders (2 x pairs judgments, each its own
cache entry) by :class:`spo.judging.openai_judge.OpenAIJudge` with the concurrency and retry settings
of params.yaml's ``judge.openai`` (only the request timeout is lowered, to ``--timeout``, so that an
injected timeout costs seconds, not a minute), against the loopback server of tests/judge_server.py.
Every request first waits a random latency (uniform in ``--latency-ms``), then fails with
probability p500 (HTTP 500), p429 (429, ``Retry-After: 0.05``) or ptimeout (a reply that hangs
until the client gives up), else delivers a verdict.

Checked, from what the client itself asks for, receives and caches — so that no check depends on
how fast or loaded the machine is:

* every request ends judged or recorded as not judged with its reason (retries exhausted); the
  cache holds each judged request exactly once;
* the client received exactly one verdict per judged request (no retry was started after a
  verdict arrived) and none for the others;
* a verdict the server wrote after the client had given up on that call (a timeout: possible for
  any call on a loaded machine, and no client can prevent it) is counted as
  ``served_after_client_gave_up``, and there are never more of them for a request than calls the
  client abandoned;
* a rerun asks for exactly the requests not judged (none, normally) and for nothing cached.

Prints throughput, latency percentiles (per HTTP call and per judgment, retries included), retries
and wall time; writes bench/results/judge_load.json when bench/results exists (``--out`` to put it
elsewhere).  tests/test_faults.py runs the same function with ~1 ms latency.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import random
import sqlite3
import statistics
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

from judge_server import JudgeServer, Reply, hang, rate_limited, server_error, verdict  # noqa: E402

from spo.config import load_config  # noqa: E402
from spo.judging import prompts  # noqa: E402
from spo.judging.base import JudgeRequest, NotJudged, Verdict  # noqa: E402
from spo.judging.cache import JudgeCache, cache_key  # noqa: E402
from spo.judging.openai_judge import OpenAIJudge  # noqa: E402

KEY_ENV = "SPO_BENCH_JUDGE_KEY"
RETRY_AFTER = 0.05


class FaultyEndpoint:
    """The server's behaviour: latency, then 500 / 429 / timeout / verdict, drawn per request (seeded)."""

    def __init__(self, latency: tuple[float, float], p500: float, p429: float, ptimeout: float, seed: int) -> None:
        self.latency, self.p500, self.p429, self.ptimeout = latency, p500, p429, ptimeout
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.verdicts: Counter[str] = Counter()  # per request text: verdicts served
        self.injected: Counter[str] = Counter()

    def __call__(self, record: Any) -> Reply:
        content = record.body["messages"][-1]["content"]
        with self.lock:
            delay, draw = self.rng.uniform(*self.latency), self.rng.random()
        if draw < self.p500:
            kind, reply = "500", server_error(500)
        elif draw < self.p500 + self.p429:
            kind, reply = "429", rate_limited(RETRY_AFTER)
        elif draw < self.p500 + self.p429 + self.ptimeout:
            kind, reply = "timeout", hang()  # answered only once the client has given up: a failed call, retried
        else:
            kind, reply = "verdict", verdict("A")
        reply.delay = delay
        with self.lock:
            self.injected[kind] += 1
            if kind == "verdict":
                self.verdicts[content] += 1
        return reply


def _requests(pairs: int) -> list[JudgeRequest]:
    out = []
    for i in range(pairs):
        prompt, a, b = f"\n\nHuman: load question {i}?\n\nAssistant:", f"answer a{i} is longer", f"answer b{i}"
        out += [JudgeRequest(prompt, a, b, "dialogue"), JudgeRequest(prompt, b, a, "dialogue")]
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


def run_load(pairs: int = 1000, latency: tuple[float, float] = (0.02, 0.08), p500: float = 0.05, p429: float = 0.02,
             ptimeout: float = 0.01, timeout: float = 1.0, cache_dir: str | Path | None = None, seed: int = 14,
             params: str | Path = ROOT / "params.yaml", initial_backoff: float | None = None) -> dict[str, Any]:
    """Judge ``2 * pairs`` items under injected faults; assert the invariants; return the figures.

    The judge's settings are params' ``judge.openai`` but for the request ``timeout`` (and
    ``initial_backoff`` when given: the fast test's)."""
    os.environ.setdefault(KEY_ENV, "sk-bench-not-a-real-key")
    endpoint = FaultyEndpoint(latency, p500, p429, ptimeout, seed)
    requests = _requests(pairs)
    with tempfile.TemporaryDirectory() as scratch, JudgeServer(default=endpoint) as server:
        cfg = load_config(params).judge.openai.model_copy(deep=True)
        cfg.base_url, cfg.model, cfg.api_key_env = server.base_url, "load-judge", KEY_ENV
        cfg.retry.timeout = timeout
        if initial_backoff is not None:
            cfg.retry.initial_backoff = initial_backoff
        cfg.budget.max_calls = cfg.budget.max_tokens = cfg.budget.max_cost_usd = None
        cache_path = Path(cache_dir or scratch) / "judge_load_cache.sqlite"
        cache_path.unlink(missing_ok=True)
        cache = JudgeCache(cache_path)
        judge = OpenAIJudge(cfg, "v1", cache)
        call_seconds: list[float] = []
        item_seconds: list[float] = []
        received: Counter[str] = Counter()  # per request text: verdicts the client got back
        abandoned: Counter[str] = Counter()  # per request text: calls that failed on the client's side
        lock = threading.Lock()
        call_once, judge_one = judge._call_once, judge._judge_one

        def counted_call(text: str):  # noqa: ANN202 - one HTTP attempt
            t0 = time.perf_counter()
            try:
                result = call_once(text)
            except Exception:
                with lock:
                    abandoned[text] += 1
                raise
            finally:
                with lock:
                    call_seconds.append(time.perf_counter() - t0)
            with lock:
                received[text] += 1
            return result

        def timed_item(task: str, text: str, key: str):  # noqa: ANN202 - one judgment, retries included
            t0 = time.perf_counter()
            try:
                return judge_one(task, text, key)
            finally:
                with lock:
                    item_seconds.append(time.perf_counter() - t0)

        judge._call_once, judge._judge_one = counted_call, timed_item
        started = time.perf_counter()
        verdicts = judge.judge_many(requests, progress=False)
        wall = time.perf_counter() - started
        stats = judge.stats
        calls = server.calls
        max_in_flight = server.max_in_flight
        decreases, lowest = judge.limit.decreases, judge.limit.lowest
        judge.close()

        # the invariants, all from what the client asked for, received and cached
        texts = [prompts.render("v1", r) for r in requests]
        keys = [cache_key(judge.judge_id, "v1", text) for text in texts]
        assert len(set(keys)) == len(requests)
        judged = {t for t, v in zip(texts, verdicts) if isinstance(v, Verdict) and v.winner in ("A", "B")}
        missing = [v for v in verdicts if isinstance(v, NotJudged)]
        assert len(judged) + len(missing) == len(requests), "every request judged or recorded as not judged"
        attempts = cfg.retry.max_retries + 1
        assert all(v.attempts == attempts and not v.budget for v in missing), "given up only after every retry"
        with sqlite3.connect(cache_path) as conn:
            rows = conn.execute("SELECT key, COUNT(*) FROM judgments GROUP BY key").fetchall()
        judged_keys = {k for t, k in zip(texts, keys) if t in judged}
        assert {k for k, _ in rows} == judged_keys and all(n == 1 for _, n in rows), "the cache holds each verdict once"
        assert all(received[t] == 1 for t in judged), "no retry after a verdict arrived"
        assert not any(received[t] for t in texts if t not in judged), "nothing received for a request not judged"
        served_late = {t: endpoint.verdicts[t] - received[t] for t in texts}
        assert all(0 <= n <= abandoned[t] for t, n in served_late.items()), "late verdicts only for abandoned calls"
        assert stats.retries == sum(abandoned.values()) - len(missing), "every failed call retried but the last"
        per_item = Counter(received[t] for t in judged)

        rerun_cache = JudgeCache(cache_path)
        rerun = OpenAIJudge(cfg, "v1", rerun_cache)
        served_before = Counter(endpoint.verdicts)
        t0 = time.perf_counter()
        again = rerun.judge_many(requests, progress=False)
        rerun_wall = time.perf_counter() - t0
        rerun.close()
        rerun_calls = server.calls - calls
        asked_again = {t for t in texts if endpoint.verdicts[t] > served_before[t]}
        assert asked_again <= {t for t in texts if t not in judged}, "a rerun asks for nothing judged"
        assert all(v.cached for t, v in zip(texts, again) if t in judged), "a rerun reuses every verdict"

    return {
        "benchmark": "judge_load", "items": len(requests), "pairs": pairs, "orders": 2,
        "concurrency": cfg.concurrency, "max_in_flight": max_in_flight,
        "retry": {"max_retries": cfg.retry.max_retries, "initial_backoff": cfg.retry.initial_backoff,
                  "max_backoff": cfg.retry.max_backoff, "timeout": cfg.retry.timeout},
        "latency_s": list(latency), "p500": p500, "p429": p429, "retry_after_s": RETRY_AFTER, "ptimeout": ptimeout,
        "seed": seed, "http_calls": calls, "retries": stats.retries, "injected": dict(endpoint.injected),
        "wall_s": round(wall, 3), "items_per_s": round(len(requests) / wall, 1),
        "call_latency_ms": {"p50": round(1000 * _percentile(call_seconds, 0.5), 1),
                            "p95": round(1000 * _percentile(call_seconds, 0.95), 1),
                            "mean": round(1000 * statistics.fmean(call_seconds), 1)},
        "item_latency_ms": {"p50": round(1000 * _percentile(item_seconds, 0.5), 1),
                            "p95": round(1000 * _percentile(item_seconds, 0.95), 1),
                            "p99": round(1000 * _percentile(item_seconds, 0.99), 1),
                            "max": round(1000 * max(item_seconds), 1)},
        "cache_entries": len(rows), "verdicts_per_item": {str(k): v for k, v in per_item.items()},
        "not_judged": len(missing), "abandoned_calls": sum(abandoned.values()),
        "served_after_client_gave_up": sum(served_late.values()),
        "replies_written_after_client_gave_up": server.served_after_client_gave_up,
        "limit_decreases": decreases, "lowest_limit": lowest,
        "rerun_calls": rerun_calls, "rerun_wall_s": round(rerun_wall, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1000, help="distinct pairs, each judged in both orders")
    parser.add_argument("--latency-ms", default="20,80", help="uniform latency range of every reply, ms")
    parser.add_argument("--p500", type=float, default=0.05)
    parser.add_argument("--p429", type=float, default=0.02)
    parser.add_argument("--ptimeout", type=float, default=0.01)
    parser.add_argument("--timeout", type=float, default=1.0, help="the client's request timeout, s")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--out", default=None, help="default: bench/results/judge_load.json if bench/results exists")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the judge's per-retry warnings would be hundreds of lines
    low, high = (float(x) / 1000 for x in args.latency_ms.split(","))
    result = run_load(args.pairs, (low, high), args.p500, args.p429, args.ptimeout, args.timeout, seed=args.seed)
    result.update(python=platform.python_version(), machine=platform.platform(), cpus=os.cpu_count(),
                  load_average=[round(x, 2) for x in os.getloadavg()], date=dt.date.today().isoformat())
    print(f"judge under load: {result['items']} judgments ({args.pairs} pairs x 2 orders), concurrency "
          f"{result['concurrency']}, latency {args.latency_ms} ms, injected {result['injected']}")
    print(f"  wall {result['wall_s']:.2f} s, {result['items_per_s']:.1f} items/s, {result['http_calls']} HTTP calls, "
          f"{result['retries']} retries (max in flight {result['max_in_flight']})")
    print(f"  per call p50 {result['call_latency_ms']['p50']} ms, p95 {result['call_latency_ms']['p95']} ms; "
          f"per judgment p50 {result['item_latency_ms']['p50']} ms, p95 {result['item_latency_ms']['p95']} ms, "
          f"p99 {result['item_latency_ms']['p99']} ms")
    print(f"  cache {result['cache_entries']} entries, verdicts per item {result['verdicts_per_item']}, "
          f"rerun {result['rerun_calls']} calls in {result['rerun_wall_s']:.3f} s")
    out = Path(args.out) if args.out else (ROOT / "bench" / "results" / "judge_load.json"
                                           if (ROOT / "bench" / "results").is_dir() else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
