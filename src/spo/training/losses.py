"""Per-example alignment losses (DPO, IPO, KTO) and the SPO degree loss.

Every function takes per-example tensors and returns per-example losses, so the trainer decides
how to reduce (mean over the batch, masking of skipped rows, distributed averaging). The
formulas follow docs/method.md ("Alignment losses"; the degree loss is the row loss of "Our
definitions and defaults"). Rewards are always β·(log π_θ − log π_ref), detached: they are
metrics, never a path for gradients. Reference log-probs are detached on entry: π_ref is fixed
(with LoRA it is the same network with adapters off), so even if a caller forgot
``torch.no_grad`` no gradient may reach it through the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["degree_loss", "dpo_loss", "ipo_loss", "kto_loss", "level_weights"]


def _rewards(policy: Tensor, reference: Tensor, beta: float) -> Tensor:
    """β·(policy − reference), detached: a logging metric that must not feed the backward pass."""
    return (beta * (policy - reference)).detach()


def _log_ratio_gap(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, beta: float,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """(π_c − r_c) − (π_r − r_r), shared by DPO and IPO, plus the detached rewards of both sides.

    The reference is detached here so no loss can leak gradient into it.
    """
    reference_chosen_logps = reference_chosen_logps.detach()
    reference_rejected_logps = reference_rejected_logps.detach()
    logits = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    rewards = (
        _rewards(policy_chosen_logps, reference_chosen_logps, beta),
        _rewards(policy_rejected_logps, reference_rejected_logps, beta),
    )
    return logits, rewards


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al.), with conservative label smoothing ε.

    h = β·((π_c − r_c) − (π_r − r_r)); loss = −(1−ε)·logσ(h) − ε·logσ(−h).
    ``F.logsigmoid`` keeps it finite for large |h| (log(sigmoid(h)) underflows to −inf).
    Inputs are summed response log-probs, shape [B]. Returns (losses [B], chosen_rewards [B],
    rejected_rewards [B]).
    """
    logits, rewards = _log_ratio_gap(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                     reference_rejected_logps, beta)
    h = beta * logits
    losses = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return (losses, *rewards)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al., Eq. 17): (logits − 1/(2β))², logits = (π_c − r_c) − (π_r − r_r).

    The regression target 1/(2β) applies to the *unscaled* log-ratio gap (= h/β), as in TRL's
    ``ipo`` loss type and the DPO reference repo. This function is agnostic to normalisation: it
    uses whatever log-probs it is given. Note TRL length-normalises for IPO (average per-token
    log-probs), because summed log-probs make the squared loss grow with response length; the
    trainer passes averages with ``train.ipo_length_normalize: true``. Returns (losses [B], chosen_rewards [B],
    rejected_rewards [B]).
    """
    logits, rewards = _log_ratio_gap(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                     reference_rejected_logps, beta)
    losses = (logits - 1.0 / (2.0 * beta)) ** 2
    return (losses, *rewards)


def kto_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    policy_kl_logps: Tensor | None,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    reference_kl_logps: Tensor | None,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    *,
    kl: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """KTO (Ethayarajh et al.) on paired data: y_w is desirable, y_l undesirable.

    z0 = clamp(mean(policy_kl_logps − reference_kl_logps), min=0).detach(): the batch estimate of
    KL(π_θ‖π_ref) from mismatched (x, y) pairs. It is a reference point, not a training target,
    hence detached; clamped because a KL is non-negative. In training the mean must be over the
    global batch (all micro-batches, all processes): the trainer computes it once per step and
    passes it as ``kl``, in which case ``policy_kl_logps``/``reference_kl_logps`` are ignored
    (``kl`` is still clamped and detached here).

    per pair: λ_D·(1 − σ(β·((π_c − r_c) − z0))) + λ_U·(1 − σ(β·(z0 − (π_r − r_r))))

    — the method spec's per-pair SUM of the desirable and undesirable terms. TRL's convention
    (the mean over the 2B responses of a mixed batch) is exactly half of it; the trainer offers
    it as ``train.kto_reduction: response``. Returns (losses [B], chosen_rewards [B],
    rejected_rewards [B], z0 scalar).
    """
    if kl is None:
        if policy_kl_logps is None or reference_kl_logps is None:
            raise ValueError("kto_loss needs the mismatched rows' log-probs, or their KL estimate as kl")
        kl = (policy_kl_logps - reference_kl_logps).mean()
    z0 = kl.clamp(min=0).detach()
    reference_chosen_logps = reference_chosen_logps.detach()
    reference_rejected_logps = reference_rejected_logps.detach()
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    chosen_losses = 1.0 - torch.sigmoid(beta * (chosen_logratios - z0))
    rejected_losses = 1.0 - torch.sigmoid(beta * (z0 - rejected_logratios))
    losses = desirable_weight * chosen_losses + undesirable_weight * rejected_losses
    return (
        losses,
        _rewards(policy_chosen_logps, reference_chosen_logps, beta),
        _rewards(policy_rejected_logps, reference_rejected_logps, beta),
        z0,
    )


def degree_loss(logits: Tensor, labels: Tensor, total: float | None = None,
                level_weights: Tensor | None = None) -> Tensor:
    """Mean cross-entropy of a degree head over its variants (logits [M, N], labels [M] int64).

    Labels of −100 are ignored (e.g. responses excluded because their levels are not distinct).
    If nothing is left (all ignored, or M == 0) the result is ``logits.sum() * 0``: a zero that
    stays attached to the graph, because ``F.cross_entropy`` would return NaN (0/0 mean), and a
    detached constant would break ``backward()`` / make DDP see unused head parameters.
    ``level_weights`` [N]: a weighted mean, Σ w_y·CE / Σ w_y (``train.spo.balance_levels``, see
    :func:`level_weights`). ``total``: divide the (weighted) summed cross-entropy by this instead —
    the summed weight of the samples of all the passes one mean is spread over
    (``train.spo.variant_passes: separate``), so that the passes' losses add up to the one mean.
    """
    if labels.numel() == 0 or bool((labels == -100).all()):
        return logits.sum() * 0.0
    weight = None if level_weights is None else level_weights.to(device=logits.device, dtype=torch.float32)
    if total is None:
        return F.cross_entropy(logits.float(), labels.long(), weight=weight, ignore_index=-100)
    summed = F.cross_entropy(logits.float(), labels.long(), weight=weight, ignore_index=-100, reduction="sum")
    return summed / max(total, 1e-12)


def level_weights(n_levels: int, levels_per_step: int | None) -> Tensor | None:
    """Per-level weights that undo the level-0 bias of sampling ``levels_per_step`` m < N levels.

    Level 0 is drawn for every response, each level k > 0 with probability (m−1)/(N−1), so
    weighting level 0 by (m−1)/(N−1) gives every level the same expected weight per response.
    None (unweighted) when all levels are scored: the labels are balanced already.
    """
    m = levels_per_step
    if m is None or m >= n_levels or n_levels < 2:
        return None
    weights = torch.ones(n_levels)
    weights[0] = (m - 1) / (n_levels - 1)
    return weights
