"""A linear Bradley-Terry probe on frozen features: the reward model's value head, fitted exactly.

``reward_model.train_backbone: false`` keeps the SFT backbone frozen and computes each
response's feature (the final hidden state the value head reads) once. The head is then an
L2-regularised logistic regression on feature differences, ``P(c ≻ r) = σ(w·(z_c − z_r))`` with
standardised features ``z``, solved to convergence by L-BFGS: on a CPU this sees every training
pair to convergence for the price of one forward pass per response, where LoRA training gets
through part of an epoch in the same time (docs/reward_judge.md). The L2 strength is chosen by
k-fold cross-validation on the training pairs only, folds split by prompt group, so the
held-out pairs that measure the judge are never used to tune it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PROBE_SALT = "spo-reward-probe-fold-v1"


@dataclass
class ProbeFit:
    """The fitted head in raw feature space (``score = weight·f + bias``) and how it was chosen."""

    weight: torch.Tensor
    bias: float
    l2: float
    cv_accuracy: dict[float, float] = field(default_factory=dict)
    train_accuracy: float = float("nan")


def _fold(key: str, folds: int) -> int:
    return int(hashlib.sha256(f"{PROBE_SALT}:{key}".encode()).hexdigest()[:8], 16) % folds


def _solve(diff: torch.Tensor, l2: float, max_iter: int) -> torch.Tensor:
    """argmin_w mean(−log σ(diff·w)) + l2·‖w‖², by L-BFGS (convex: one minimum)."""
    w = torch.zeros(diff.shape[1], dtype=diff.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -F.logsigmoid(diff @ w).mean() + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _accuracy(diff: torch.Tensor, w: torch.Tensor) -> float:
    """Pairs ranked right; an exact tie counts half, as :func:`spo.judging.reward.pair_accuracy`."""
    margin = diff @ w
    return float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())


def fit_linear_probe(chosen: torch.Tensor, rejected: torch.Tensor, groups: Sequence[str], l2_grid: Sequence[float],
                     folds: int = 5, max_iter: int = 500) -> ProbeFit:
    """Fit ``w`` on pairs of features ([P, d] each); ``groups[i]`` keeps one prompt's pairs in one fold.

    Standardisation (mean and spread over every training response) makes one L2 strength mean
    the same for every feature; it is folded back into ``weight``/``bias`` so the saved head reads
    raw features like any value head. The bias cancels in a pair, so it only centres the scores.
    """
    if chosen.shape != rejected.shape or chosen.ndim != 2 or len(groups) != chosen.shape[0]:
        raise ValueError(f"features {tuple(chosen.shape)} / {tuple(rejected.shape)} and {len(groups)} groups "
                         "do not match")
    if not l2_grid:
        raise ValueError("l2_grid is empty")
    x = torch.cat([chosen, rejected]).double()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    diff = (chosen.double() - rejected.double()) / sd
    fold_of = torch.tensor([_fold(g, folds) for g in groups])
    cv: dict[float, float] = {}
    for l2 in l2_grid:
        right = 0.0
        for k in range(folds):
            test = fold_of == k
            if not test.any() or test.all():
                continue
            w = _solve(diff[~test], l2, max_iter)
            right += _accuracy(diff[test], w) * int(test.sum())
        cv[float(l2)] = right / len(groups)
    best = max(cv, key=lambda l2: (cv[l2], l2))  # ties: the stronger regulariser
    w = _solve(diff, best, max_iter)
    weight = (w / sd).float()
    return ProbeFit(weight=weight, bias=float(-(w / sd) @ mu), l2=best, cv_accuracy=cv,
                    train_accuracy=_accuracy(diff, w))
