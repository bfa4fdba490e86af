"""Pairwise outcomes and the statistics reported for a comparison of two sides, a and b.

Every item is judged twice, once with a shown first (order "ab") and once with b shown first
(order "ba"), and the two verdicts are combined into one outcome (:func:`outcome`):

* both orders prefer a -> ``win``; both prefer b -> ``loss``; they disagree -> ``tie``;
* either verdict unparseable (``winner is None``) -> ``invalid``: counted, left out of every rate;
* either verdict missing (a :class:`~spo.judging.base.NotJudged`: the budget stopped the run, or
  the request failed for good) -> ``not_judged``: counted, left out.

The win rate is a's, over valid items (win, loss, tie), **a tie counting as half a win**:
``(wins + 0.5 * ties) / n``.  Its 95% confidence interval is a percentile bootstrap over items
(``bootstrap_samples`` resamples, seeded).  Position consistency is the fraction of valid items
whose two orders agree (i.e. not ties); a judge that always picks the first-shown response has
consistency 0 and a win rate of exactly 0.5.

The length-controlled win rate follows AlpacaEval 2's idea in a simple form: a logistic
regression of the item score (win 1, loss 0, tie 0.5 — equivalent to a tie entering once as a win
and once as a loss with weight 0.5 each) on the *scaled* length difference
``x = (len(a) - len(b)) / sd(len(a) - len(b))`` (characters; divided by the standard deviation but
**not centred**, so x = 0 means equal length), fitted by Newton/IRLS with a tiny ridge on the
slope (keeps it finite when the longer side always wins).  The LC win rate is
``sigmoid(intercept)``: the predicted win rate of a against a b of the same length.  With equal
lengths (sd = 0) there is nothing to control for and it equals the raw win rate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from spo.judging.base import NotJudged, Verdict

WIN, LOSS, TIE, INVALID, NOT_JUDGED = "win", "loss", "tie", "invalid", "not_judged"
OUTCOMES = (WIN, LOSS, TIE, INVALID, NOT_JUDGED)
VALID = (WIN, LOSS, TIE)
SCORE = {WIN: 1.0, LOSS: 0.0, TIE: 0.5}
LC_RIDGE = 1e-3
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def preferred_side(verdict: Verdict | NotJudged, order: str) -> str | None:
    """Which side ("a" or "b") a verdict prefers, given the order it was shown in ("ab" or "ba")."""
    if not isinstance(verdict, Verdict) or verdict.winner not in ("A", "B"):
        return None
    first, second = ("a", "b") if order == "ab" else ("b", "a")
    return first if verdict.winner == "A" else second


def outcome(verdict_ab: Verdict | NotJudged, verdict_ba: Verdict | NotJudged) -> str:
    """Combine the two orders' verdicts into win / loss / tie / invalid / not_judged (for side a)."""
    if not isinstance(verdict_ab, Verdict) or not isinstance(verdict_ba, Verdict):
        return NOT_JUDGED
    first, second = preferred_side(verdict_ab, "ab"), preferred_side(verdict_ba, "ba")
    if first is None or second is None:
        return INVALID
    if first == second:
        return WIN if first == "a" else LOSS
    return TIE


def scores_of(outcomes: Sequence[str]) -> np.ndarray:
    """1 / 0 / 0.5 for the valid outcomes, in order; invalid and not-judged items are dropped."""
    return np.array([SCORE[o] for o in outcomes if o in SCORE], dtype=np.float64)


def win_rate(outcomes: Sequence[str]) -> float | None:
    """(wins + 0.5 * ties) / valid items; None when no item is valid."""
    scores = scores_of(outcomes)
    return float(scores.mean()) if scores.size else None


def bootstrap_ci(
    scores: np.ndarray, samples: int, seed: int, level: float = 0.95
) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean score, resampling items with replacement."""
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.size
    if n == 0:
        return None, None
    rng = np.random.default_rng(seed)
    means = np.empty(samples, dtype=np.float64)
    chunk = max(1, min(samples, 2_000_000 // n))  # bound memory: chunk * n indices at a time
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = scores[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_difference(a: dict[str, str], b: dict[str, str], samples: int, seed: int) -> dict[str, Any]:
    """Win-rate difference of two arms judged against the same opponent on the same prompts.

    ``a`` and ``b`` map item id -> outcome.  Only the items both arms have a valid outcome for
    count; the interval is a paired bootstrap (prompts resampled, each with both arms' scores),
    which is narrower than two independent intervals would suggest when the prompts' difficulty
    varies, and honest about the pairing.
    """
    common = [i for i in a if i in b and a[i] in SCORE and b[i] in SCORE]
    diff = np.array([SCORE[a[i]] - SCORE[b[i]] for i in common], dtype=np.float64)
    low, high = bootstrap_ci(diff, samples, seed)
    return {"n": len(common), "difference": float(diff.mean()) if diff.size else None, "ci_low": low,
            "ci_high": high, "ci_level": 0.95}


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion (a judge's held-out pair accuracy): unlike the
    normal approximation it stays inside [0, 1] and is honest for small n."""
    from statistics import NormalDist

    if n <= 0:
        return None, None
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    # exactly 0 (1) when none (all) succeeded, which rounding would leave at 1e-17 off
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


def position_consistency(outcomes: Sequence[str]) -> float | None:
    """Fraction of valid items whose two orders agree (win or loss, not tie)."""
    counts = Counter(outcomes)
    valid = sum(counts[o] for o in VALID)
    return (counts[WIN] + counts[LOSS]) / valid if valid else None


def _sigmoid(z: np.ndarray | float) -> np.ndarray | float:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z)))


def length_controlled_win_rate(
    scores: ArrayLike, len_a: ArrayLike, len_b: ArrayLike,
    iterations: int = 50, ridge: float = LC_RIDGE,
) -> dict[str, float | None]:
    """Logistic regression score ~ intercept + slope * scaled length difference (see module doc).

    Returns ``lc_win_rate`` (= sigmoid(intercept)), ``intercept``, ``slope`` (per standard deviation
    of the length difference) and ``length_diff_sd`` (characters).
    """
    y = np.asarray(scores, dtype=np.float64)
    if y.size == 0:
        return {"lc_win_rate": None, "intercept": None, "slope": None, "length_diff_sd": None}
    diff = np.asarray(len_a, dtype=np.float64) - np.asarray(len_b, dtype=np.float64)
    sd = float(diff.std())
    if sd == 0.0 or y.size < 2:
        # Nothing to control for: the intercept-only model reproduces the raw (clipped) win rate.
        return {"lc_win_rate": float(y.mean()), "intercept": None, "slope": 0.0, "length_diff_sd": sd}
    x = diff / sd
    design = np.column_stack([np.ones_like(x), x])
    penalty = np.diag([0.0, ridge * y.size])
    beta = np.zeros(2)
    for _ in range(iterations):
        p = _sigmoid(design @ beta)
        w = np.clip(p * (1.0 - p), 1e-10, None)
        grad = design.T @ (y - p) - penalty @ beta
        hess = (design * w[:, None]).T @ design + penalty + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        norm = float(np.abs(step).max())
        if norm > 5.0:  # damp huge Newton steps (near-separable data)
            step *= 5.0 / norm
        beta = beta + step
        if norm < 1e-10:
            break
    return {
        "lc_win_rate": float(_sigmoid(beta[0])),
        "intercept": float(beta[0]),
        "slope": float(beta[1]),
        "length_diff_sd": sd,
    }


def summarize(
    outcomes: Sequence[str], len_a: Sequence[float], len_b: Sequence[float],
    bootstrap_samples: int, seed: int,
) -> dict[str, Any]:
    """Every statistic of one comparison; lengths are per item (all items, aligned with outcomes)."""
    if not (len(outcomes) == len(len_a) == len(len_b)):
        raise ValueError("outcomes and lengths must have one entry per item")
    counts = Counter(outcomes)
    unknown = set(counts) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"unknown outcomes {sorted(unknown)}")
    valid_idx = [i for i, o in enumerate(outcomes) if o in SCORE]
    scores = np.array([SCORE[outcomes[i]] for i in valid_idx], dtype=np.float64)
    n = int(scores.size)
    low, high = bootstrap_ci(scores, bootstrap_samples, seed)
    lc = length_controlled_win_rate(scores, [len_a[i] for i in valid_idx], [len_b[i] for i in valid_idx])
    return {
        "n": n,
        "items": len(outcomes),
        "wins": counts[WIN],
        "losses": counts[LOSS],
        "ties": counts[TIE],
        "invalid": counts[INVALID],
        "not_judged": counts[NOT_JUDGED],
        "win_rate": float(scores.mean()) if n else None,
        "ci_low": low,
        "ci_high": high,
        "ci_level": 0.95,
        "tie_rate": counts[TIE] / n if n else None,
        "position_consistency": position_consistency(outcomes),
        "lc_win_rate": lc["lc_win_rate"],
        "lc_model": {k: lc[k] for k in ("intercept", "slope", "length_diff_sd")},
        "lengths": {
            "mean_chars_a": float(np.mean(len_a)) if len(len_a) else None,
            "mean_chars_b": float(np.mean(len_b)) if len(len_b) else None,
        },
    }


def format_summary(name: str, stats: dict[str, Any]) -> str:
    """``dpo_spo_vs_chosen: win 41.0% [33.2, 49.1] n=100, ties 12%, invalid 0``."""
    if stats["win_rate"] is None:
        head = f"{name}: win n/a n=0"
    else:
        head = (
            f"{name}: win {100 * stats['win_rate']:.1f}% "
            f"[{100 * stats['ci_low']:.1f}, {100 * stats['ci_high']:.1f}] n={stats['n']}"
        )
    tie = "n/a" if stats["tie_rate"] is None else f"{100 * stats['tie_rate']:.0f}%"
    line = f"{head}, ties {tie}, invalid {stats['invalid']}"
    if stats.get("lc_win_rate") is not None:
        line += f", LC win {100 * stats['lc_win_rate']:.1f}%"
    if stats["not_judged"]:
        line += f", not judged {stats['not_judged']}"
    return line


# --- ROUGE (summarisation) -------------------------------------------------------------------

def rouge_module_path() -> str:
    """Absolute path of the repository's own ``evaluate`` ROUGE module (no hub access)."""
    from pathlib import Path

    return str(Path(__file__).resolve().parents[1] / "metrics" / "rouge")


def load_rouge():
    import evaluate

    return evaluate.load(rouge_module_path())


def rouge_scores(predictions: Sequence[str], references: Sequence[str], metric=None) -> dict[str, float | None]:
    """Mean ROUGE-1/2/L F-measures of predictions against their references (None when empty)."""
    if not predictions:
        return {t: None for t in ROUGE_TYPES}
    metric = metric or load_rouge()
    result = metric.compute(predictions=list(predictions), references=list(references), rouge_types=list(ROUGE_TYPES))
    return {t: float(result[t]) for t in ROUGE_TYPES}


def format_difference(name: str, diff: dict[str, Any]) -> str:
    """``dpo_spo_minus_dpo_vs_chosen: +4.0 points [-1.2, 9.1] on 100 prompts (paired)``."""
    if diff["difference"] is None:
        return f"{name}: no prompt judged for both arms"
    return (f"{name}: {100 * diff['difference']:+.1f} points [{100 * diff['ci_low']:+.1f}, "
            f"{100 * diff['ci_high']:+.1f}] on {diff['n']} prompts (paired bootstrap)")
