"""Stage ``degrees``: validated rows + ranked key phrases -> N nested degree variants per response.

Reads ``{in_dir}/{split}.jsonl`` and ``{keywords_dir}/{split}.jsonl`` (one keywords line per row,
same order) for every split present, writes ``{out_dir}/{split}.jsonl`` with, per row and side,
the levels, labels, removed character spans, phrases removed, phrase count, the ``distinct``
flag and the removed fraction per level; a provenance record; DVC metrics at
``degrees.metrics_file`` and a box plot of the removed fraction per level beside it.

Then the shortcut audit (:mod:`spo.degree_audit`, ``degrees.audit``): on the train split's
responses with distinct levels, how well content-free probes tell the level.  Its result goes
into the metrics and a bar chart beside them; a formatting probe more than
``max_above_chance`` above chance is logged as a warning or, with ``on_shortcut: fail``, stops
the stage after everything is written.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from spo.config import SPLITS, DegreeAuditConfig, SpoConfig
from spo.degree_audit import FORMATTING_PROBES, AuditResult, audit
from spo.degrees import TOKEN_RE, build_degree_variants
from spo.errors import InputError, StageFailed
from spo.io import (
    atomic_dir,
    check_aligned,
    read_jsonl,
    save_figure,
    tree_sha256,
    write_json,
    write_jsonl,
    write_provenance,
)

log = logging.getLogger("spo.degrees")
SIDES = ("chosen", "rejected")
PLOT_NAME = "degrees_removed_fraction.png"
AUDIT_PLOT_NAME = "degrees_shortcut_audit.png"


def _phrases(entry: dict[str, Any], side: str, where: str) -> list[str]:
    """The ranked phrases of one side, de-duplicated case-insensitively (best rank kept)."""
    items = entry.get(side)
    if not isinstance(items, list):
        raise InputError(f"{where}: field {side!r} must be a list of phrases")
    out: list[str] = []
    seen: set[tuple[str, ...]] = set()
    for item in items:
        phrase = item.get("phrase") if isinstance(item, dict) else item
        if not isinstance(phrase, str):
            raise InputError(f"{where}: {side} phrase {item!r} has no string 'phrase'")
        key = tuple(t.casefold() for t in TOKEN_RE.findall(phrase))
        if key in seen:
            continue
        seen.add(key)
        out.append(phrase)
    return out


_Split = tuple[Path, list[dict[str, Any]], Path, list[dict[str, Any]]]  # rows file, rows, keywords file, keywords


def _read_inputs(in_dir: Path, kw_dir: Path) -> dict[str, _Split]:
    """Every split present with its keywords, checked line for line aligned: a missing or shifted
    keywords file would pair responses with another row's phrases."""
    inputs: dict[str, _Split] = {}
    for split in SPLITS:
        rows_path = in_dir / f"{split}.jsonl"
        if not rows_path.is_file():
            continue
        kw_path = kw_dir / f"{split}.jsonl"
        if not kw_path.is_file():
            raise InputError(f"{kw_path}: missing keywords file for {rows_path}")
        rows, keywords = read_jsonl(rows_path), read_jsonl(kw_path)
        check_aligned(rows_path, rows, kw_path, keywords, "keywords")
        inputs[split] = (rows_path, rows, kw_path, keywords)
    if not inputs:
        raise InputError(f"{in_dir}: no split file ({', '.join(f'{s}.jsonl' for s in SPLITS)}) found")
    return inputs


def _summary_stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    return math.fsum(values) / len(values), float(statistics.median(values))


@dataclass
class _Tally:
    """What the metrics and the audit need from the variants, gathered while they stream to disk
    (the variants themselves are never held in memory): per level, every response's removed
    fraction and phrase count; per side, the responses whose levels are not distinct; and the
    audit split's distinct responses as (row id, levels)."""

    n_levels: int
    fractions: list[list[float]] = field(init=False)
    removed_counts: list[list[int]] = field(init=False)
    not_distinct: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIDES, 0))
    audited: list[tuple[str, list[str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fractions = [[] for _ in range(self.n_levels)]
        self.removed_counts = [[] for _ in range(self.n_levels)]


def _variants(split: str, inputs: _Split, tally: _Tally, audited: bool) -> Iterator[dict[str, Any]]:
    """One output line per row, both sides' nested variants; ``audited``: keep this split's distinct
    responses for the shortcut audit."""
    rows_path, rows, kw_path, keywords = inputs
    n_levels = tally.n_levels
    for line, (row, entry) in enumerate(
        tqdm(list(zip(rows, keywords)), desc=f"degrees {split}", unit=" rows", leave=False, disable=None),
        start=1,
    ):
        out: dict[str, Any] = {"id": row["id"], "n_levels": n_levels}
        for side in SIDES:
            text = row.get(side)
            if not isinstance(text, str):
                raise InputError(f"{rows_path}:{line}: field {side!r} must be a string")
            phrases = _phrases(entry, side, f"{kw_path}:{line}")
            dv = build_degree_variants(text, phrases, n_levels)
            out[side] = dv.to_json()
            if not dv.distinct:
                tally.not_distinct[side] += 1
            elif audited:
                tally.audited.append((str(row["id"]), dv.levels))
            for k in range(n_levels):
                tally.fractions[k].append(dv.removed_fraction[k])
                tally.removed_counts[k].append(dv.phrases_removed[k])
        yield out


def _metrics(tally: _Tally, per_split: dict[str, int]) -> dict[str, Any]:
    """The DVC metrics: counts, the responses whose levels are not distinct, and per level the
    removed fraction (mean and median) and phrases removed (mean)."""
    rows_total = sum(per_split.values())
    not_distinct = tally.not_distinct
    metrics: dict[str, Any] = {
        "n_levels": tally.n_levels,
        "rows": rows_total,
        "responses": 2 * rows_total,
        "splits": per_split,
        "responses_not_distinct": {
            **{side: {"count": not_distinct[side], "fraction": not_distinct[side] / rows_total if rows_total else 0.0}
               for side in SIDES},
            "total": {
                "count": sum(not_distinct.values()),
                "fraction": sum(not_distinct.values()) / (2 * rows_total) if rows_total else 0.0,
            },
        },
    }
    for k in range(tally.n_levels):
        mean, median = _summary_stats(tally.fractions[k])
        counts = tally.removed_counts[k]
        metrics[f"level_{k}"] = {
            "removed_fraction_mean": mean,
            "removed_fraction_median": median,
            "phrases_removed_mean": math.fsum(counts) / len(counts) if counts else 0.0,
        }
    return metrics


def run(cfg: SpoConfig) -> dict[str, Any]:
    """Write every split's variants (whole or not at all), then the metrics, the plots and the
    shortcut audit; a shortcut stops the stage, when asked to, only after everything is written."""
    started = time.perf_counter()
    dc = cfg.degrees
    in_dir, kw_dir, out_dir = Path(dc.in_dir), Path(dc.keywords_dir), Path(dc.out_dir)
    inputs = _read_inputs(in_dir, kw_dir)
    tally = _Tally(dc.n_levels)
    audit_split = "train" if "train" in inputs else next(iter(inputs))
    per_split: dict[str, int] = {}
    with atomic_dir(out_dir) as building:  # whole or not at all: a killed run leaves the last complete folder
        for split in inputs:
            variants = _variants(split, inputs[split], tally, audited=split == audit_split and dc.audit.enabled)
            per_split[split] = write_jsonl(building / f"{split}.jsonl", variants)
        write_provenance(
            building,
            stage="degrees",
            config_hash=cfg.section_hash("degrees"),
            inputs={"rows": tree_sha256(in_dir), "keywords": tree_sha256(kw_dir)},
        )

    metrics = _metrics(tally, per_split)
    metrics_path = Path(dc.metrics_file)
    audit_plot = metrics_path.parent / AUDIT_PLOT_NAME
    shortcut = _audit(dc.audit, audit_split, tally.audited, audit_plot) if dc.audit.enabled else None
    if shortcut is None or not shortcut["probes"]:  # a declared output (DVC, KFP): it says why there is no audit
        _plot_no_audit(audit_plot, "disabled (degrees.audit.enabled: false)" if not dc.audit.enabled
                       else f"no {audit_split} response with distinct levels in both halves")
    if shortcut is not None:
        metrics["shortcut_audit"] = shortcut
    write_json(metrics_path, metrics)
    plot_path = metrics_path.parent / PLOT_NAME
    _plot(tally.fractions, plot_path)

    seconds = time.perf_counter() - started
    rows_total = metrics["rows"]
    log.info(
        "degrees: read %d rows (%s) from %s and keywords from %s, wrote %d x %d levels to %s, "
        "%d of %d responses not distinct, metrics %s (%.1f s)",
        rows_total, " / ".join(f"{n} {s}" for s, n in per_split.items()), in_dir, kw_dir,
        2 * rows_total, dc.n_levels, out_dir, metrics["responses_not_distinct"]["total"]["count"],
        2 * rows_total, metrics_path, seconds,
    )
    if shortcut is not None and shortcut["shortcuts"] and dc.audit.on_shortcut == "fail":
        raise StageFailed(_shortcut_message(shortcut, metrics_path))
    return {**metrics, "plot": str(plot_path), "seconds": round(seconds, 3)}


def _shortcut_message(shortcut: dict[str, Any], metrics_path: Path) -> str:
    found = ", ".join(f"{name} {100 * acc:.1f}%" for name, acc in shortcut["shortcuts"].items())
    return (f"degrees: formatting probes tell the degree level without reading the content: {found} "
            f"(chance {100 * shortcut['chance']:.1f}%, allowed +{100 * shortcut['max_above_chance']:.1f} points; "
            f"{shortcut['test_responses']} held-out {shortcut['split']} responses; see {metrics_path} and "
            "docs/degrees.md, \"The shortcut audit\")")


def _audit(ac: DegreeAuditConfig, split: str, responses: list[tuple[str, list[str]]], plot_path: Path,
           ) -> dict[str, Any] | None:
    """Run the shortcut audit, log its one-line result (a warning on a shortcut), plot it and
    return its metrics entry; None when no response has distinct levels."""
    if not responses:
        log.warning("degrees: shortcut audit skipped: no %s response has %s", split, "distinct levels")
        return None
    result: AuditResult = audit(responses, seed=ac.seed, bootstrap=ac.bootstrap)
    judged = result.test_responses >= ac.min_responses
    shortcuts = result.shortcuts(ac.max_above_chance) if judged else {}
    entry = {**result.to_json(), "split": split, "max_above_chance": ac.max_above_chance,
             "judged": judged, "shortcuts": shortcuts}
    probes = result.probes
    line = (f"degrees: shortcut audit on {result.test_responses} held-out {split} responses "
            f"(trained on {result.train_responses}): formatting probes at most "
            f"{100 * (entry['formatting_max'] or 0):.1f}%, length {100 * probes['length'].accuracy:.1f}%, "
            f"all length probes {100 * probes['length_all'].accuracy:.1f}% (chance {100 * result.chance:.1f}%)"
            if probes else f"degrees: shortcut audit: too few {split} responses to fit a probe")
    if shortcuts:
        log.warning("%s; SHORTCUT: %s", line, ", ".join(f"{n} {100 * a:.1f}%" for n, a in shortcuts.items()))
    elif probes and not judged:
        log.info("%s; not judged: fewer than %d held-out responses", line, ac.min_responses)
    else:
        log.info("%s", line)
    if probes:
        _plot_audit(result, ac.max_above_chance, plot_path)
    return entry


def _plot_no_audit(path: Path, why: str) -> None:
    """The audit's chart when there is no audit to chart: a figure that says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 1.5))
    try:
        ax.axis("off")
        ax.text(0.5, 0.5, f"Shortcut audit: {why}", ha="center", va="center")
        save_figure(fig, path)
    finally:
        plt.close(fig)


def _plot_audit(result: AuditResult, margin: float, path: Path) -> None:
    """Bar chart of every probe's held-out accuracy with its interval, chance and the allowed margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(result.probes)
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 2, 3.8))
    try:
        accuracy = [result.probes[n].accuracy for n in names]
        intervals = [result.probes[n].interval for n in names]
        low = [a - (lo if lo is not None else a) for a, (lo, _) in zip(accuracy, intervals, strict=True)]
        high = [(hi if hi is not None else a) - a for a, (_, hi) in zip(accuracy, intervals, strict=True)]
        colours = ["tab:blue" if n in FORMATTING_PROBES else "tab:gray" for n in names]
        ax.bar(range(len(names)), accuracy, yerr=[low, high], color=colours, capsize=3)
        ax.axhline(result.chance, color="black", linewidth=1, label=f"chance {100 * result.chance:.0f}%")
        ax.axhline(result.chance + margin, color="tab:red", linestyle="--", linewidth=1,
                   label=f"formatting limit +{100 * margin:.0f} points")
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1)
        ax.set_title("Shortcut audit: level from content-free features (blue: formatting, grey: length)")
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        save_figure(fig, path)
    finally:
        plt.close(fig)


def _plot(fractions: list[list[float]], path: Path) -> None:
    """Box plot of the removed fraction per level (a report, not a dependency of anything)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.2 * len(fractions) + 2, 3.5))
    try:
        ax.boxplot([f if f else [0.0] for f in fractions], showfliers=False)
        ax.set_xticks(range(1, len(fractions) + 1), [str(k) for k in range(len(fractions))])
        ax.set_xlabel("degree level")
        ax.set_ylabel("fraction of characters removed")
        ax.set_ylim(0, 1)
        ax.set_title("Removed fraction per level (chosen and rejected)")
        fig.tight_layout()
        save_figure(fig, path)
    finally:
        plt.close(fig)
