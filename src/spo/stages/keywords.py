"""Stage `keywords`: ranked key phrases (with character spans) of every chosen/rejected response.

Reads ``{in_dir}/{train,eval,test}.jsonl`` (those present; rows need ``id``, ``chosen`` and
``rejected``), writes ``{out_dir}/{split}.jsonl`` with one line per input row in input order::

    {"id": ..., "method": "rake", "chosen": [{"phrase", "score", "spans": [[s, e], ...]}, ...],
     "rejected": [...]}

plus ``provenance.json`` and a metrics JSON.  Rows are processed on a fork pool of
``workers`` processes (0: one per core, 1: in-process) in chunks of ``chunk_size`` rows; the
output does not depend on the worker count.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from spo.config import SPLITS, SpoConfig
from spo.errors import InputError
from spo.io import atomic_dir, atomic_open, read_jsonl, tree_sha256, write_json, write_provenance
from spo.keywords import method_options
from spo.keywords.parallel import KeywordRunner, Row, Stat

log = logging.getLogger("spo.keywords")


def _rows(path: Path) -> list[Row]:
    rows: list[Row] = []
    for line_no, row in enumerate(read_jsonl(path), start=1):
        for key in ("id", "chosen", "rejected"):
            if key not in row:
                raise InputError(f"{path}: row {line_no}: missing field {key!r}")
        if not isinstance(row["chosen"], str) or not isinstance(row["rejected"], str):
            raise InputError(f"{path}: row {line_no}: chosen/rejected must be strings")
        rows.append((row["id"], row["chosen"], row["rejected"]))
    return rows


def _metrics(stats: list[Stat], n_rows: int, method: str, workers: int, seconds: float) -> dict[str, Any]:
    counts = [n for n, _, _ in stats]
    fractions = [covered / length if length else 0.0 for _, covered, length in stats]
    return {
        "method": method,
        "rows": n_rows,
        "responses": len(stats),
        "phrases_per_response_mean": statistics.fmean(counts) if counts else 0.0,
        "phrases_per_response_median": statistics.median(counts) if counts else 0.0,
        "responses_without_phrases": sum(1 for n in counts if n == 0),
        "covered_char_fraction_mean": statistics.fmean(fractions) if fractions else 0.0,
        "workers": workers,
        "seconds": round(seconds, 3),
        "responses_per_second": round(len(stats) / seconds, 1) if seconds > 0 else None,
    }


def run(cfg: SpoConfig) -> dict[str, Any]:
    """Extract every split's phrases on one worker pool into one folder written whole or not at all,
    then the metrics; the extractor's option errors become InputErrors naming the settings."""
    kc = cfg.keywords
    in_dir, out_dir = Path(kc.in_dir), Path(kc.out_dir)
    splits = [s for s in SPLITS if (in_dir / f"{s}.jsonl").is_file()]
    if not splits:
        raise InputError(f"{in_dir}: no {'/'.join(SPLITS)}.jsonl to read")
    options = method_options(kc)
    options["seed"] = cfg.seed
    started = time.perf_counter()
    data = {split: _rows(in_dir / f"{split}.jsonl") for split in splits}
    total_rows = sum(len(rows) for rows in data.values())

    all_stats: list[Stat] = []
    per_split: dict[str, dict[str, int]] = {}
    try:
        runner = KeywordRunner(kc.method, options, kc.workers, kc.chunk_size)
    except ValueError as err:  # the extractor's options: stop words (language or file), method settings
        raise InputError(f"keywords (method {kc.method}, keywords.stopwords {kc.stopwords!r}): {err}") from None
    # whole or not at all: a killed run leaves the last complete folder, never splits of two runs
    with atomic_dir(out_dir) as building, runner, tqdm(
        total=total_rows, desc=f"keywords ({kc.method})", unit="row", mininterval=1.0
    ) as bar:
        for split, rows in data.items():
            n_lines = 0
            with atomic_open(building / f"{split}.jsonl") as handle:
                for lines, stats in runner.run(rows, progress=bar.update):
                    for line in lines:
                        handle.write(line)
                        handle.write("\n")
                    n_lines += len(lines)
                    all_stats.extend(stats)
            per_split[split] = {"rows": n_lines}
        workers = runner.workers
        write_provenance(
            building, stage="keywords", config_hash=cfg.section_hash("keywords"), inputs=tree_sha256(in_dir)
        )
    seconds = time.perf_counter() - started

    metrics = _metrics(all_stats, total_rows, kc.method, workers, seconds)
    metrics["splits"] = per_split
    write_json(kc.metrics_file, metrics)
    log.info(
        "keywords: read %d rows (%d responses) from %s [%s], wrote %s/{%s}.jsonl with method=%s "
        "(%.1f phrases per response) in %.1f s on %d worker(s) (%.0f responses/s)",
        total_rows, len(all_stats), in_dir, ", ".join(splits), out_dir, ",".join(splits), kc.method,
        metrics["phrases_per_response_mean"], seconds, workers, metrics["responses_per_second"] or 0.0,
    )
    return metrics
