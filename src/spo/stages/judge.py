"""Stage ``judge``: pairwise win rates of generations against each other or the data set's chosen.

For every comparison (a vs b) of :meth:`~spo.config.SpoConfig.judge_comparisons` (derived from
``variants``, plus ``judge.comparisons``) the items present on both sides are judged in both
orders (:mod:`spo.judging.comparisons`), the two verdicts give one outcome per item and the
statistics of :mod:`spo.judging.statistics` are computed.  Writes, under ``judge.out_dir``:

* ``<name>.jsonl`` — one line per item: id, task, a, b, outcome, score, lengths, both orders'
  verdicts (winner shown-position, preferred side, raw text, explanation, cached), judge_id,
  prompt_version;
* ``winrates.json`` — per comparison: win_rate (ties = half), ci_low/ci_high (95% bootstrap),
  tie_rate, invalid, not_judged, n, position_consistency, lc_win_rate, lengths, rouge (TL;DR),
  judge_id, prompt_version;
* ``winrates.png`` — bar chart of the win rates with the 95% intervals and a 50% line;
* ``provenance.json``;

and the same per-comparison record (keyed by comparison name) as DVC metrics at
``judge.metrics_file``.

Items the judge gave up on do not stop the others, nor the other comparisons: every file is
written with them marked ``not_judged`` and their reason.  If the budget ran out, a WARNING says
how many were left.  If requests failed (retries exhausted, or refused one by one) on more than
``judge.max_unjudged_fraction`` of the items, the stage then fails with one line saying how many
and why: a rerun asks only for those, since every answer is cached.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from spo.config import Cell, ComparisonConfig, SpoConfig
from spo.errors import BudgetExhausted, InputError, StageFailed
from spo.io import atomic_dir, file_sha256, save_figure, write_json, write_jsonl, write_provenance
from spo.judging.base import Judge, JudgeRequest, NotJudged, Verdict
from spo.judging.comparisons import (
    DATASET_SIDES,
    Comparison,
    build_comparison,
    load_rows,
    needed_ids,
    requests_for,
)
from spo.judging.grid import GRID, GRID_DIFFERENCES, format_family, grid_results
from spo.judging.statistics import (
    SCORE,
    format_difference,
    format_summary,
    load_rouge,
    outcome,
    paired_difference,
    preferred_side,
    rouge_scores,
    summarize,
)

log = logging.getLogger("spo.judge")
WINRATES_JSON = "winrates.json"
WINRATES_PNG = "winrates.png"
PAIRED = "paired_differences"  # the key of the SPO-vs-twin differences beside the comparisons
SUMMARIES = (PAIRED, GRID, GRID_DIFFERENCES)  # the keys of the results that are not one comparison


def make_judge(cfg: SpoConfig) -> tuple[Judge, Any]:
    """The configured judge and something to close afterwards (the OpenAI judge: its client and cache) or None.

    Tests replace this function to inject a fake judge.
    """
    jc = cfg.judge
    if jc.backend == "openai":
        from spo.judging.cache import JudgeCache
        from spo.judging.openai_judge import OpenAIJudge

        cache = JudgeCache(jc.cache_file)
        try:
            judge = OpenAIJudge(jc.openai, jc.prompt_version, cache)
        except BaseException:
            cache.close()
            raise
        return judge, judge
    if jc.backend == "reward":
        from spo.judging.reward import RewardJudge

        if not Path(jc.reward_model_dir).is_dir():
            raise InputError(f"{jc.reward_model_dir}: reward model folder not found (run the reward_model stage)")
        return RewardJudge(jc.reward_model_dir, cfg.model), None
    raise InputError(f"unknown judge backend {jc.backend!r}")


def _verdict_json(verdict: Verdict | NotJudged, order: str) -> dict[str, Any]:
    if isinstance(verdict, NotJudged):
        return {"not_judged": verdict.reason, "detail": verdict.detail, "attempts": verdict.attempts,
                "budget": verdict.budget}
    return {
        "winner": verdict.winner,
        "prefers": preferred_side(verdict, order),
        "raw": verdict.raw,
        "explanation": verdict.explanation,
        "cached": verdict.cached,
        "prompt_tokens": verdict.prompt_tokens,
        "completion_tokens": verdict.completion_tokens,
    }


def _judge(judge: Judge, requests: list[JudgeRequest], name: str) -> list[Verdict | NotJudged]:
    try:
        verdicts = list(judge.judge_many(requests, progress=True))
    except BudgetExhausted as err:  # the contract returns NotJudged entries, but stay safe if a judge raises
        log.warning("%s: judge budget exhausted before any verdict was returned: %s", name, err)
        return [NotJudged("budget", str(err), budget=True)] * len(requests)
    if len(verdicts) != len(requests):
        raise RuntimeError(f"{name}: judge returned {len(verdicts)} verdicts for {len(requests)} requests")
    return verdicts


def run(cfg: SpoConfig) -> dict[str, Any]:
    """Judge every comparison into one folder written whole or not at all (a killed run leaves the
    previous judgments folder, or none, never some comparisons of this run beside another run's),
    then the metrics; items the judge gave up on fail the stage only past
    ``judge.max_unjudged_fraction``, after everything is written."""
    started = time.perf_counter()
    jc = cfg.judge
    out_dir = Path(jc.out_dir)
    comparisons = _comparisons(cfg)
    rows, row_files = load_rows(jc.rows_dir, needed_ids(comparisons, jc))
    built = [build_comparison(c, jc, rows, cfg.data.dataset) for c in comparisons]
    judge, closer = make_judge(cfg)
    # The cache is a declared (persistent) DVC output for every backend: make sure it exists
    # even when the judge (the local reward model) needs no cache.
    from spo.judging.cache import JudgeCache

    JudgeCache(jc.cache_file).close()
    judge_id = judge.judge_id
    prompt_version = jc.prompt_version if jc.backend == "openai" else None
    rouge_metric = None
    results: dict[str, Any] = {}  # comparison name -> its statistics, then the SUMMARIES
    by_item: dict[str, dict[str, str]] = {}  # comparison -> item id -> outcome (the paired differences)
    failed: list[NotJudged] = []  # the requests the judge gave up on (not the budget's), all comparisons
    try:
        with atomic_dir(out_dir) as building:
            for comp in built:
                lines, stats, by_item[comp.name], comp_failed = _judge_comparison(
                    cfg, judge, comp, judge_id, prompt_version)
                write_jsonl(building / f"{comp.name}.jsonl", lines)
                failed += comp_failed
                if "tldr" in comp.sources:
                    if rouge_metric is None:
                        rouge_metric = load_rouge()
                    stats["rouge"] = _rouge(comp, rouge_metric)
                results[comp.name] = stats
                log.info("%s", format_summary(comp.name, stats))

            paired = _paired_differences(cfg, results, by_item)
            pooled, pooled_differences = grid_results(cfg, results, by_item)
            if paired:
                results[PAIRED] = paired
                for name, diff in paired.items():
                    log.info("%s", format_difference(name, diff))
            if pooled:
                results[GRID], results[GRID_DIFFERENCES] = pooled, pooled_differences
                for name, family in pooled.items():
                    log.info("grid %s", format_family(name, family))
                for name, diff in pooled_differences.items():
                    log.info("grid %s", format_difference(name, diff))
            write_json(building / WINRATES_JSON, results)
            _plot({k: v for k, v in results.items() if k not in SUMMARIES}, building / WINRATES_PNG, judge_id)
            write_provenance(building, stage="judge", config_hash=cfg.section_hash("judge"),
                             inputs=_inputs(row_files, built, judge_id, prompt_version))
    finally:
        if closer is not None:
            closer.close()
    write_json(Path(jc.metrics_file), results)
    seconds = time.perf_counter() - started
    not_judged = _report_not_judged(cfg, results, failed, judge_id, seconds)
    return {"comparisons": results, "not_judged": not_judged, "plot": str(out_dir / WINRATES_PNG),
            "seconds": round(seconds, 3)}


def _comparisons(cfg: SpoConfig) -> list[ComparisonConfig]:
    """The comparisons to judge; none, or two with one name (one output file), is an InputError."""
    comparisons = cfg.judge_comparisons()
    if not comparisons:
        raise InputError("nothing to judge: judge.comparisons is empty and judge.auto_comparisons found no policy")
    names = [c.name for c in comparisons]
    if len(set(names)) != len(names):
        raise InputError(f"judge.comparisons has duplicate names: {names}")
    return comparisons


def _judge_comparison(cfg: SpoConfig, judge: Judge, comp: Comparison, judge_id: str, prompt_version: str | None,
                      ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, str], list[NotJudged]]:
    """One comparison judged in both orders: its output lines, its statistics, each item's outcome
    (for the paired differences) and the requests the judge gave up on (not the budget's)."""
    verdicts = _judge(judge, requests_for(comp.items), comp.name) if comp.items else []
    lines, outcomes, len_a, len_b = [], [], [], []
    by_item: dict[str, str] = {}
    for i, item in enumerate(comp.items):
        v_ab, v_ba = verdicts[2 * i], verdicts[2 * i + 1]
        result = outcome(v_ab, v_ba)
        outcomes.append(result)
        by_item[item.id] = result
        len_a.append(len(item.response_a))
        len_b.append(len(item.response_b))
        lines.append({
            "id": item.id, "task": item.task, "a": comp.a, "b": comp.b,
            "outcome": result, "score": SCORE.get(result),
            "chars_a": len(item.response_a), "chars_b": len(item.response_b),
            "ab": _verdict_json(v_ab, "ab"), "ba": _verdict_json(v_ba, "ba"),
            "judge_id": judge_id, "prompt_version": prompt_version,
        })
    stats = summarize(outcomes, len_a, len_b, cfg.judge.bootstrap_samples, cfg.seed)
    answered = [v for v in verdicts if isinstance(v, Verdict)]
    stats.update({
        "a": comp.a, "b": comp.b, "only_a": comp.only_a, "only_b": comp.only_b,
        "judge_id": judge_id, "prompt_version": prompt_version,
        "cached_verdicts": sum(1 for v in answered if v.cached),
        "prompt_tokens": sum(v.prompt_tokens for v in answered),
        "completion_tokens": sum(v.completion_tokens for v in answered),
        **_not_judged_counts(verdicts),
    })
    failed = [v for v in verdicts if isinstance(v, NotJudged) and not v.budget]
    return lines, stats, by_item, failed


def _rouge(comp: Comparison, rouge_metric: Any) -> dict[str, Any]:
    """ROUGE of each generated side against the TL;DR reference summary (``chosen`` is the reference)."""
    out: dict[str, Any] = {}
    for side_name, attr in ((comp.a, "response_a"), (comp.b, "response_b")):
        if side_name == "chosen":
            continue  # the reference itself
        scored = [it for it in comp.items if it.source == "tldr" and it.reference is not None]
        references = [it.reference for it in scored if it.reference is not None]  # every one: the test tells mypy
        out[side_name] = rouge_scores([getattr(it, attr) for it in scored], references, rouge_metric)
    return out


def _inputs(row_files: list[Path], built: list[Comparison], judge_id: str,
            prompt_version: str | None) -> dict[str, Any]:
    """The provenance inputs: every rows and generations file read, by sha256, and who judged how."""
    inputs: dict[str, Any] = {"rows": {str(p): file_sha256(p) for p in row_files}}
    for comp in built:
        for side, path in comp.files.items():
            if side not in DATASET_SIDES:
                inputs.setdefault("generations", {})[path] = file_sha256(path)
    inputs["judge_id"] = judge_id
    inputs["prompt_version"] = prompt_version
    return inputs


def _report_not_judged(cfg: SpoConfig, results: dict[str, Any], failed: list[NotJudged], judge_id: str,
                       seconds: float) -> int:
    """The closing lines: a warning when the budget stopped the run, the one-line summary, and for
    failed requests a warning, or StageFailed past ``judge.max_unjudged_fraction``.  Returns how
    many items were not judged."""
    jc = cfg.judge
    compared = [r for name, r in results.items() if name not in SUMMARIES]
    items = sum(r["items"] for r in compared)
    by_budget = sum(r["not_judged_budget"] for r in compared)
    unjudged = sum(r["not_judged_failed"] for r in compared)
    if by_budget:
        log.warning("judge: the budget stopped the run; %d of %d items not judged (partial results written; "
                    "a rerun with a larger budget judges only those)", by_budget, items)
    log.info("judge: %d comparisons with %s, %d items, %d not judged, wrote %s and %s (%.1f s)",
             len(results), judge_id, items, by_budget + unjudged, Path(jc.out_dir), jc.metrics_file, seconds)
    if unjudged:
        message = _unjudged_message(unjudged, items, failed, jc.max_unjudged_fraction)
        if unjudged > jc.max_unjudged_fraction * items:
            raise StageFailed(message)
        log.warning("%s", message)
    return by_budget + unjudged


def _paired_differences(cfg: SpoConfig, results: dict[str, Any], by_item: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Each SPO cell against its twin without SPO (same loss, :meth:`SpoConfig.twin`, same seed), judged
    against the same opponent on the same prompts: the win-rate difference with a paired bootstrap
    interval.  The arms train on the same pairs in the same order, so this isolates what SPO adds."""
    out: dict[str, Any] = {}
    twins = {cell.name: Cell(twin, cell.seed).name for cell in cfg.cells()
             if (twin := cfg.twin(cell.variant)) is not None}  # the twin trained with the same seed
    for name, stats in results.items():
        a, b = stats["a"], stats["b"]
        twin = twins.get(a)
        other = next((n for n, s in results.items() if twin is not None and s["a"] == twin and s["b"] == b), None)
        if other is None:
            continue
        diff = paired_difference(by_item[name], by_item[other], cfg.judge.bootstrap_samples, cfg.seed)
        out[f"{a}_minus_{twin}_vs_{b}"] = {"a": a, "twin": twin, "b": b, "comparisons": [name, other], **diff}
    return out


def _not_judged_counts(verdicts: list[Verdict | NotJudged]) -> dict[str, Any]:
    """Items not judged because of the budget, or because the judge failed on them (either order), and the
    failed requests' reasons."""
    by_budget = failed = 0
    reasons: Counter[str] = Counter()
    for v_ab, v_ba in zip(verdicts[0::2], verdicts[1::2]):
        missing = [v for v in (v_ab, v_ba) if isinstance(v, NotJudged)]
        if any(not v.budget for v in missing):
            failed += 1
        elif missing:
            by_budget += 1
        reasons.update(v.reason for v in missing)
    return {"not_judged_failed": failed, "not_judged_budget": by_budget, "not_judged_reasons": dict(reasons)}


def _unjudged_message(unjudged: int, items: int, failed: list[NotJudged], allowed: float) -> str:
    attempts = sorted({v.attempts for v in failed})
    after = f"after {attempts[0]} attempts" if len(attempts) == 1 else f"after up to {attempts[-1]} attempts"
    reasons = ", ".join(f"{reason}: {n}" for reason, n in Counter(v.reason for v in failed).most_common())
    example = failed[0].detail if failed else ""
    return (f"judge: {unjudged} of {items} items not judged {after} ({reasons}): rerun to retry only those, the "
            f"other answers are cached (judge.max_unjudged_fraction {allowed}; e.g. {example})")


def _plot(results: dict[str, Any], path: Path, judge_id: str) -> None:
    """Win rate per comparison with its 95% bootstrap interval and a 50% reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    rates = [100 * (results[n]["win_rate"] if results[n]["win_rate"] is not None else float("nan")) for n in names]
    low = [r - 100 * results[n]["ci_low"] if results[n]["ci_low"] is not None else 0.0 for r, n in zip(rates, names)]
    high = [100 * results[n]["ci_high"] - r if results[n]["ci_high"] is not None else 0.0 for r, n in zip(rates, names)]
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2.5, 4))
    try:
        ax.bar(range(len(names)), rates, yerr=[low, high], capsize=6, color="tab:blue", alpha=0.8)
        ax.axhline(50, color="black", linestyle="--", linewidth=1, label="50%")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("win rate of a, % (ties = half)")
        ax.set_title(f"Win rates, 95% bootstrap CI — {judge_id}", fontsize=9)
        ax.legend(loc="upper right")
        fig.tight_layout()
        save_figure(fig, path)
    finally:
        plt.close(fig)
