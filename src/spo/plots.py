"""DVC plot data: the run's curves and win rates as small CSV files for ``dvc plots show/diff``.

A policy's ``metrics.jsonl`` mixes train and eval lines in a format DVC plots cannot read, and
the win rates live in one nested JSON; the report stage rewrites them here, one file per policy
in one folder per plot, so the top-level ``plots:`` of dvc.yaml names a folder (whatever the
variants are) and ``dvc plots diff`` compares experiments file by file::

    plots/loss_parts/<policy>.csv       step, loss, loss_align, loss_degree_w, loss_degree_l  (train)
    plots/reward_accuracy/<policy>.csv  step, reward_accuracy, reward_margin                  (eval)
    plots/degree_accuracy/<policy>.csv  level, accuracy_w, accuracy_l    (last eval; SPO policies)
    plots/win_rates.csv                 comparison, a, b, win_rate, ci_low, ci_high, n, tie_rate  (per cell)
    plots/grid.csv                      family, loss, spo, opponent, seeds, n, win_rate, ci_low, ci_high,
                                        seed_sd, tie_rate  (the grid: each family pooled over its seeds)

Both win-rate files are drawn with their intervals by the custom template
``.dvc/plots/win_rate_interval.json``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from spo.io import atomic_open

LOSS_PARTS = ("loss", "loss_align", "loss_degree_w", "loss_degree_l")
WIN_RATE_COLUMNS = ("comparison", "a", "b", "win_rate", "ci_low", "ci_high", "n", "tie_rate")
GRID_COLUMNS = ("family", "loss", "spo", "opponent", "seeds", "n", "win_rate", "ci_low", "ci_high", "seed_sd",
                "tie_rate")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def degree_levels(record: dict[str, Any], side: str) -> list[int]:
    """The levels a metrics record has per-level degree accuracy for, on one side (w or l)."""
    prefix = f"degree/accuracy_{side}/level_"
    return sorted(int(k[len(prefix):]) for k in record if k.startswith(prefix) and k[len(prefix):].isdigit())


def _write_csv(path: Path, header: tuple[str, ...] | list[str], rows: list[list[Any]]) -> None:
    with atomic_open(path) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def policy_plots(name: str, lines: list[dict[str, Any]], plots_dir: Path) -> list[Path]:
    """The three per-policy files (those with data) from one policy's metrics.jsonl lines."""
    written: list[Path] = []
    train = [r for r in lines if r.get("split") == "train" and _finite(r.get("step"))]
    evals = [r for r in lines if r.get("split") == "eval" and _finite(r.get("step"))]
    rows = [[r["step"], *(r.get(k) if _finite(r.get(k)) else 0.0 for k in LOSS_PARTS)] for r in train]
    if rows:
        written.append(plots_dir / "loss_parts" / f"{name}.csv")
        _write_csv(written[-1], ("step", *LOSS_PARTS), rows)
    rows = [[r["step"], r["rewards/accuracies"], r.get("rewards/margins")]
            for r in evals if _finite(r.get("rewards/accuracies"))]
    if rows:
        written.append(plots_dir / "reward_accuracy" / f"{name}.csv")
        _write_csv(written[-1], ("step", "reward_accuracy", "reward_margin"), rows)
    last = evals[-1] if evals else (train[-1] if train else {})
    rows = []
    for level in sorted({lvl for side in ("w", "l") for lvl in degree_levels(last, side)}):
        cells = [last.get(f"degree/accuracy_{side}/level_{level}") for side in ("w", "l")]
        rows.append([level, *(c if _finite(c) else "" for c in cells)])
    if rows:
        written.append(plots_dir / "degree_accuracy" / f"{name}.csv")
        _write_csv(written[-1], ("level", "accuracy_w", "accuracy_l"), rows)
    return written


def win_rate_plot(judge_metrics: dict[str, Any], plots_dir: Path) -> Path | None:
    """plots/win_rates.csv from metrics/judge.json (comparisons with a win rate only)."""
    rows = [
        [name, r.get("a", ""), r.get("b", ""), r["win_rate"], r.get("ci_low"), r.get("ci_high"), r.get("n"),
         r.get("tie_rate")]
        for name, r in judge_metrics.items()
        if isinstance(r, dict) and _finite(r.get("win_rate"))
    ]
    if not rows:
        return None
    path = plots_dir / "win_rates.csv"
    _write_csv(path, WIN_RATE_COLUMNS, rows)
    return path


def grid_plot(families: list[tuple[str, dict[str, Any]]], plots_dir: Path) -> Path | None:
    """plots/grid.csv from the rows of the results table (``families``: :func:`spo.results.grid_rows`
    of metrics/judge.json's ``grid`` block), so ``dvc plots`` draws the numbers ``spo results``
    prints; seeds is how many, seed_sd is empty with one seed."""
    rows = [[name, f.get("loss", ""), "yes" if f.get("spo") else "no", f.get("b", ""), len(f.get("seeds") or []),
             f.get("n"), f["win_rate"], f.get("ci_low"), f.get("ci_high"),
             f["seed_sd"] if _finite(f.get("seed_sd")) else "", f.get("tie_rate")]
            for name, f in families if _finite(f.get("win_rate"))]
    if not rows:
        return None
    path = plots_dir / "grid.csv"
    _write_csv(path, GRID_COLUMNS, rows)
    return path
