"""The step: forward, losses and metrics of one packed micro-batch.

As in the DPO reference implementation, three pieces: the concatenated forward (one pass of
``[prompt | chosen | rejected | degree variants]`` rows through the prepared
:class:`~spo.training.forward.SPOModule`), the losses (``spo.training.losses``: the alignment
loss of the pair and λ_w·L_w + λ_l·L_l of its degree samples) and the metrics (named sums in an
:class:`~spo.training.metrics.Accumulator`). No optimizer, no backward: the loop owns those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from spo.config import TrainConfig
from spo.training.data import SIDES, PackedBatch, PairExample
from spo.training.losses import degree_loss, dpo_loss, ipo_loss, kto_loss, level_weights
from spo.training.metrics import Accumulator
from spo.training.plan import DataPlan
from spo.training.reference import Reference


@dataclass
class StepOutput:
    """The loss to back-propagate and its parts (floats for the log; per-pair log-prob tensors)."""

    loss: Tensor
    parts: dict[str, Any]


class PreferenceStep:
    """The loss of a micro-batch for ``cfg``: ``model`` is the prepared (DDP/FSDP) policy module,
    ``reference`` gives the reference log-probs of the same rows, ``data`` builds KTO's rows.

    ``level_weights``: with ``levels_per_step`` m < N sampled levels, level 0 is in every sample and
    each other level in only (m-1)/(N-1) of them, so level 0 is weighted down (balance_levels),
    else the head could learn the prior alone.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, reference: Reference, data: DataPlan, accelerator: Any,
                 n_levels: int) -> None:
        self.cfg = cfg
        self.model = model
        self.reference = reference
        self.data = data
        self.accelerator = accelerator
        self.sides = cfg.spo.sides
        self.level_weights = level_weights(n_levels, cfg.spo.levels_per_step) if cfg.spo.balance_levels else None

    def concatenated_forward(self, batch: PackedBatch) -> dict[str, Any]:
        """The policy on one packed batch: log-probs of the 2b alignment rows and the degree logits.

        Always through the prepared (DDP/FSDP) module: a sharded model's parameters exist only
        inside its own forward."""
        return self.model(batch, self.sides)

    @torch.no_grad()
    def kl_estimate(self, split: str, indices: Sequence[int], partners: dict[int, int], epoch: int) -> Tensor:
        """KTO's z0 before clamping: the mean over ``indices`` of all processes, and over both
        responses of each one's partner, of log π_θ(y'|x) − log π_ref(y'|x) on mismatched rows;
        every process must call it (all-reduce)."""
        mb = self.cfg.optim.micro_batch_size
        chunks = [list(indices[i: i + mb]) for i in range(0, len(indices), mb)]
        total = torch.zeros(2, device=self.accelerator.device, dtype=torch.float64)
        for idx in chunks:
            batch = self.data.kl_batch(idx, partners, split)
            policy = self.model(batch)["logps"]
            reference = self.reference.logps(split, batch, kl_epoch=epoch).to(policy.device)
            total[0] += (policy.double() - reference.double()).sum()
            total[1] += policy.numel()  # two rows per pair: its partner's chosen and rejected responses
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return (total[0] / total[1].clamp(min=1)).float()

    def alignment_losses(self, policy: Tensor, reference: Tensor, counts: Tensor, b: int,
                         z0: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Per-pair alignment losses and the detached rewards: (losses [b], chosen [b], rejected [b], z0)."""
        cfg = self.cfg
        pc, pr = policy[:b], policy[b:]
        rc, rr = reference[:b].to(policy.dtype), reference[b:].to(policy.dtype)
        if cfg.loss == "dpo":
            return (*dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing), None)
        if cfg.loss == "ipo":
            if cfg.ipo_length_normalize:  # per-token averages (TRL's ipo)
                n = counts.to(policy.dtype).clamp(min=1)
                pc, pr, rc, rr = pc / n[:b], pr / n[b:], rc / n[:b], rr / n[b:]
            return (*ipo_loss(pc, pr, rc, rr, cfg.beta), None)
        assert z0 is not None
        losses, cr, rj, z0 = kto_loss(pc, pr, None, rc, rr, None, cfg.beta, cfg.desirable_weight,
                                      cfg.undesirable_weight, kl=z0)
        return (losses if cfg.kto_reduction == "pair" else losses / 2), cr, rj, z0

    def degree_losses(self, out: dict[str, Any], batch: PackedBatch, totals: Sequence[float] | None = None,
                      metrics: Accumulator | None = None) -> tuple[Tensor | float, dict[int, float]]:
        """λ_w·L_w + λ_l·L_l of the batch's samples and each side's L (detached); ``totals``: the
        samples' summed level weight per side over all of a micro-batch's passes (the mean's denominator)."""
        loss: Tensor | float = 0.0
        parts: dict[int, float] = {}
        for s, side in enumerate(SIDES):
            if not self.sides[s]:
                continue
            logits = out[f"degree_{side}"]
            sel = batch.deg_side == s
            labels = batch.deg_label[sel] if sel.any() else torch.full((1,), -100, device=logits.device)
            dl = degree_loss(logits, labels, None if totals is None else totals[s], self.weights(batch))
            loss = loss + (self.cfg.spo.lambda_w, self.cfg.spo.lambda_l)[s] * dl
            parts[s] = float(dl.detach())
            if metrics is not None and labels.ne(-100).any():
                predicted = logits.detach().argmax(-1)
                metrics.add_confusion(s, labels.detach(), predicted)
                metrics.add_responses(s, batch.deg_pair[sel], labels.detach(), predicted)
        return loss, parts

    def variant_passes(self, examples: list[PairExample], indices: Sequence[int], step: int,
                       batch: PackedBatch) -> tuple[list[PackedBatch], list[float]]:
        """The micro-batch's variant passes (on the device) and its samples per side over all passes."""
        collator, device = self.data.collator, self.accelerator.device
        with record_function("spo/collate"):  # named for bench/bench_gpu.py --profile (free without a profiler)
            passes = [p.to(device) for p in collator.variant_passes(examples, indices, step, batch.n_tokens)]
        return passes, [sum(self.sample_weight(p, s) for p in (batch, *passes)) for s in range(2)]

    def weights(self, batch: PackedBatch) -> Tensor | None:
        """The level weights where the batch's levels were sampled; an all-levels (eval) batch is balanced already."""
        return self.level_weights if batch.levels_sampled else None

    def sample_weight(self, batch: PackedBatch, side: int) -> float:
        """The summed level weight of a pass's degree samples of one side (their count when unweighted)."""
        labels = batch.deg_label[(batch.deg_side == side) & (batch.deg_label != -100)]
        weights = self.weights(batch)
        if weights is None:
            return float(labels.numel())
        return float(weights.to(labels.device)[labels].sum())

    def variant_pass(self, batch: PackedBatch, totals: Sequence[float],
                     metrics: Accumulator | None) -> tuple[Tensor | float, dict[int, float]]:
        """The degree loss of one pass of variants (``variant_passes: separate``): no alignment rows."""
        return self.degree_losses(self.concatenated_forward(batch), batch, totals, metrics)

    def forward_loss(self, batch: PackedBatch, split: str, metrics: Accumulator | None,
                     z0: Tensor | None = None, totals: Sequence[float] | None = None,
                     carried: dict[int, float] | None = None) -> StepOutput:
        """The alignment pass's loss; ``carried``: the degree losses the micro-batch's variant passes
        already back-propagated, added to the reported parts only."""
        b = batch.n_pairs
        out = self.concatenated_forward(batch)
        policy = out["logps"]
        reference = self.reference.logps(split, batch).to(policy.device)
        counts = batch.score_counts()
        losses, chosen_rewards, rejected_rewards, z0 = self.alignment_losses(policy, reference, counts, b, z0)
        loss_align = losses.mean()
        degree, degree_parts = self.degree_losses(out, batch, totals, metrics)
        loss = loss_align + degree
        parts: dict[str, Any] = {}
        lambdas = (self.cfg.spo.lambda_w, self.cfg.spo.lambda_l)
        reported = float(loss.detach())
        for s, value in degree_parts.items():
            value += (carried or {}).get(s, 0.0)
            reported += lambdas[s] * (carried or {}).get(s, 0.0)
            parts[f"loss_degree_{'wl'[s]}"] = value
        parts["loss_align"] = float(loss_align.detach())
        parts["loss"] = reported
        if z0 is not None:
            parts["kl"] = float(z0)
        if metrics is not None:
            _record(metrics, parts, batch, out, chosen_rewards, rejected_rewards, counts)
        parts.update({"chosen_logps": policy[:b].detach().cpu(), "rejected_logps": policy[b:].detach().cpu(),
                      "reference_chosen_logps": reference[:b].detach().cpu(),
                      "reference_rejected_logps": reference[b:].detach().cpu()})
        return StepOutput(loss, parts)


def _record(metrics: Accumulator, parts: dict[str, Any], batch: PackedBatch, out: dict[str, Any],
            chosen_rewards: Tensor, rejected_rewards: Tensor, counts: Tensor) -> None:
    """The micro-batch's sums for the log (TRL's metric names; ratios are taken after the all-reduce)."""
    b = batch.n_pairs
    for name, value in parts.items():
        metrics.add(name, value)
    logps, logits = out["logps"].detach().float(), out["logits_sum"].float()
    metrics.add("micro_batches", 1)
    metrics.add("pairs", b)
    metrics.add("reward_chosen", chosen_rewards.float().sum())
    metrics.add("reward_rejected", rejected_rewards.float().sum())
    metrics.add("reward_margin", (chosen_rewards - rejected_rewards).float().sum())
    metrics.add("reward_accuracy", (chosen_rewards > rejected_rewards).float().sum())
    metrics.add("logps_chosen", logps[:b].sum())
    metrics.add("logps_rejected", logps[b:].sum())
    metrics.add("logits_chosen", logits[:b].sum())
    metrics.add("logits_rejected", logits[b:].sum())
    metrics.add("tokens_chosen", counts[:b].sum())
    metrics.add("tokens_rejected", counts[b:].sum())
    metrics.add("excluded_w", batch.excluded[0])
    metrics.add("excluded_l", batch.excluded[1])
    metrics.add("tokens", batch.n_tokens)
