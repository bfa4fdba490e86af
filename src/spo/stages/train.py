"""Stage ``train``: preference training (DPO / IPO / KTO, with or without the SPO degree loss).

Reads the SFT model (``train.sft_dir``: a full model folder, or a LoRA adapter that is merged
into its base first), the validated rows ``{rows_dir}/{train,eval}.jsonl`` and, when the degree
loss is on, the degree dataset ``{degrees_dir}/{train,eval}.jsonl`` (checked line by line
against the rows by id). Trains with :class:`spo.training.trainer.PreferenceTrainer` and writes
``train.out_dir`` (adapter or full weights, degree heads, metrics.jsonl, TensorBoard,
checkpoints, degree confusion matrix, train_summary.json, provenance) and the DVC metrics file
``train.metrics_file``. See docs/training.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo.config import SpoConfig
from spo.errors import InputError
from spo.io import tree_sha256, write_json, write_provenance

log = logging.getLogger("spo.train")


@dataclass
class Pairs:
    """The stage's rows and degree samples, read and checked against each other."""

    train_rows: list[dict]
    train_degrees: list[dict] | None
    eval_rows: list[dict]
    eval_degrees: list[dict] | None


def run(cfg: SpoConfig) -> dict[str, Any]:
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from spo.training.data import tokenize_pairs
    from spo.training.trainer import PreferenceTrainer

    tc = cfg.train
    rows_dir, sft_dir, out_dir = Path(tc.rows_dir), Path(tc.sft_dir), Path(tc.out_dir)
    check_settings(cfg)
    if not sft_dir.is_dir():
        raise InputError(f"{sft_dir}: SFT model folder not found (run `spo sft` first, or set train.sft_dir)")
    pairs = _read_pairs(cfg)
    model, tokenizer = _load_policy(cfg)
    mode = tc.spo.active_mode
    common: dict[str, Any] = {"max_length": tc.max_length, "max_prompt_length": tc.max_prompt_length,
                              "degree_mode": mode}
    train_ex, train_stats = tokenize_pairs(pairs.train_rows, pairs.train_degrees, tokenizer,
                                           where=str(rows_dir / "train.jsonl"), **common)
    eval_ex = None
    if pairs.eval_rows:
        eval_ex, _ = tokenize_pairs(pairs.eval_rows, pairs.eval_degrees, tokenizer, where=str(rows_dir / "eval.jsonl"),
                                    **common)
    shared = Path(tc.reference_dir)
    trainer = PreferenceTrainer(
        model, tokenizer, tc, train_ex, eval_ex, seed=cfg.training_seed, out_dir=out_dir,
        reference_shared=shared if shared.is_dir() else None, reference_fingerprint=sft_fingerprint(sft_dir),
    )
    summary = trainer.train()
    summary["tokenize"] = train_stats.as_dict()
    summary["degree_mode"] = mode
    summary["loss"] = tc.loss
    if trainer.accelerator.is_main_process:
        metrics = {
            "loss": tc.loss, "spo": mode is not None, "steps": summary["steps"], "pairs": len(train_ex),
            "excluded_responses": train_stats.excluded, "excluded_after_truncation": train_stats.not_distinct_tokens,
            "skipped_steps": summary["skipped_steps"],
            "train": _last_metrics(out_dir / "metrics.jsonl", "train"), "eval": summary.get("eval", {}),
            "train_seconds": summary["train_seconds"],
            # the reference's kind, and whether its table was read (the reference stage's, shared by every cell)
            "reference": summary.get("reference"), "reference_reused": summary.get("reference_reused"),
        }
        write_json(tc.metrics_file, _finite(metrics))
        write_json(out_dir / "train_summary.json", _finite(summary))
        _write_provenance(cfg, tree_sha256(sft_dir), with_eval=bool(pairs.eval_rows))
    summary["seconds"] = round(time.perf_counter() - started, 3)
    _log_summary(cfg, summary, len(train_ex), len(eval_ex or []))
    return summary


def sft_fingerprint(sft_dir: Path) -> str:
    """What identifies the reference weights in the reference tables' key: the SFT folder's files
    (the reference stage and every cell compute it alike, so a cell finds the stage's table)."""
    return str(sorted(tree_sha256(sft_dir).items()))


def check_settings(cfg: SpoConfig) -> None:
    """Settings that must agree before any data or model is loaded (each error names the option)."""
    import torch

    from spo.training.distributed import check_precision
    from spo.training.forward import MASK_IMPLEMENTATIONS

    tc = cfg.train
    if cfg.model.attn_implementation not in MASK_IMPLEMENTATIONS:
        raise InputError(f"model.attn_implementation {cfg.model.attn_implementation!r}: training packs each pair into "
                         f"one row with a 4-D attention mask, which needs one of {list(MASK_IMPLEMENTATIONS)}")
    # the trainer checks it again against its accelerator's device; here it fails before the model loads
    check_precision(tc, "cuda" if torch.cuda.is_available() else "cpu")


def _read_pairs(cfg: SpoConfig) -> Pairs:
    """The train rows (and the first ``eval_rows`` eval rows, when there is an eval split), with
    their degree samples when the degree loss is on."""
    from spo.training.data import load_pairs

    tc = cfg.train
    rows_dir, degrees_dir, with_degrees = Path(tc.rows_dir), Path(tc.degrees_dir), tc.spo.active
    train_rows, train_deg = load_pairs(rows_dir / "train.jsonl", degrees_dir / "train.jsonl" if with_degrees else None)
    if not train_rows:
        raise InputError(f"{rows_dir / 'train.jsonl'}: no training rows")
    if not (rows_dir / "eval.jsonl").is_file():
        return Pairs(train_rows, train_deg, [], None)
    eval_rows, eval_deg = load_pairs(rows_dir / "eval.jsonl", degrees_dir / "eval.jsonl" if with_degrees else None)
    eval_deg = eval_deg[: tc.eval_rows] if eval_deg is not None else None
    return Pairs(train_rows, train_deg, eval_rows[: tc.eval_rows], eval_deg)


def _load_policy(cfg: SpoConfig) -> tuple[Any, Any]:
    """The SFT model to train (a LoRA SFT adapter merged into its base; new adapters on top with
    ``train.lora``) and its tokenizer, padding on the right as the packed batches expect."""
    from spo.models.loading import apply_lora, load_tokenizer, load_trained

    tc, sft_dir = cfg.train, Path(cfg.train.sft_dir)
    tokenizer = load_tokenizer(sft_dir, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer.padding_side = "right"
    model = load_trained(sft_dir, cfg.model, trainable=True, merge=True)
    if tc.lora.enabled:
        model = apply_lora(model, tc.lora, seed=cfg.training_seed)  # the training's own seed: a sweep keeps the data
    return model, tokenizer


def _write_provenance(cfg: SpoConfig, sft_hash: dict[str, str], with_eval: bool) -> None:
    tc = cfg.train
    rows_dir = Path(tc.rows_dir)
    inputs: dict[str, Any] = {"rows": tree_sha256(rows_dir / "train.jsonl"), "sft": sft_hash}
    if with_eval:
        inputs["eval_rows"] = tree_sha256(rows_dir / "eval.jsonl")
    if tc.spo.active:
        inputs["degrees"] = tree_sha256(Path(tc.degrees_dir) / "train.jsonl")
    write_provenance(tc.out_dir, stage="train", config_hash=cfg.section_hash("train", "model"), inputs=inputs)


def _log_summary(cfg: SpoConfig, summary: dict[str, Any], n_train: int, n_eval: int) -> None:
    tc, mode, final_eval = cfg.train, cfg.train.spo.active_mode, summary.get("eval", {})
    log.info(
        "train: %s%s on %d pairs (%d eval) from %s with %s, %d steps in %.1f s -> %s (loss %s, reward acc %s)",
        tc.loss, "+spo(" + mode + ")" if mode else "", n_train, n_eval, Path(tc.rows_dir), Path(tc.sft_dir),
        summary["steps"], summary["seconds"], Path(tc.out_dir), _fmt(final_eval.get("loss")),
        _fmt(final_eval.get("rewards/accuracies")),
    )


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a"


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _last_metrics(path: Path, split: str) -> dict[str, Any]:
    last: dict[str, Any] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record.get("split") == split:
                    last = record
    return last
