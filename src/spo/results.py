"""``spo results``: the run's win rates in a terminal — what `make demo` ends with.

`dvc metrics show` prints every number of every metrics file (some 300 columns); what a reader
wants after a run is the win-rate table. With a grid (params ``variants`` x ``grid.seeds``) it
comes first as the grid: one row per loss x SPO x data set against the chosen response, SFT and
the twin without SPO, each pooled over the seeds (mean win rate, 95% paired bootstrap interval over
prompts, the seeds' spread, tie rate), and SPO minus its twin pooled the same way. Then every
comparison (one per cell) with its n, win rate, 95% interval, tie rate and length-controlled win
rate, under the judge that made it and how good that judge is (the local reward judge's held-out
pair accuracy, with its Wilson interval); the SPO degree heads' accuracy on the eval pairs against
chance 1/N (per policy cell, head and level, from each policy's ``degree_confusion.json``, and per
variant pooled over its seeds) with the degrees stage's shortcut audit beside it (what a head must
beat: the length probes), and where the full report is.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from spo.errors import InputError

__all__ = ["results", "win_rate_table", "degree_accuracy", "degree_by_variant", "grid_rows", "grid_table",
           "grid_difference_table", "variant_degree_table", "judge_quality", "judge_line", "audit_line"]

HEADS = {"w": "chosen", "l": "rejected"}
OPPONENTS = ("chosen", "sft")  # the fixed sides a variant is judged against; the twin comes after them
CELL_NAME = re.compile(r"^(?P<variant>.+)_s(?P<seed>\d+)$")  # config.Cell.name: <variant>_s<seed>
GRID_HEADER = ("dataset", "loss", "SPO", "opponent", "seeds", "prompts", "win rate", "95% interval", "seed spread",
               "tie rate")
DIFFERENCE_HEADER = ("difference", "against", "seeds", "prompts", "points", "95% interval", "seed spread")
VARIANT_DEGREE_HEADER = ("variant", "head", "seeds", "accuracy", "seed spread", "chance")


def results(metrics_dir: str | Path = "metrics", reports_dir: str | Path = "reports",
            policy_dir: str | Path = "models/policy", also: tuple[str | Path, ...] = ()) -> dict[str, Any]:
    """The win rates (per cell and pooled over the grid's seeds) and the judge's quality, from the judge
    and reward_model metrics files, and the degree heads' accuracy of every policy under ``policy_dir``
    that has them, per cell and per variant.

    ``also``: the metrics folders of other runs (another data set: the paper's table is loss x SPO x
    data set, and each data set is a run of its own, with its own prefix), whose grid rows join this
    run's, each named after its data set."""
    metrics_dir, reports_dir = Path(metrics_dir), Path(reports_dir)
    judge_file = metrics_dir / "judge.json"
    if not judge_file.is_file():
        raise InputError(f"{judge_file}: no judge metrics (run the pipeline first: dvc repro)")
    judged = _read_json(judge_file)
    rows = {name: r for name, r in judged.items() if isinstance(r, dict) and "win_rate" in r}
    degrees = degree_accuracy(policy_dir)
    grid, differences = _block(judged, "grid"), _block(judged, "grid_differences")
    for other in also:  # another run's grid: its families under <data set>/<family>
        other_file = Path(other) / "judge.json"
        if not other_file.is_file():
            raise InputError(f"{other_file}: no judge metrics of the other run (give its metrics folder)")
        more = _read_json(other_file)
        for block, into in (("grid", grid), ("grid_differences", differences)):
            for name, record in _block(more, block).items():
                into[f"{record.get('dataset', Path(other).name)}/{name}"] = record
    return {"win_rates": rows, "judge": judge_quality(rows, metrics_dir / "reward_model.json"),
            "paired_differences": _block(judged, "paired_differences"),
            "grid": grid, "grid_differences": differences,
            "degrees": degrees, "degrees_by_variant": degree_by_variant(degrees),
            "shortcut_audit": _shortcut_audit(metrics_dir / "degrees.json"),
            "report": [str(reports_dir / name) for name in ("report.md", "report.html")
                       if (reports_dir / name).is_file()]}


def _block(judged: dict[str, Any], key: str) -> dict[str, Any]:
    """One summary block of judge.json, empty when the judge predates it (or did not pool anything)."""
    block = judged.get(key)
    return {k: v for k, v in block.items() if isinstance(v, dict)} if isinstance(block, dict) else {}


def degree_accuracy(policy_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Per policy and head: the eval predictions n, accuracy with its 95% interval, chance 1/N, and
    the accuracy per true level (rows of the confusion matrix: true level, columns: predicted).

    The interval is a bootstrap over eval responses (``degree_responses.json``), all N levels of a
    response resampled together: a binomial interval over the N x responses predictions would
    treat the levels of one response as independent trials and be too narrow.  A policy trained
    before the trainer wrote that file has no interval.
    """
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(policy_dir).glob("*/degree_confusion.json")):
        confusion = _read_json(path)
        responses_path = path.with_name("degree_responses.json")
        responses = _read_json(responses_path) if responses_path.is_file() else {}
        heads: dict[str, Any] = {}
        for key in HEADS:  # chosen first, whatever the file's order
            matrix = confusion.get(key)
            if not matrix:
                continue
            n = sum(sum(row) for row in matrix)
            right = sum(matrix[k][k] for k in range(len(matrix)))
            low, high = response_bootstrap(responses.get(key) or [], seed=0)
            heads[key] = {"head": HEADS[key], "n": n, "responses": len(responses.get(key) or []),
                          "accuracy": right / n if n else None, "ci_low": low, "ci_high": high,
                          "chance": 1 / len(matrix),
                          "per_level": [row[k] / sum(row) if sum(row) else None for k, row in enumerate(matrix)]}
        if heads:
            out[path.parent.name] = heads
    return out


def degree_by_variant(per_cell: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant and head: the mean eval accuracy over its cells (``<variant>_s<seed>`` policy
    folders) and the seeds' spread (sd, min, max), so a head's accuracy reads beside the grid's win
    rates; a folder not named like a cell (a policy trained before the grid) is left out."""
    found: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for cell, heads in per_cell.items():
        match = CELL_NAME.match(cell)
        if match is None:
            continue
        for key, head in heads.items():
            if head["accuracy"] is not None:
                found.setdefault(match["variant"], {}).setdefault(key, {})[int(match["seed"])] = head
    out: dict[str, dict[str, Any]] = {}
    for variant, heads in found.items():
        out[variant] = {}
        for key, by_seed in heads.items():
            seeds = sorted(by_seed)
            accuracies = [by_seed[s]["accuracy"] for s in seeds]
            out[variant][key] = {"head": HEADS[key], "seeds": seeds, "accuracy": statistics.fmean(accuracies),
                                 "per_seed": {str(s): a for s, a in zip(seeds, accuracies)},
                                 **_spread(accuracies), "chance": by_seed[seeds[0]]["chance"]}
    return out


def _spread(values: list[float]) -> dict[str, float | None]:
    """The seeds' spread as the judge reports it for the grid: sample sd (None with one seed), min, max."""
    return {"seed_sd": statistics.stdev(values) if len(values) > 1 else None,
            "seed_min": min(values), "seed_max": max(values)}


def response_bootstrap(rows: list[list[Any]], seed: int, samples: int = 2000) -> tuple[float | None, float | None]:
    """95% percentile interval of the accuracy over ``[id, right, seen]`` rows, resampling rows
    (responses); the trainer logs the same interval (spo.training.metrics)."""
    import numpy as np

    from spo.judging.statistics import bootstrap_ci

    return bootstrap_ci(np.array([r[1] / r[2] for r in rows], dtype=np.float64), samples, seed)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise InputError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a JSON object")
    return data


def judge_quality(rows: dict[str, Any], reward_file: Path) -> dict[str, Any]:
    """The judge id(s) of the comparisons and, for the local reward judge, its held-out pair accuracy
    with a 95% Wilson interval (how far its verdicts can be trusted)."""
    from spo.judging.statistics import wilson_interval

    ids = sorted({str(r.get("judge_id")) for r in rows.values() if r.get("judge_id")})
    judge: dict[str, Any] = {"id": ", ".join(ids) or None}
    if any(i.startswith("reward:") for i in ids) and reward_file.is_file():
        rm = _read_json(reward_file)
        accuracy, n = rm.get("held_out_accuracy_after"), int(rm.get("held_out_pairs") or 0)
        if accuracy is not None and n:
            low, high = wilson_interval(round(accuracy * n), n)
            judge.update(accuracy=accuracy, pairs=n, ci_low=low, ci_high=high)
    return judge


def judge_line(judge: dict[str, Any]) -> str:
    """``judge reward:models/reward: held-out pair accuracy 64.0% [58.4, 69.2] on 300 pairs (chance 50%)``."""
    line = f"judge {judge.get('id') or 'unknown'}"
    if "accuracy" in judge:
        line += (f": held-out pair accuracy {100 * judge['accuracy']:.1f}% [{100 * judge['ci_low']:.1f}, "
                 f"{100 * judge['ci_high']:.1f}] on {judge['pairs']} pairs (chance 50%)")
    return line


def _shortcut_audit(degrees_file: Path) -> dict[str, Any] | None:
    """The degrees stage's shortcut audit, when it ran (metrics/degrees.json)."""
    if not degrees_file.is_file():
        return None
    audit = _read_json(degrees_file).get("shortcut_audit")
    return audit if isinstance(audit, dict) and isinstance(audit.get("probes"), dict) else None


def audit_line(audit: dict[str, Any]) -> str:
    """One line: the best formatting probe, and the length probes a head must beat."""
    probes = audit["probes"]

    def acc(name: str) -> str:
        value = (probes.get(name) or {}).get("accuracy")
        return f"{100 * value:.1f}%" if value is not None else "–"

    formatting = audit.get("formatting_max")
    verdict = (f"SHORTCUT in {', '.join(audit['shortcuts'])}" if audit.get("shortcuts")
               else "within the limit" if audit.get("judged") else "not judged (too few responses)")
    return (f"Shortcut audit of the degree levels ({audit.get('test_responses')} held-out responses, chance "
            f"{100 * audit['chance']:.0f}%): formatting at most "
            f"{'–' if formatting is None else f'{100 * formatting:.1f}%'} ({verdict}); "
            f"length {acc('length')}, word length {acc('word_length')}, all length probes {acc('length_all')}")


# --------------------------------------------------------------------------- the grid's tables
def grid_rows(grid: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The families of the results table: each variant against the chosen response and SFT, and each
    SPO variant against its twin (a judged variant with the same loss and no SPO), ordered by
    opponent, then loss, then SPO off before on, so loss x SPO reads down each opponent."""
    grid = {name: f for name, f in grid.items() if isinstance(f, dict)}
    plain = {f.get("a"): f.get("loss") for f in grid.values() if not f.get("spo")}

    def opponent_rank(family: dict[str, Any]) -> int:
        b = family.get("b")
        if b in OPPONENTS:
            return OPPONENTS.index(b)
        return len(OPPONENTS) if family.get("spo") and plain.get(b, "") == family.get("loss") else -1

    chosen = [(name, f) for name, f in grid.items() if opponent_rank(f) >= 0]
    return sorted(chosen, key=lambda item: (opponent_rank(item[1]), str(item[1].get("loss")), bool(item[1].get("spo")),
                                            str(item[1].get("dataset"))))


def _pct(value: Any, sign: str = "") -> str:
    return "–" if value is None else f"{100 * value:{sign}.1f}"


def _interval(record: dict[str, Any], sign: str = "") -> str:
    if record.get("ci_low") is None or record.get("ci_high") is None:
        return "–"
    return f"[{_pct(record['ci_low'], sign)}, {_pct(record['ci_high'], sign)}]"


def _seed_spread(record: dict[str, Any], sign: str = "", unit: str = "%") -> str:
    """``38.0-44.0% (sd 3.0)``: the per-seed values' range and sd; "–" with one seed (no spread)."""
    if record.get("seed_sd") is None:
        return "–"
    return (f"{_pct(record['seed_min'], sign)} to {_pct(record['seed_max'], sign)}{unit} "
            f"(sd {_pct(record['seed_sd'])})")


def grid_table(grid: dict[str, Any]) -> list[tuple[str, ...]]:
    """The grid's rows (:func:`grid_rows`) as the cells of :data:`GRID_HEADER`, for the terminal and
    the report alike."""
    return [(str(f.get("dataset", "?")), str(f.get("loss", "?")), "yes" if f.get("spo") else "no",
             str(f.get("b")) if f.get("b") in OPPONENTS else f"{f.get('b')} (twin)",
             str(len(f.get("seeds") or [])), str(f.get("n", "?")),
             "–" if f.get("win_rate") is None else f"{_pct(f['win_rate'])}%", _interval(f), _seed_spread(f),
             "–" if f.get("tie_rate") is None else f"{_pct(f['tie_rate'])}%")
            for _, f in grid_rows(grid)]


def grid_difference_table(differences: dict[str, Any]) -> list[tuple[str, ...]]:
    """Each SPO variant minus its twin against one opponent, pooled over seeds, as the cells of
    :data:`DIFFERENCE_HEADER` (points of win rate)."""
    return [(f"{d.get('a', '?')} − {d.get('twin', '?')}" + (f" ({d['dataset']})" if d.get("dataset") else ""),
             str(d.get("b", "?")), str(len(d.get("seeds") or [])),
             str(d.get("n", "?")), _pct(d.get("difference"), "+"), _interval(d, "+"),
             _seed_spread(d, "+", unit=" points"))
            for d in differences.values()]


def variant_degree_table(by_variant: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    """The degree heads per variant (:func:`degree_by_variant`) as the cells of :data:`VARIANT_DEGREE_HEADER`."""
    return [(variant, h["head"], str(len(h["seeds"])), f"{_pct(h['accuracy'])}%", _seed_spread(h),
             f"{100 * h['chance']:.0f}%")
            for variant, heads in by_variant.items() for h in heads.values()]


# --------------------------------------------------------------------------- the terminal
def _aligned(table: list[tuple[str, ...]], left: tuple[int, ...] = (0,)) -> list[str]:
    """Columns padded to their widest cell: text columns (``left``) flush left, numbers flush right."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in table]


def _grid_lines(summary: dict[str, Any]) -> list[str]:
    """The grid first: families pooled over seeds, then SPO minus its twin pooled the same way."""
    rows = grid_table(summary.get("grid") or {})
    if not rows:
        return []
    lines = ["The grid: each variant's win rate pooled over its seeds (mean over seeds and prompts; 95% paired "
             "bootstrap interval over prompts; seed spread: the per-seed win rates' range and sd)", ""]
    lines += _aligned([GRID_HEADER, *rows], left=(0, 1, 2, 3))
    differences = grid_difference_table(summary.get("grid_differences") or {})
    if differences:
        lines += ["", "SPO minus its twin without SPO, pooled over seeds (points of win rate against the same "
                  "opponent; 95% paired bootstrap interval over prompts):", ""]
        lines += _aligned([DIFFERENCE_HEADER, *differences], left=(0, 1))
    return lines + ["", "Each comparison (one per cell):", ""]


def _comparison_lines(summary: dict[str, Any]) -> list[str]:
    header = ("comparison", "n", "win rate", "95% interval", "ties", "LC win rate")
    table: list[tuple[str, ...]] = [header]
    for r in summary["win_rates"].values():
        table.append((f"{r.get('a', '?')} vs {r.get('b', '?')}", str(r.get("n", "?")),
                      f"{_pct(r['win_rate'])}%" if r.get("win_rate") is not None else "–", _interval(r),
                      f"{_pct(r['tie_rate'])}%" if r.get("tie_rate") is not None else "–",
                      f"{_pct(r['lc_win_rate'])}%" if r.get("lc_win_rate") is not None else "–"))
    lines = _aligned(table)
    paired = summary.get("paired_differences") or {}
    if paired:
        from spo.judging.statistics import format_difference

        lines += ["", "SPO against its twin without SPO (same pairs in training; same prompts and judge; "
                  "difference of win rates, 95% paired bootstrap interval):", ""]
        lines += [f"  {format_difference(name, diff)}" for name, diff in paired.items()]
    return lines


def _degree_lines(summary: dict[str, Any]) -> list[str]:
    """The degree heads per cell, then per variant pooled over its seeds, then the shortcut audit
    they must beat."""
    lines: list[str] = []
    degrees = summary.get("degrees") or {}
    if degrees:
        lines += ["", "Degree heads on the eval pairs (accuracy, 95% bootstrap interval over responses; per level: "
                  "true level 0..N-1)", ""]
        table: list[tuple[str, ...]] = [("policy", "head", "n", "accuracy", "95% interval", "chance", "per level")]
        for policy, heads in degrees.items():
            for h in heads.values():
                acc = f"{_pct(h['accuracy'])}%" if h["accuracy"] is not None else "–"
                levels = " ".join("–" if v is None else f"{v:.2f}" for v in h["per_level"])
                table.append((policy, h["head"], str(h["n"]), acc, _interval(h), f"{100 * h['chance']:.0f}%", levels))
        lines += _aligned(table, left=(0, 1, 6))
    by_variant = variant_degree_table(summary.get("degrees_by_variant") or {})
    if by_variant:
        lines += ["", "Degree heads per variant (mean eval accuracy over its seeds; seed spread: range and sd)", ""]
        lines += _aligned([VARIANT_DEGREE_HEADER, *by_variant], left=(0, 1))
    if summary.get("shortcut_audit"):
        lines += ["", audit_line(summary["shortcut_audit"])]
    return lines


def win_rate_table(summary: dict[str, Any]) -> str:
    """The terminal table of :func:`results`."""
    lines = [f"Win rates (ties count half; 95% bootstrap intervals), {judge_line(summary['judge'])}", ""]
    lines += _grid_lines(summary) + _comparison_lines(summary) + _degree_lines(summary)
    lines.append("")
    lines.append("Report: " + (" and ".join(summary["report"]) if summary["report"] else "not written (spo report)"))
    return "\n".join(lines)
