"""The grid judged as a paired design: each comparison family pooled over the seeds.

A family is one comparison of the paper's table with the seed left out: ``dpo_spo_vs_dpo`` is
``dpo_spo_s<k>_vs_dpo_s<k>`` for every seed k, ``dpo_spo_vs_chosen`` is ``dpo_spo_s<k>_vs_chosen``.
Every cell is judged on the same test prompts, sampled with the same seeds, by the same judge,
so a family's seeds are paired by prompt. Its win rate is the mean over seeds and prompts of
the item scores (win 1, tie ½, loss 0) on the prompts every seed judged validly; the 95%
interval is a bootstrap over those prompts, each carrying its scores under every seed (the
prompts are the sampled unit; the seeds are few and reported as a spread: the per-seed win
rates, their standard deviation, minimum and maximum).

The same holds for SPO against its twin: per prompt, the SPO variant's seed-mean score minus its
twin's, both against the same opponent (the chosen response, SFT), bootstrapped over prompts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spo.config import Cell, SpoConfig
from spo.judging.statistics import SCORE, TIE, bootstrap_ci

GRID = "grid"  # the key of the families in the judge's results, beside the comparisons
GRID_DIFFERENCES = "grid_differences"


def families(cfg: SpoConfig, results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Family name -> {a, b, seeds, comparisons (seed -> comparison name)} for every judged
    comparison whose side a is a cell (b a cell of the same seed, or a fixed side)."""
    cells: dict[str, Cell] = {cell.name: cell for cell in cfg.cells()}
    found: dict[str, dict[str, Any]] = {}
    for name, stats in results.items():
        if not isinstance(stats, dict) or "a" not in stats:
            continue
        a, b = cells.get(stats["a"]), cells.get(stats["b"])
        if a is None or (b is not None and b.seed != a.seed):
            continue
        other = b.variant if b is not None else stats["b"]
        family = found.setdefault(f"{a.variant}_vs_{other}", {"a": a.variant, "b": other, "comparisons": {}})
        family["comparisons"][a.seed] = name
    for family in found.values():
        family["seeds"] = sorted(family["comparisons"])
    return found


def _matrix(outcomes: list[dict[str, str]]) -> tuple[list[str], np.ndarray]:
    """The prompts every seed judged validly (in the first seed's order) and their scores, one
    column per seed."""
    common = [i for i in outcomes[0] if all(o.get(i) in SCORE for o in outcomes)]
    scores = np.array([[SCORE[o[i]] for o in outcomes] for i in common], dtype=np.float64).reshape(
        len(common), len(outcomes))
    return common, scores


def _spread(per_seed: list[float]) -> dict[str, Any]:
    values = np.array(per_seed, dtype=np.float64)
    return {"seed_sd": float(values.std(ddof=1)) if values.size > 1 else None,
            "seed_min": float(values.min()) if values.size else None,
            "seed_max": float(values.max()) if values.size else None}


def pool_family(outcomes: list[dict[str, str]], seeds: list[int], samples: int, seed: int) -> dict[str, Any]:
    """One family's pooled win rate, its paired bootstrap interval over prompts and the seed spread;
    ``outcomes`` holds each seed's item id -> outcome."""
    common, scores = _matrix(outcomes)
    per_prompt = scores.mean(axis=1)
    low, high = bootstrap_ci(per_prompt, samples, seed)
    per_seed = [float(column.mean()) for column in scores.T] if common else []
    ties = sum(1 for o in outcomes for i in common if o[i] == TIE)
    return {"seeds": seeds, "n": len(common), "win_rate": float(per_prompt.mean()) if common else None,
            "ci_low": low, "ci_high": high, "ci_level": 0.95,
            "per_seed": {str(s): w for s, w in zip(seeds, per_seed)}, **_spread(per_seed),
            "tie_rate": ties / (len(common) * len(outcomes)) if common else None}


def pool_difference(spo: list[dict[str, str]], twin: list[dict[str, str]], seeds: list[int], samples: int,
                    seed: int) -> dict[str, Any]:
    """The SPO variant's seed-mean score minus its twin's, per prompt, against the same opponent."""
    common, a = _matrix([*spo, *twin])
    k = len(spo)
    diff = a[:, :k].mean(axis=1) - a[:, k:].mean(axis=1)
    low, high = bootstrap_ci(diff, samples, seed)
    per_seed = [float((a[:, j] - a[:, k + j]).mean()) for j in range(k)] if common else []
    return {"seeds": seeds, "n": len(common), "difference": float(diff.mean()) if common else None,
            "ci_low": low, "ci_high": high, "ci_level": 0.95,
            "per_seed": {str(s): d for s, d in zip(seeds, per_seed)}, **_spread(per_seed)}


def grid_results(cfg: SpoConfig, results: dict[str, Any], by_item: dict[str, dict[str, str]]
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every family pooled over its seeds, and every SPO variant minus its twin against each
    opponent both were judged against with the same seeds."""
    samples, seed = cfg.judge.bootstrap_samples, cfg.seed
    pooled: dict[str, Any] = {}
    found = families(cfg, results)
    for name, family in found.items():
        outcomes = [by_item[family["comparisons"][s]] for s in family["seeds"]]
        spec = cfg.variants[family["a"]]
        pooled[name] = {"a": family["a"], "b": family["b"], "loss": spec.loss, "spo": spec.spo,
                        "dataset": cfg.data.dataset, "comparisons": [family["comparisons"][s] for s in family["seeds"]],
                        **pool_family(outcomes, family["seeds"], samples, seed)}
    differences: dict[str, Any] = {}
    for name, family in found.items():
        twin = cfg.twin(family["a"])
        partner = found.get(f"{twin}_vs_{family['b']}") if twin is not None else None
        if partner is None or partner["seeds"] != family["seeds"]:
            continue
        seeds = family["seeds"]
        diff = pool_difference([by_item[family["comparisons"][s]] for s in seeds],
                               [by_item[partner["comparisons"][s]] for s in seeds], seeds, samples, seed)
        differences[f"{family['a']}_minus_{twin}_vs_{family['b']}"] = {
            "a": family["a"], "twin": twin, "b": family["b"], "dataset": cfg.data.dataset,
            "families": [name, f"{twin}_vs_{family['b']}"], **diff}
    return pooled, differences


def format_family(name: str, pooled: dict[str, Any]) -> str:
    """``dpo_spo_vs_chosen: 41.0% [35.2, 47.1] over 3 seeds on 100 prompts, seeds 38.0-44.0% (sd 3.0)``."""
    if pooled["win_rate"] is None:
        return f"{name}: no prompt judged validly under every seed"
    spread = (f", seeds {100 * pooled['seed_min']:.1f}-{100 * pooled['seed_max']:.1f}% "
              f"(sd {100 * pooled['seed_sd']:.1f})" if pooled["seed_sd"] is not None else "")
    return (f"{name}: {100 * pooled['win_rate']:.1f}% [{100 * pooled['ci_low']:.1f}, {100 * pooled['ci_high']:.1f}] "
            f"over {len(pooled['seeds'])} seed(s) on {pooled['n']} prompts{spread}")
