"""Benchmark the key-phrase extractors on the HH responses.

    python bench/bench_keywords.py [--rows N] [--repeat K] [--methods rake,yake,...]

Loads the HH rows of ../shared/data/hh/{train,test}.jsonl.gz (or $SPO_SHARED_DATA/hh), takes
the final assistant turn of chosen and rejected, and measures side by side on one core:
bare rake-nltk (same stop words and regex tokenizers, extract_keywords_from_text +
get_ranked_phrases_with_scores), and each of our methods via its extractor object (spans
included); then each method through the stage's row path (KeywordRunner: extraction + JSON
lines + statistics) in-process and on a 2-worker fork pool started once (start-up reported
separately).  Prints a table and writes bench/results/keywords.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gzip
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from spo.config import RakeOptions  # noqa: E402
from spo.keywords import get_extractor, load_stopwords  # noqa: E402
from spo.keywords.parallel import KeywordRunner  # noqa: E402
from spo.keywords.rake import make_rake  # noqa: E402

METHODS = ("rake", "yake", "positionrank", "random")


def data_dir() -> Path:
    path = ROOT.parent / "shared" / "data"
    if not path.is_dir() and os.environ.get("SPO_SHARED_DATA"):
        path = Path(os.environ["SPO_SHARED_DATA"])
    return path


def load_rows(limit: int | None) -> list[tuple[str, str, str]]:
    rows = []
    for split in ("train", "test"):
        with gzip.open(data_dir() / "hh" / f"{split}.jsonl.gz", "rt", encoding="utf-8") as handle:
            for i, line in enumerate(handle):
                row = json.loads(line)
                chosen = row["chosen"].rsplit("\n\nAssistant:", 1)[-1].strip()
                rejected = row["rejected"].rsplit("\n\nAssistant:", 1)[-1].strip()
                rows.append((f"{split}-{i}", chosen, rejected))
    return rows[:limit] if limit else rows


def extract_all(extract: Callable[[str], object], texts: list[str]) -> None:
    for text in texts:
        extract(text)


def runner_time(method: str, rows: list[tuple[str, str, str]], workers: int, repeat: int,
                chunk_size: int) -> tuple[float, float]:
    """The pool's start-up, and the best of `repeat` passes over `rows` through the stage's row path."""
    t0 = time.perf_counter()
    with KeywordRunner(method, {"seed": 0}, workers=workers, chunk_size=chunk_size) as runner:
        startup = time.perf_counter() - t0
        best = float("inf")
        for _ in range(repeat):
            t1 = time.perf_counter()
            for _lines, _stats in runner.run(rows):
                pass
            best = min(best, time.perf_counter() - t1)
    return startup, best


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None, help="use the first N rows (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="best of K timings for rake and bare rake")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "keywords.json"))
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]

    rows = load_rows(args.rows)
    texts = [t for _, c, r in rows for t in (c, r)]
    n = len(texts)
    print(f"{len(rows)} rows, {n} responses, {sum(map(len, texts))} characters; cpu_count={os.cpu_count()}")

    stop = load_stopwords("english")
    bare = make_rake(stop, RakeOptions())

    def run_bare() -> None:
        for text in texts:
            bare.extract_keywords_from_text(text)
            bare.get_ranked_phrases_with_scores()

    run_bare()  # warm-up
    bare_s = best_of(args.repeat, run_bare)
    results: dict = {
        "bare_rake_nltk": {"seconds": bare_s, "responses_per_second": n / bare_s},
        "methods": {},
    }
    print(f"bare rake-nltk: {n / bare_s:8.0f} responses/s")

    for method in methods:
        repeat = args.repeat if method in ("rake", "random") else 1
        run_one = functools.partial(extract_all, get_extractor(method, seed=0).extract, texts)
        run_one() if repeat > 1 else None  # warm-up
        one_s = best_of(repeat, run_one)
        entry = {"one_core_seconds": one_s, "one_core_rps": n / one_s, "ratio_to_bare": (n / one_s) / (n / bare_s)}

        _, path1_s = runner_time(method, rows, 1, repeat, args.chunk_size)
        startup2, path2_s = runner_time(method, rows, args.workers, repeat, args.chunk_size)
        entry.update(
            runner_1_seconds=path1_s,
            runner_1_rps=n / path1_s,
            runner_n_seconds=path2_s,
            runner_n_rps=n / path2_s,
            runner_n_workers=args.workers,
            pool_startup_seconds=startup2,
            speedup=path1_s / path2_s,
            speedup_vs_extractor=one_s / path2_s,
        )
        results["methods"][method] = entry
        print(
            f"{method:>12}: 1 core {n / one_s:8.0f}/s ({entry['ratio_to_bare']:.2f}x bare) | "
            f"runner 1 worker {n / path1_s:8.0f}/s | {args.workers} workers {n / path2_s:8.0f}/s "
            f"(x{entry['speedup']:.2f}; pool start {startup2 * 1000:.0f} ms)",
            flush=True,
        )

    print()
    header = (f"| method | 1 core resp/s | ratio to bare rake-nltk | runner 1 worker resp/s "
              f"| runner {args.workers} workers resp/s | speed-up | pool start-up |")
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| bare rake-nltk | {n / bare_s:.0f} | 1.00 | | | | |")
    for method, e in results["methods"].items():
        print(
            f"| {method} | {e['one_core_rps']:.0f} | {e['ratio_to_bare']:.2f} | {e['runner_1_rps']:.0f} | "
            f"{e['runner_n_rps']:.0f} | {e['speedup']:.2f}x | {e['pool_startup_seconds'] * 1000:.0f} ms |"
        )
    results.update(
        rows=len(rows),
        responses=n,
        chunk_size=args.chunk_size,
        repeat=args.repeat,
        cpu_count=os.cpu_count(),
        python=platform.python_version(),
        machine=platform.platform(),
        date=dt.date.today().isoformat(),
        command="python bench/bench_keywords.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
