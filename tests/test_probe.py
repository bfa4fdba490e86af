"""The linear Bradley-Terry probe (reward_model.train_backbone false): the optimum it returns
satisfies the objective's stationarity condition, derived by hand; the head it folds back reads
raw features; the L2 strength comes from cross-validation on the training pairs alone."""

from __future__ import annotations

import pytest
import torch

from spo.judging.probe import _fold, fit_linear_probe


def _pairs(n: int, d: int, seed: int, signal: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(d)
    direction[0] = 1.0
    base = torch.randn(n, d, generator=g) * 3 + 5  # off-centre and spread: standardisation matters
    chosen = base + torch.randn(n, d, generator=g) + signal * direction
    rejected = base + torch.randn(n, d, generator=g)
    return chosen, rejected, direction


def test_solution_is_stationary_for_the_regularised_bradley_terry_objective() -> None:
    chosen, rejected, _ = _pairs(200, 6, 0, 1.5)
    fit = fit_linear_probe(chosen, rejected, [str(i) for i in range(200)], [0.01])
    # in standardised space w_z = weight·sd; the objective's gradient, by hand:
    # ∇ = −mean((1 − σ(z·w)) z) + 2·l2·w, with z = (f_c − f_r)/sd
    x = torch.cat([chosen, rejected]).double()
    sd = x.std(0)
    z = (chosen.double() - rejected.double()) / sd
    w = fit.weight.double() * sd
    grad = -((1 - torch.sigmoid(z @ w)).unsqueeze(1) * z).mean(0) + 2 * 0.01 * w
    assert grad.abs().max().item() < 1e-5
    assert fit.l2 == 0.01 and fit.cv_accuracy.keys() == {0.01}


def test_folded_head_reads_raw_features_and_ranks_held_out_pairs() -> None:
    chosen, rejected, direction = _pairs(300, 8, 1, 2.0)
    fit = fit_linear_probe(chosen, rejected, [str(i) for i in range(300)], [1e-3, 1e-1, 10.0], folds=4)
    held_c, held_r, _ = _pairs(200, 8, 2, 2.0)
    score = lambda f: f @ fit.weight + fit.bias  # noqa: E731  (what a saved value head computes)
    accuracy = (score(held_c) > score(held_r)).float().mean().item()
    assert accuracy > 0.8
    cosine = torch.nn.functional.cosine_similarity(fit.weight, direction, dim=0).item()
    assert cosine > 0.9  # it found the one informative feature
    # the bias centres the scores of the training responses
    assert score(torch.cat([chosen, rejected])).mean().item() == pytest.approx(0.0, abs=1e-3)
    assert set(fit.cv_accuracy) == {1e-3, 1e-1, 10.0}
    assert fit.l2 == max(fit.cv_accuracy, key=lambda k: (fit.cv_accuracy[k], k))


def test_noise_gets_chance_cross_validation_at_every_strength() -> None:
    """No signal: cross-validation says so (what the held-out accuracy of a real judge must echo)."""
    chosen, rejected, _ = _pairs(200, 20, 3, 0.0)
    fit = fit_linear_probe(chosen, rejected, [str(i) for i in range(200)], [1e-4, 100.0])
    assert all(v == pytest.approx(0.5, abs=0.1) for v in fit.cv_accuracy.values()), fit.cv_accuracy
    assert fit.train_accuracy > max(fit.cv_accuracy.values())  # fitting noise shows only in sample


def test_a_prompt_groups_pairs_share_a_fold_and_bad_shapes_are_refused() -> None:
    assert _fold("group-7", 5) == _fold("group-7", 5)
    assert len({_fold(f"g{i}", 5) for i in range(100)}) == 5
    chosen, rejected, _ = _pairs(10, 3, 4, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        fit_linear_probe(chosen, rejected[:9], [str(i) for i in range(10)], [1.0])
    with pytest.raises(ValueError, match="l2_grid"):
        fit_linear_probe(chosen, rejected, [str(i) for i in range(10)], [])
