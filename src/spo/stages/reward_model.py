"""Stage ``reward_model``: train the local judge, a Bradley-Terry reward model on the SFT backbone.

Trains on the pairs of ``reward_model.split`` (the eval split), which must share no row id and
no prompt ``group`` with train.jsonl (the policy's pairs) or test.jsonl (the prompts the judge
will grade); a violation is an InputError.  A deterministic ``held_out_fraction`` of those
pairs (by hash of the group, else the id) is kept aside to measure the judge's own pair
accuracy before and after training.  A plain torch loop (see docs/reward_judge.md for why), or,
with ``train_backbone: false``, a linear probe: the frozen backbone's features computed once and
the value head fitted to convergence (:mod:`spo.judging.probe`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from spo.config import OptimConfig, SpoConfig
from spo.errors import InputError
from spo.io import atomic_dir, read_jsonl, tree_sha256, write_json, write_provenance

log = logging.getLogger("spo.reward_model")

HOLD_OUT_SALT = "spo-reward-heldout-v1"
_FIELDS = ("id", "prompt", "chosen", "rejected", "source")


def _read(folder: Path, split: str, fields: tuple[str, ...]) -> tuple[list[dict[str, Any]], Path]:
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: {split} split not found (run prepare and validate first)")
    rows = read_jsonl(path)
    for line_no, row in enumerate(rows, start=1):
        for field in fields:
            if not isinstance(row.get(field), str):
                raise InputError(f"{path}:{line_no}: field {field!r} is missing or not a string")
    return rows, path


def check_disjoint(rows: list[dict[str, Any]], rows_path: Path, others: dict[str, list[dict[str, Any]]]) -> None:
    """InputError when a row id or prompt group of ``rows`` occurs in any of ``others``."""
    for name, other in others.items():
        ids = {r.get("id") for r in other} - {None}
        groups = {r.get("group") for r in other} - {None}
        for line_no, row in enumerate(rows, start=1):
            if row["id"] in ids:
                raise InputError(f"{rows_path}:{line_no}: row id {row['id']!r} also occurs in {name}; "
                                 "the reward model's pairs must be disjoint from it")
            if row.get("group") is not None and row["group"] in groups:
                raise InputError(f"{rows_path}:{line_no}: prompt group {row['group']!r} also occurs in {name}; "
                                 "the reward model's pairs must be disjoint from it")


def is_held_out(row: dict[str, Any], fraction: float) -> bool:
    """Deterministic: a hash of the row's group (its id when it has none), so one prompt's pairs stay together."""
    key = str(row.get("group") or row["id"])
    value = int(hashlib.sha256(f"{HOLD_OUT_SALT}:{key}".encode()).hexdigest()[:12], 16) / 16**12
    return value < fraction


class PairIds(NamedTuple):
    """Token ids of both sides of the train and held-out pairs, in row order: the loop, the probe and
    the held-out accuracy all read them, so each response is tokenized once."""

    train_chosen: list[list[int]]
    train_rejected: list[list[int]]
    held_chosen: list[list[int]]
    held_rejected: list[list[int]]


def run(cfg: SpoConfig) -> dict[str, Any]:
    """Split the pairs, tokenize them once, fit the whole model (or only its value head), save.

    The seed is set before anything is built, so whatever draws from the global generators
    repeats run to run; the loop's shuffling has a generator of its own from the same seed.
    """
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import set_seed

    rm = cfg.reward_model
    set_seed(cfg.seed, deterministic=False)
    rows_dir, sft_dir = Path(rm.rows_dir), Path(rm.sft_dir)
    rows, rows_path = _read(rows_dir, rm.split, _FIELDS)
    train, held = _split_pairs(rows, rows_path, rows_dir, rm.split, rm.held_out_fraction)
    tokenizer, model = _load_model(cfg, sft_dir)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ids, prompts_cut = _tokenize_pairs(tokenizer, train, held, rm.max_prompt_length, rm.max_length)
    if prompts_cut:
        log.info("reward_model: %d of %d prompts cut to %d tokens (template head and generation prompt kept)",
                 prompts_cut, len(rows), rm.max_prompt_length)
    if rm.train_backbone:
        fitted = _fit_backbone(cfg, model, ids, tokenizer.pad_token_id)
    else:
        fitted = _fit_probe(cfg, model, train, held, ids, tokenizer.pad_token_id)
    return _finish(cfg, model, tokenizer, rows_path, sft_dir, started, prompts_cut, n_trainable, fitted)


def _split_pairs(rows: list[dict[str, Any]], rows_path: Path, rows_dir: Path, split: str,
                 held_out_fraction: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) pairs, after refusing any pair that shares a row id or prompt group with the
    policy's pairs or the judged prompts: a judge trained on them would grade what it has seen."""
    others = {f"{s}.jsonl": _read(rows_dir, s, ())[0] for s in ("train", "test") if s != split}
    check_disjoint(rows, rows_path, others)
    held = [r for r in rows if is_held_out(r, held_out_fraction)]
    train = [r for r in rows if not is_held_out(r, held_out_fraction)]
    if not held or not train:
        raise InputError(f"{rows_path}: {len(rows)} pairs give {len(train)} train and {len(held)} held-out pairs; "
                         "both must be non-empty")
    return train, held


def _load_model(cfg: SpoConfig, sft_dir: Path) -> tuple[Any, Any]:
    """The tokenizer and a :class:`~spo.judging.reward.RewardModel` on the SFT backbone, on the
    training device, with only the parameters this configuration trains left trainable.

    Full fine-tuning trains the SFT weights; LoRA puts fresh adapters on the (merged) SFT model;
    a probe (train_backbone false) trains none of them, only the value head.
    """
    import torch

    from spo.judging.reward import RewardModel
    from spo.models.loading import apply_lora, load_tokenizer, load_trained

    rm = cfg.reward_model
    tokenizer = load_tokenizer(sft_dir, trust_remote_code=cfg.model.trust_remote_code)
    lm = load_trained(sft_dir, cfg.model, trainable=rm.train_backbone, merge=True)
    if rm.lora.enabled:
        lm = apply_lora(lm, rm.lora, seed=cfg.seed)
    model = RewardModel(lm, seed=cfg.seed)
    if not rm.train_backbone:
        model.lm.requires_grad_(False)
    model.value_head.requires_grad_(True)
    model.max_length, model.max_prompt_length = rm.max_length, rm.max_prompt_length
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return tokenizer, model


def _tokenize_pairs(tokenizer: Any, train: list[dict[str, Any]], held: list[dict[str, Any]],
                    max_prompt_length: int, max_length: int) -> tuple[PairIds, int]:
    """Every response's ``prompt + response`` ids, as :func:`spo.judging.reward.encode` makes them
    (the judge scores the same ids), and how many pairs had their prompt cut."""
    from spo.models.formatting import encode_example

    prompts_cut = 0

    def tokenize(subset: list[dict[str, Any]], side: str) -> list[list[int]]:
        nonlocal prompts_cut
        out = []
        for r in tqdm(subset, desc=f"reward tokenize {side}", unit=" rows", leave=False, disable=None):
            enc = encode_example(tokenizer, r["prompt"], r[side], r["source"],
                                 max_prompt_length=max_prompt_length, max_length=max_length)
            if enc.prompt_truncated and side == "chosen":  # once per pair
                prompts_cut += 1
            out.append(enc.prompt_ids + enc.response_ids)
        return out

    ids = PairIds(tokenize(train, "chosen"), tokenize(train, "rejected"),
                  tokenize(held, "chosen"), tokenize(held, "rejected"))
    return ids, prompts_cut


def _fit_backbone(cfg: SpoConfig, model: Any, ids: PairIds, pad_id: int) -> dict[str, Any]:
    """train_backbone true: the held-out accuracy before and after a Bradley-Terry fit of the
    whole model (or its LoRA adapters), and the loop's losses."""
    from spo.judging.reward import pair_accuracy, score_sequences
    from spo.models.loading import adapter_base

    rm, optim = cfg.reward_model, cfg.reward_model.optim

    def held_accuracy() -> float:
        scores = score_sequences(model, ids.held_chosen + ids.held_rejected, pad_id,
                                 batch_size=optim.micro_batch_size * 2)
        return pair_accuracy(scores[: len(ids.held_chosen)], scores[len(ids.held_chosen):])

    acc_before = held_accuracy()
    losses, train_seconds = _train_bradley_terry(model, ids.train_chosen, ids.train_rejected, pad_id, optim, cfg.seed)
    acc_after = held_accuracy()
    if rm.lora.enabled and adapter_base(Path(rm.sft_dir)) is not None:
        # The adapter would record the SFT adapter's *base* as its base (the SFT weights were
        # merged in memory), so it could not be loaded correctly: save merged full weights.
        model.lm = model.lm.merge_and_unload()
    n_train = len(ids.train_chosen)
    return {
        "train_pairs": n_train,
        "held_out_pairs": len(ids.held_chosen),
        "held_out_accuracy_before": acc_before,
        "held_out_accuracy_after": acc_after,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "steps": len(losses),
        "epochs": len(losses) * optim.batch_size / n_train,
        "train_seconds": round(train_seconds, 2),
    }


def _train_bradley_terry(model: Any, chosen: list[list[int]], rejected: list[list[int]], pad_id: int,
                         optim: OptimConfig, seed: int) -> tuple[list[float], float]:
    """The plain torch loop (docs/reward_judge.md says why not a trainer): ``-log sigmoid(r_chosen -
    r_rejected)`` over micro-batches of pairs, both sides in one forward, gradients accumulated to
    ``batch_size``, clipped, then an optimizer and scheduler step.  Returns each step's loss and the
    seconds the loop took.

    Pairs are reshuffled each epoch by a generator of their own, seeded here, so the order does not
    depend on what else drew from torch's global generator; a non-finite loss stops the run at once.
    """
    import torch

    from spo.judging.reward import collate
    from spo.training.optim import build_optimizer, build_scheduler

    accum = optim.batch_size // optim.micro_batch_size
    total_steps = max(1, math.ceil(optim.epochs * math.ceil(len(chosen) / optim.batch_size)))
    if optim.max_steps is not None:
        total_steps = min(total_steps, optim.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, optim)
    scheduler = build_scheduler(optimizer, optim, total_steps)
    generator = torch.Generator().manual_seed(seed)

    def batches() -> Iterator[list[int]]:  # micro-batches of pair indices, reshuffled each epoch, forever
        while True:
            order = torch.randperm(len(chosen), generator=generator).tolist()
            for start in range(0, len(order), optim.micro_batch_size):
                yield order[start : start + optim.micro_batch_size]

    stream = batches()
    losses: list[float] = []
    model.train()
    started = time.perf_counter()
    bar = tqdm(total=total_steps, desc="reward_model", unit=" steps", leave=False, disable=None)
    for step in range(1, total_steps + 1):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(accum):
            idx = next(stream)
            batch_ids, mask = collate([chosen[i] for i in idx] + [rejected[i] for i in idx], pad_id, model.device)
            rewards = model.score(batch_ids, mask)
            loss = -torch.nn.functional.logsigmoid(rewards[: len(idx)] - rewards[len(idx):]).mean()
            if not torch.isfinite(loss):
                raise InputError(f"reward_model: loss is {loss.item()} at step {step}; "
                                 "lower reward_model.optim.learning_rate")
            (loss / accum).backward()
            step_loss += loss.item() / accum
        torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}")
    bar.close()
    return losses, time.perf_counter() - started


def _fit_probe(cfg: SpoConfig, model: Any, train: list[dict[str, Any]], held: list[dict[str, Any]],
               sequences: PairIds, pad_id: int) -> dict[str, Any]:
    """train_backbone false: every response's feature once, then the value head fitted exactly
    (:func:`spo.judging.probe.fit_linear_probe`); accuracies from the same features the judge scores."""
    import torch

    from spo.judging.probe import fit_linear_probe
    from spo.judging.reward import pair_accuracy, sequence_features

    rm = cfg.reward_model
    started = time.perf_counter()
    flat = [seq for part in sequences for seq in part]
    feats = sequence_features(model, flat, pad_id, batch_size=rm.optim.micro_batch_size * 2)
    n_train, n_held = len(train), len(held)
    train_c, train_r = feats[:n_train], feats[n_train : 2 * n_train]
    held_c, held_r = feats[2 * n_train : 2 * n_train + n_held], feats[2 * n_train + n_held :]
    head = model.value_head

    def score(features: Any) -> list[float]:
        return head(features.to(head.weight.device)).squeeze(-1).tolist()

    def accuracy() -> float:
        with torch.no_grad():
            return pair_accuracy(score(held_c), score(held_r))

    before = accuracy()
    groups = [str(r.get("group") or r["id"]) for r in train]
    fit = fit_linear_probe(train_c, train_r, groups, rm.probe_l2, rm.probe_folds)
    with torch.no_grad():
        head.weight.copy_(fit.weight.view(1, -1))
        head.bias.fill_(fit.bias)
    log.info("reward_model: probe L2 %g chosen by %d-fold CV on the train pairs (CV accuracy %s)",
             fit.l2, rm.probe_folds, ", ".join(f"{k:g}: {v:.3f}" for k, v in fit.cv_accuracy.items()))
    return {
        "train_pairs": n_train,
        "held_out_pairs": n_held,
        "held_out_accuracy_before": before,
        "held_out_accuracy_after": accuracy(),
        "train_accuracy": fit.train_accuracy,
        "probe_l2": fit.l2,
        "probe_cv_accuracy": {f"{k:g}": v for k, v in fit.cv_accuracy.items()},
        "steps": 0,
        "epochs": None,
        "train_seconds": round(time.perf_counter() - started, 2),
    }


def _finish(cfg: SpoConfig, model: Any, tokenizer: Any, rows_path: Path, sft_dir: Path, started: float,
            prompts_cut: int, n_trainable: int, fitted: dict[str, Any]) -> dict[str, Any]:
    """Save the reward model whole, its metrics and the one-line summary."""
    rm = cfg.reward_model
    out_dir = Path(rm.out_dir)
    metrics = {
        **fitted,
        "prompts_truncated": prompts_cut,
        "trainable_params": n_trainable,
        "lora": rm.lora.enabled,
        "seconds": round(time.perf_counter() - started, 2),
    }
    # whole or not at all: a killed run leaves the previous reward model folder (or none), never some of its files
    with atomic_dir(out_dir) as building:
        model.save(building, tokenizer)
        write_provenance(
            building, stage="reward_model", config_hash=cfg.section_hash("model", "reward_model"),
            inputs={rm.split: tree_sha256(rows_path), "sft": tree_sha256(sft_dir)},
        )
    write_json(rm.metrics_file, metrics)
    how = "probe" if not rm.train_backbone else f"{metrics['steps']} steps, " + ("LoRA" if rm.lora.enabled else "full")
    log.info(
        "reward_model: %d train / %d held-out pairs (%s, %s trainable params), held-out accuracy %.3f -> %.3f, "
        "%s -> %s in %.1fs",
        metrics["train_pairs"], metrics["held_out_pairs"], how, f"{n_trainable:,}",
        metrics["held_out_accuracy_before"], metrics["held_out_accuracy_after"], rows_path, out_dir, metrics["seconds"],
    )
    return metrics | {"out_dir": str(out_dir)}
