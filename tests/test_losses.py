"""The alignment and degree losses against hand-derived values and a naive implementation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spo.training.losses import degree_loss, dpo_loss, ipo_loss, kto_loss, level_weights

BETA = 0.1


def _t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def _pair(gaps: list[float]) -> tuple[torch.Tensor, ...]:
    """Policy/reference log-probs whose log-ratio gap (π_c−r_c)−(π_r−r_r) equals each value of gaps."""
    pc = _t(*[-10.0 + g for g in gaps], grad=True)
    pr = _t(*[-12.0] * len(gaps), grad=True)
    rc = _t(*[-10.0] * len(gaps), grad=True)
    rr = _t(*[-12.0] * len(gaps), grad=True)
    return pc, pr, rc, rr


def test_dpo_hand_values() -> None:
    # gap 0 -> h=0 -> σ=1/2 -> loss ln2; gap 10·ln3 -> h=ln3 -> σ=3/4 -> loss ln(4/3); gap -10·ln3 -> σ=1/4 -> ln4
    pc, pr, rc, rr = _pair([0.0, 10 * math.log(3), -10 * math.log(3)])
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, BETA)
    assert losses.tolist() == pytest.approx([math.log(2), math.log(4 / 3), math.log(4)], rel=1e-9)
    assert cr.tolist() == pytest.approx([0.0, math.log(3), -math.log(3)], rel=1e-9, abs=1e-12)
    assert rj.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)


def test_dpo_label_smoothing() -> None:
    pc, pr, rc, rr = _pair([10 * math.log(3)])  # σ(h)=3/4, σ(−h)=1/4
    eps = 0.2
    losses, _, _ = dpo_loss(pc, pr, rc, rr, BETA, label_smoothing=eps)
    expected = -(1 - eps) * math.log(3 / 4) - eps * math.log(1 / 4)
    assert losses.item() == pytest.approx(expected, rel=1e-9)
    # ε = 1/2 makes the loss symmetric in h: minimised (ln2) at h=0, not increasing with h.
    half, _, _ = dpo_loss(pc, pr, rc, rr, BETA, label_smoothing=0.5)
    assert half.item() == pytest.approx(-0.5 * math.log(3 / 4) - 0.5 * math.log(1 / 4), rel=1e-9)


def test_dpo_stable_for_large_margins() -> None:
    pc, pr, rc, rr = _pair([-1e5, 1e5])
    losses, _, _ = dpo_loss(pc, pr, rc, rr, BETA)
    assert torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(1e4, rel=1e-9)  # −logσ(−1e4) = 1e4
    assert losses[1].item() == pytest.approx(0.0, abs=1e-12)


def test_ipo_hand_values_and_target() -> None:
    target = 1 / (2 * BETA)  # = 5: the loss is zero there, on the unscaled gap
    pc, pr, rc, rr = _pair([0.0, target, 7.0])
    losses, cr, _ = ipo_loss(pc, pr, rc, rr, BETA)
    assert losses.tolist() == pytest.approx([25.0, 0.0, 4.0], abs=1e-9)
    assert cr.tolist() == pytest.approx([0.0, BETA * target, 0.7], abs=1e-12)
    # the target moves with β: β = 0.5 -> 1/(2β) = 1
    losses, _, _ = ipo_loss(*_pair([1.0, 3.0]), beta=0.5)
    assert losses.tolist() == pytest.approx([0.0, 4.0], abs=1e-9)


def test_kto_hand_values() -> None:
    # r_c = 10·ln3, r_r = −10·ln3, z0 = 0 (policy == reference on the KL pairs)
    pc, rc = _t(-10.0 + 10 * math.log(3), grad=True), _t(-10.0)
    pr, rr = _t(-20.0 - 10 * math.log(3), grad=True), _t(-20.0)
    pk, rk = _t(-5.0, -7.0), _t(-5.0, -7.0)
    losses, cr, rj, kl = kto_loss(pc, pr, pk, rc, rr, rk, BETA, desirable_weight=2.0, undesirable_weight=3.0)
    assert kl.item() == 0.0
    # chosen: 1 − σ(ln3) = 1/4, weighted ×2; rejected: 1 − σ(0 − (−ln3)) = 1/4, weighted ×3;
    # the spec's per-pair loss is their sum
    assert losses.tolist() == pytest.approx([2 * 0.25 + 3 * 0.25], rel=1e-9)
    assert cr.item() == pytest.approx(math.log(3), rel=1e-9)
    assert rj.item() == pytest.approx(-math.log(3), rel=1e-9)


def test_kto_layout_and_positive_z0() -> None:
    # two pairs; KL log-ratios 2 and 4 -> z0 = 3
    pc, rc = _t(-1.0, -2.0, grad=True), _t(-4.0, -2.0)  # r_c = 3, 0
    pr, rr = _t(-6.0, -3.0, grad=True), _t(-6.0, -5.0)  # r_r = 0, 2
    pk, rk = _t(-1.0, -1.0, grad=True), _t(-3.0, -5.0)
    losses, _, _, kl = kto_loss(pc, pr, pk, rc, rr, rk, BETA)
    assert kl.item() == pytest.approx(3.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    chosen = [1 - sig(BETA * (3 - 3)), 1 - sig(BETA * (0 - 3))]
    rejected = [1 - sig(BETA * (3 - 0)), 1 - sig(BETA * (3 - 2))]
    assert losses.shape == (2,)  # one loss per pair: desirable + undesirable term
    assert losses.tolist() == pytest.approx([c + r for c, r in zip(chosen, rejected)], rel=1e-9)


def test_kto_z0_clamped_and_detached() -> None:
    pc, pr, rc, rr = _t(-1.0, grad=True), _t(-2.0, grad=True), _t(-1.0), _t(-2.0)
    pk, rk = _t(-9.0, -9.0, grad=True), _t(-1.0, -1.0)  # mean KL log-ratio −8 -> clamped to 0
    losses, _, _, kl = kto_loss(pc, pr, pk, rc, rr, rk, BETA)
    assert kl.item() == 0.0 and kl.grad_fn is None and not kl.requires_grad
    assert losses.tolist() == pytest.approx([0.5 + 0.5])
    pk2 = _t(1.0, 1.0, grad=True)  # positive KL: still detached
    losses, _, _, kl = kto_loss(pc, pr, pk2, rc, rr, rk, BETA)
    assert kl.item() == pytest.approx(2.0) and kl.grad_fn is None
    losses.sum().backward()
    assert pk2.grad is None and pc.grad is not None


def test_kto_precomputed_kl_overrides() -> None:
    pc, pr, rc, rr = _t(-1.0), _t(-2.0), _t(-1.0), _t(-2.0)
    pk, rk = _t(100.0), _t(0.0)
    _, _, _, kl = kto_loss(pc, pr, pk, rc, rr, rk, BETA, kl=torch.tensor(0.5, dtype=torch.float64))
    assert kl.item() == 0.5
    _, _, _, kl = kto_loss(pc, pr, pk, rc, rr, rk, BETA, kl=torch.tensor(-0.5, dtype=torch.float64))
    assert kl.item() == 0.0


@pytest.mark.parametrize("name", ["dpo", "ipo", "kto"])
def test_gradients_reach_policy_not_reference_and_rewards_detached(name: str) -> None:
    pc, pr, rc, rr = _pair([1.0, -2.0])
    if name == "kto":
        pk, rk = _t(-1.0, -2.0, grad=True), _t(-3.0, -1.0, grad=True)
        losses, cr, rj, _ = kto_loss(pc, pr, pk, rc, rr, rk, BETA)
    else:
        fn = dpo_loss if name == "dpo" else ipo_loss
        losses, cr, rj = fn(pc, pr, rc, rr, BETA)  # reference deliberately given requires_grad=True
    assert cr.grad_fn is None and rj.grad_fn is None and not cr.requires_grad and not rj.requires_grad
    losses.mean().backward()
    assert pc.grad is not None and pc.grad.abs().sum() > 0
    assert pr.grad is not None and pr.grad.abs().sum() > 0
    assert rc.grad is None and rr.grad is None  # the loss detaches the reference
    if name == "kto":
        assert rk.grad is None and pk.grad is None  # z0 is detached


def test_dpo_gradient_sign() -> None:
    pc, pr, rc, rr = _pair([0.0])
    losses, _, _ = dpo_loss(pc, pr, rc.detach(), rr.detach(), BETA)
    losses.sum().backward()
    # d(−logσ(h))/dπ_c = −β·σ(−h) = −0.05 at h = 0; +0.05 for π_r
    assert pc.grad.item() == pytest.approx(-BETA * 0.5)
    assert pr.grad.item() == pytest.approx(BETA * 0.5)


def _naive_dpo(pc: float, pr: float, rc: float, rr: float, beta: float, eps: float) -> float:
    h = beta * ((pc - rc) - (pr - rr))
    logsig = lambda x: -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))  # noqa: E731
    return -(1 - eps) * logsig(h) - eps * logsig(-h)


_logp = st.floats(min_value=-500.0, max_value=0.0, allow_nan=False)


# no deadline and no too_slow health check: both fail on wall-clock time, i.e. on a loaded machine
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(st.tuples(_logp, _logp, _logp, _logp), min_size=1, max_size=6),
    beta=st.floats(min_value=0.01, max_value=2.0),
    eps=st.floats(min_value=0.0, max_value=0.49),
)
def test_dpo_matches_naive_float_implementation(rows: list[tuple[float, ...]], beta: float, eps: float) -> None:
    """TRL 1.16 has no standalone DPO loss function (it is inline in DPOTrainer._compute_loss), so we
    compare with an independent per-example float implementation."""
    cols = [torch.tensor(c, dtype=torch.float64) for c in zip(*rows)]
    losses, cr, rj = dpo_loss(*cols, beta=beta, label_smoothing=eps)
    for i, (pc, pr, rc, rr) in enumerate(rows):
        assert losses[i].item() == pytest.approx(_naive_dpo(pc, pr, rc, rr, beta, eps), rel=1e-9, abs=1e-9)
        assert cr[i].item() == pytest.approx(beta * (pc - rc), rel=1e-9, abs=1e-9)
        assert rj[i].item() == pytest.approx(beta * (pr - rr), rel=1e-9, abs=1e-9)


def test_degree_loss_hand_values() -> None:
    # uniform logits over N=4 -> CE ln4; logits [ln3, 0] with label 0 -> CE = ln(4/3)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, -1e9, -1e9]], requires_grad=True)
    loss = degree_loss(logits, torch.tensor([2, 0]))
    assert loss.item() == pytest.approx((math.log(4) + math.log(4 / 3)) / 2, rel=1e-6)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_degree_loss_ignores_minus_100() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    loss = degree_loss(logits, torch.tensor([-100, 1]))
    assert loss.item() == pytest.approx(-math.log(1 / (math.exp(5) + 3)), rel=1e-6)


@pytest.mark.parametrize("m", [0, 3])
def test_degree_loss_empty_is_attached_zero(m: int) -> None:
    logits = torch.randn(m, 4, requires_grad=True)
    loss = degree_loss(logits, torch.full((m,), -100, dtype=torch.long))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert loss.requires_grad
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_level_weights_make_every_level_count_alike_under_sampling() -> None:
    """m of N levels per response, level 0 always in: level 0 by (m-1)/(N-1), so each level's
    expected weight per response is the same (counted over every draw of the sampler)."""
    from spo.training.data import sample_levels

    assert level_weights(4, None) is None and level_weights(4, 4) is None  # all levels: balanced already
    w = level_weights(4, 2)
    assert w is not None and w.tolist() == pytest.approx([1 / 3, 1.0, 1.0, 1.0])
    counts = torch.zeros(4)
    for step in range(300):
        for k in sample_levels(4, 2, 0, step, 0, "chosen"):
            counts[k] += 1
    weighted = counts * w
    assert (weighted / weighted.sum()).tolist() == pytest.approx([0.25] * 4, abs=0.03)
    assert counts[0] / counts.sum() == pytest.approx(0.5)  # unweighted, half the labels are 0


def test_degree_loss_weighted_hand_values() -> None:
    # labels [0, 2] with weights [1/3, 1, 1, 1]: (1/3·CE_0 + 1·CE_2) / (1/3 + 1)
    logits = torch.tensor([[math.log(3), 0.0, -1e9, -1e9], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    weights = torch.tensor([1 / 3, 1.0, 1.0, 1.0])
    loss = degree_loss(logits, torch.tensor([0, 2]), level_weights=weights)
    expected = (math.log(4 / 3) / 3 + math.log(4)) / (4 / 3)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # spread over passes: each pass divides its weighted sum by the summed weight of all of them
    first = degree_loss(logits[:1], torch.tensor([0]), total=4 / 3, level_weights=weights)
    second = degree_loss(logits[1:], torch.tensor([2]), total=4 / 3, level_weights=weights)
    assert (first + second).item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # the level-0 row's gradient is scaled by its weight share: (1/3)/(4/3) of an unweighted row's
    plain = torch.tensor([[math.log(3), 0.0, -1e9, -1e9]], requires_grad=True)
    degree_loss(plain, torch.tensor([0])).backward()
    assert torch.allclose(logits.grad[0], plain.grad[0] * 0.25, atol=1e-7)
