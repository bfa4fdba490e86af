"""``spo results``: the run's win rates in a terminal — what `make demo` ends with.

`dvc metrics show` prints every number of every metrics file (some 300 columns); what a reader
wants after a run is the win-rate table: each comparison with its n, win rate, 95% interval,
tie rate and length-controlled win rate, under the judge that made it and how good that judge is
(the local reward judge's held-out pair accuracy, with its Wilson interval), the SPO degree
heads' accuracy on the eval pairs against chance 1/N (per head and per level, from each policy's
``degree_confusion.json``) with the degrees stage's shortcut audit beside it (what a head must
beat: the length probes), and where the full report is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spo.errors import InputError

__all__ = ["results", "win_rate_table", "degree_accuracy"]

HEADS = {"w": "chosen", "l": "rejected"}


def results(metrics_dir: str | Path = "metrics", reports_dir: str | Path = "reports",
            policy_dir: str | Path = "models/policy") -> dict[str, Any]:
    """The win rates and the judge's quality, from the judge and reward_model metrics files, and
    the degree heads' accuracy of every policy under ``policy_dir`` that has them."""
    metrics_dir, reports_dir = Path(metrics_dir), Path(reports_dir)
    judge_file = metrics_dir / "judge.json"
    if not judge_file.is_file():
        raise InputError(f"{judge_file}: no judge metrics (run the pipeline first: dvc repro)")
    try:
        judged = json.loads(judge_file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise InputError(f"{judge_file}: not JSON ({err})") from None
    rows = {name: r for name, r in judged.items() if isinstance(r, dict) and "win_rate" in r}
    paired = judged.get("paired_differences")
    out: dict[str, Any] = {"win_rates": rows, "judge": _judge(rows, metrics_dir / "reward_model.json"),
                           "paired_differences": paired if isinstance(paired, dict) else {},
                           "degrees": degree_accuracy(policy_dir),
                           "shortcut_audit": _shortcut_audit(metrics_dir / "degrees.json"),
                           "report": [str(reports_dir / name) for name in ("report.md", "report.html")
                                      if (reports_dir / name).is_file()]}
    return out


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


def _judge(rows: dict[str, Any], reward_file: Path) -> dict[str, Any]:
    from spo.judging.statistics import wilson_interval

    ids = sorted({str(r.get("judge_id")) for r in rows.values() if r.get("judge_id")})
    judge: dict[str, Any] = {"id": ", ".join(ids) or None}
    if any(i.startswith("reward:") for i in ids) and reward_file.is_file():
        rm = json.loads(reward_file.read_text(encoding="utf-8"))
        accuracy, n = rm.get("held_out_accuracy_after"), int(rm.get("held_out_pairs") or 0)
        if accuracy is not None and n:
            low, high = wilson_interval(round(accuracy * n), n)
            judge.update(accuracy=accuracy, pairs=n, ci_low=low, ci_high=high)
    return judge


def _shortcut_audit(degrees_file: Path) -> dict[str, Any] | None:
    """The degrees stage's shortcut audit, when it ran (metrics/degrees.json)."""
    if not degrees_file.is_file():
        return None
    try:
        audit = json.loads(degrees_file.read_text(encoding="utf-8")).get("shortcut_audit")
    except (ValueError, AttributeError):
        raise InputError(f"{degrees_file}: not a JSON object") from None
    return audit if isinstance(audit, dict) and isinstance(audit.get("probes"), dict) else None


def _audit_line(audit: dict[str, Any]) -> str:
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


def win_rate_table(summary: dict[str, Any]) -> str:
    """The terminal table of :func:`results`."""
    judge = summary["judge"]
    head = f"Win rates (ties count half; 95% bootstrap intervals), judge {judge.get('id') or 'unknown'}"
    if "accuracy" in judge:
        head += (f": held-out pair accuracy {100 * judge['accuracy']:.1f}% [{100 * judge['ci_low']:.1f}, "
                 f"{100 * judge['ci_high']:.1f}] on {judge['pairs']} pairs (chance 50%)")
    lines = [head, ""]
    header = ("comparison", "n", "win rate", "95% interval", "ties", "LC win rate")
    table: list[tuple[str, ...]] = [header]  # reused below for the degree heads' seven columns
    for r in summary["win_rates"].values():
        interval = (f"[{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
                    if r.get("ci_low") is not None and r.get("ci_high") is not None else "–")
        table.append((f"{r.get('a', '?')} vs {r.get('b', '?')}", str(r.get("n", "?")),
                      f"{100 * r['win_rate']:.1f}%" if r.get("win_rate") is not None else "–", interval,
                      f"{100 * r['tie_rate']:.1f}%" if r.get("tie_rate") is not None else "–",
                      f"{100 * r['lc_win_rate']:.1f}%" if r.get("lc_win_rate") is not None else "–"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))))
    paired = summary.get("paired_differences") or {}
    if paired:
        from spo.stages.judge import format_difference

        lines += ["", "SPO against its twin without SPO (same pairs in training; same prompts and judge; "
                  "difference of win rates, 95% paired bootstrap interval):", ""]
        lines += [f"  {format_difference(name, diff)}" for name, diff in paired.items()]
    degrees = summary.get("degrees") or {}
    if degrees:
        lines += ["", "Degree heads on the eval pairs (accuracy, 95% bootstrap interval over responses; per level: "
                  "true level 0..N-1)", ""]
        table = [("policy", "head", "n", "accuracy", "95% interval", "chance", "per level")]
        for policy, heads in degrees.items():
            for h in heads.values():
                acc = f"{100 * h['accuracy']:.1f}%" if h["accuracy"] is not None else "–"
                interval = f"[{100 * h['ci_low']:.1f}, {100 * h['ci_high']:.1f}]" if h["ci_low"] is not None else "–"
                levels = " ".join("–" if v is None else f"{v:.2f}" for v in h["per_level"])
                table.append((policy, h["head"], str(h["n"]), acc, interval, f"{100 * h['chance']:.0f}%", levels))
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            lines.append("  ".join(cell.ljust(w) if i in (0, 1, 6) else cell.rjust(w)
                                   for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    if summary.get("shortcut_audit"):
        lines += ["", _audit_line(summary["shortcut_audit"])]
    lines.append("")
    lines.append("Report: " + (" and ".join(summary["report"]) if summary["report"] else "not written (spo report)"))
    return "\n".join(lines)
