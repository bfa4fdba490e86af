"""Optimizer and learning-rate schedule from an :class:`~spo.config.OptimConfig`.

One definition for the trainer and the reward model (SFT hands the same names to TRL), with
transformers' names and schedules so a TRL user's settings mean the same thing here. Weight
decay applies to matrices only: biases, norm weights and other 1-D tensors are not decayed (as
in TRL/transformers' Trainer).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from spo.config import OptimConfig


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """``warmup_ratio`` of the steps (rounded up) when set, else ``warmup_steps``; never past the end."""
    steps = math.ceil(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio is not None else cfg.warmup_steps
    return min(steps, total_steps)


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig, *, head_params: Iterable[nn.Parameter] = (),
                    head_learning_rate: float | None = None) -> torch.optim.Optimizer:
    """The optimizer over the trainable ``params``, with decay on tensors of 2 or more dimensions only.

    ``head_params`` (among ``params``) get ``head_learning_rate`` instead of ``cfg.learning_rate``:
    SPO's degree heads start from random init while the policy is pretrained, so the rate that
    nudges a LoRA policy barely moves a fresh MLP in a few dozen steps. The schedule scales every
    group by the same factor, so warm-up and decay apply to both.
    """
    head_ids = {id(p) for p in head_params} if head_learning_rate is not None else set()
    trainable = [p for p in params if p.requires_grad]
    groups = []
    for is_head in (False, True):
        mine = [p for p in trainable if (id(p) in head_ids) == is_head]
        lr = {"lr": head_learning_rate} if is_head else {}
        groups += [
            {"params": [p for p in mine if p.ndim >= 2], "weight_decay": cfg.weight_decay, **lr},
            {"params": [p for p in mine if p.ndim < 2], "weight_decay": 0.0, **lr},
        ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_epsilon, fused=cfg.optimizer == "adamw_torch_fused" or None)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' schedule of that name: warm-up, then linear/cosine decay to 0 at ``total_steps``, or constant."""
    from transformers import get_scheduler

    name = "constant" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    warmup = None if name == "constant" else warmup_steps(cfg, total_steps)
    training = total_steps if name in ("linear", "cosine") else None  # None: get_scheduler's defaults
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=training)
