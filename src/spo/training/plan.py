"""The run's data plan: which pairs each optimizer step trains on, and their packed batches.

One object shared by the three pieces that need the same pairs in the same order: the loop
(each step's global batch), the step (KTO's mismatched rows for z0) and the precomputed
reference (every alignment and KTO row the run will score, computed once before training).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from spo.config import TrainConfig
from spo.errors import InputError
from spo.training.data import PackedBatch, PairCollator, PairExample, epoch_batches, kl_partners

# a plan of KTO mismatched rows: split -> epoch (eval: 0) -> {pair index: partner index}
KlPlan = dict[str, dict[int, dict[int, int]]]


class DataPlan:
    """The tokenised pairs of both splits, the step count, the batch order, and a collator that
    packs given pairs onto ``device``.

    The order depends on the rows, the seed, the batch size and the alignment lengths only, never
    on the loss options, so the policies of a comparison share it.
    """

    def __init__(self, cfg: TrainConfig, train_examples: Sequence[PairExample],
                 eval_examples: Sequence[PairExample] | None, pad_token_id: int, seed: int, device: Any) -> None:
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples or [])[: cfg.eval_rows]
        self.seed = seed
        self.device = device
        self.batch_size = cfg.optim.batch_size
        self.group_by_length = cfg.group_by_length
        self.max_length = cfg.max_length
        self.collator = PairCollator(pad_token_id, cfg.spo.active_mode, cfg.spo.levels_per_step, seed,
                                     pad_to_multiple_of=cfg.pad_to_multiple_of,
                                     separate_variants=cfg.spo.variant_passes == "separate")
        self.steps_per_epoch = len(self.train_examples) // self.batch_size
        if self.steps_per_epoch == 0:
            raise InputError(f"{len(self.train_examples)} training pairs are fewer than one batch "
                             f"(optim.batch_size {self.batch_size})")
        oc = cfg.optim
        self.total_steps = oc.max_steps or max(1, math.ceil(oc.epochs * self.steps_per_epoch))

    def examples(self, split: str) -> list[PairExample]:
        return self.train_examples if split == "train" else self.eval_examples

    def splits(self) -> dict[str, list[PairExample]]:
        """The splits the run scores: train, and eval when there are eval pairs."""
        return {"train": self.train_examples, **({"eval": self.eval_examples} if self.eval_examples else {})}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches (train pair indices) of one epoch, in order."""
        lengths = [e.alignment_length for e in self.train_examples]
        return epoch_batches(lengths, self.batch_size, self.seed, epoch, self.group_by_length)

    def pair_order(self) -> list[list[str]]:
        """The pair ids of every optimizer step's global batch, in order: the run's data plan.

        Its hash is in the summary (``pair_order_sha256``) for anyone to check that the policies
        of a comparison trained on the same pairs.
        """
        order: list[list[str]] = []
        for step in range(self.total_steps):
            epoch, pos = divmod(step, self.steps_per_epoch)
            if pos == 0:
                batches = self.epoch_batches(epoch)
            order.append([self.train_examples[i].id for i in batches[pos]])
        return order

    def kl_plan(self) -> KlPlan:
        """Every KTO mismatched row of the run: per epoch, each pair with the next pair of its global
        batch; eval: each eval pair with the next eval pair (the whole eval set is z0's batch)."""
        epochs = -(-self.total_steps // self.steps_per_epoch)
        plan: KlPlan = {"train": {}}
        for epoch in range(epochs):
            partners: dict[int, int] = {}
            for batch in self.epoch_batches(epoch):
                partners.update(kl_partners(batch))
            plan["train"][epoch] = partners
        if self.eval_examples:
            plan["eval"] = {0: kl_partners(list(range(len(self.eval_examples))))}
        return plan

    def alignment_batch(self, indices: Sequence[int], split: str) -> PackedBatch:
        """The pairs' alignment rows only (no degree variants): what the reference scores."""
        examples = self.examples(split)
        return self.collator([examples[i] for i in indices], list(indices), degrees=False).to(self.device)

    def kl_batch(self, indices: Sequence[int], partners: dict[int, int], split: str) -> PackedBatch:
        """KTO's mismatched rows: each pair's prompt with both responses of its partner."""
        examples = self.examples(split)
        return self.collator.kl([examples[i] for i in indices], [examples[partners[i]] for i in indices], list(indices),
                                self.max_length).to(self.device)
