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
from pathlib import Path
from typing import Any

from tqdm import tqdm

from spo.config import SpoConfig, check_sequence_and_batch
from spo.io import InputError, atomic_dir, read_jsonl, tree_sha256, write_json, write_provenance

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
                raise InputError(f"{rows_path}:{line_no}: row id {row['id']!r} also occurs in {name}; the reward model's pairs must be disjoint from it")
            if row.get("group") is not None and row["group"] in groups:
                raise InputError(f"{rows_path}:{line_no}: prompt group {row['group']!r} also occurs in {name}; the reward model's pairs must be disjoint from it")


def is_held_out(row: dict[str, Any], fraction: float) -> bool:
    """Deterministic: a hash of the row's group (its id when it has none), so one prompt's pairs stay together."""
    key = str(row.get("group") or row["id"])
    value = int(hashlib.sha256(f"{HOLD_OUT_SALT}:{key}".encode()).hexdigest()[:12], 16) / 16**12
    return value < fraction


def run(cfg: SpoConfig) -> dict[str, Any]:
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import set_seed

    from spo.judging.reward import RewardModel, pair_accuracy, score_sequences, collate
    from spo.models.formatting import encode_example
    from spo.models.loading import adapter_base, apply_lora, load_tokenizer, load_trained
    from spo.training.optim import build_optimizer, build_scheduler

    rm, optim = cfg.reward_model, cfg.reward_model.optim
    check_sequence_and_batch("reward_model", rm.max_length, rm.max_prompt_length, optim)
    set_seed(cfg.seed, deterministic=False)

    rows_dir, sft_dir = Path(rm.rows_dir), Path(rm.sft_dir)
    rows, rows_path = _read(rows_dir, rm.split, _FIELDS)
    others = {f"{s}.jsonl": _read(rows_dir, s, ())[0] for s in ("train", "test") if s != rm.split}
    check_disjoint(rows, rows_path, others)
    held = [r for r in rows if is_held_out(r, rm.held_out_fraction)]
    train = [r for r in rows if not is_held_out(r, rm.held_out_fraction)]
    if not held or not train:
        raise InputError(f"{rows_path}: {len(rows)} pairs give {len(train)} train and {len(held)} held-out pairs; both must be non-empty")

    tokenizer = load_tokenizer(sft_dir, trust_remote_code=cfg.model.trust_remote_code)
    # Full fine-tuning trains the SFT weights; LoRA puts fresh adapters on the (merged) SFT model;
    # a probe (train_backbone false) trains none of them.
    lm = load_trained(sft_dir, cfg.model, trainable=rm.train_backbone, merge=True)
    if rm.lora.enabled:
        lm = apply_lora(lm, rm.lora, seed=cfg.seed)
    model = RewardModel(lm, seed=cfg.seed)
    if not rm.train_backbone:
        model.lm.requires_grad_(False)
    model.value_head.requires_grad_(True)
    model.max_length, model.max_prompt_length = rm.max_length, rm.max_prompt_length
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    prompts_cut = 0

    def tokenize(subset: list[dict[str, Any]], side: str) -> list[list[int]]:
        """As :func:`spo.judging.reward.encode` (the judge scores the same ids), counting cut prompts."""
        nonlocal prompts_cut
        out = []
        for r in tqdm(subset, desc=f"reward tokenize {side}", unit=" rows", leave=False, disable=None):
            enc = encode_example(tokenizer, r["prompt"], r[side], r["source"],
                                 max_prompt_length=rm.max_prompt_length, max_length=rm.max_length)
            if enc.prompt_truncated and side == "chosen":  # once per pair
                prompts_cut += 1
            out.append(enc.prompt_ids + enc.response_ids)
        return out

    train_c, train_r = tokenize(train, "chosen"), tokenize(train, "rejected")
    held_c, held_r = tokenize(held, "chosen"), tokenize(held, "rejected")
    if prompts_cut:
        log.info("reward_model: %d of %d prompts cut to %d tokens (template head and generation prompt kept)",
                 prompts_cut, len(rows), rm.max_prompt_length)
    pad_id = tokenizer.pad_token_id

    def held_accuracy() -> float:
        scores = score_sequences(model, held_c + held_r, pad_id, batch_size=optim.micro_batch_size * 2)
        return pair_accuracy(scores[: len(held_c)], scores[len(held_c):])

    if not rm.train_backbone:
        return _finish(cfg, model, tokenizer, rows_path, sft_dir, started, prompts_cut, n_trainable,
                       _fit_probe(cfg, model, train, held, (train_c, train_r, held_c, held_r), pad_id))
    acc_before = held_accuracy()

    accum = optim.batch_size // optim.micro_batch_size
    steps_per_epoch = math.ceil(len(train) / optim.batch_size)
    total_steps = max(1, math.ceil(optim.epochs * steps_per_epoch))
    if optim.max_steps is not None:
        total_steps = min(total_steps, optim.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, optim)
    scheduler = build_scheduler(optimizer, optim, total_steps)
    generator = torch.Generator().manual_seed(cfg.seed)

    def batches():  # micro-batches of pair indices, reshuffled each epoch, forever
        while True:
            order = torch.randperm(len(train), generator=generator).tolist()
            for start in range(0, len(order), optim.micro_batch_size):
                yield order[start : start + optim.micro_batch_size]

    stream = batches()
    losses: list[float] = []
    model.train()
    train_started = time.perf_counter()
    bar = tqdm(total=total_steps, desc="reward_model", unit=" steps", leave=False, disable=None)
    for _step in range(total_steps):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(accum):
            idx = next(stream)
            ids, mask = collate([train_c[i] for i in idx] + [train_r[i] for i in idx], pad_id, device)
            rewards = model.score(ids, mask)
            loss = -torch.nn.functional.logsigmoid(rewards[: len(idx)] - rewards[len(idx):]).mean()
            if not torch.isfinite(loss):
                raise InputError(f"reward_model: loss is {loss.item()} at step {_step + 1}; lower reward_model.optim.learning_rate")
            (loss / accum).backward()
            step_loss += loss.item() / accum
        torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}")
    bar.close()
    train_seconds = time.perf_counter() - train_started

    acc_after = held_accuracy()
    if rm.lora.enabled and adapter_base(sft_dir) is not None:
        # The adapter would record the SFT adapter's *base* as its base (the SFT weights were
        # merged in memory), so it could not be loaded correctly: save merged full weights.
        model.lm = model.lm.merge_and_unload()
    fitted = {
        "train_pairs": len(train),
        "held_out_pairs": len(held),
        "held_out_accuracy_before": acc_before,
        "held_out_accuracy_after": acc_after,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "steps": len(losses),
        "epochs": len(losses) * optim.batch_size / len(train),
        "train_seconds": round(train_seconds, 2),
    }
    return _finish(cfg, model, tokenizer, rows_path, sft_dir, started, prompts_cut, n_trainable, fitted)


def _fit_probe(cfg: SpoConfig, model: Any, train: list[dict[str, Any]], held: list[dict[str, Any]],
               sequences: tuple[list[list[int]], ...], pad_id: int) -> dict[str, Any]:
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

    def accuracy() -> float:
        with torch.no_grad():
            score = lambda x: head(x.to(head.weight.device)).squeeze(-1).tolist()  # noqa: E731
            return pair_accuracy(score(held_c), score(held_r))

    before = accuracy()
    fit = fit_linear_probe(train_c, train_r, [str(r.get("group") or r["id"]) for r in train], rm.probe_l2, rm.probe_folds)
    with torch.no_grad():
        head.weight.copy_(fit.weight.view(1, -1))
        head.bias.fill_(fit.bias)
    log.info("reward_model: probe L2 %g chosen by %d-fold CV on the train pairs (CV accuracy %s)", fit.l2, rm.probe_folds,
             ", ".join(f"{k:g}: {v:.3f}" for k, v in fit.cv_accuracy.items()))
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
