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

import logging
import os
import time
from pathlib import Path
from typing import Any

from spo.config import SpoConfig, check_sequence_and_batch
from spo.io import InputError, tree_sha256, write_json, write_provenance

log = logging.getLogger("spo.train")


def _degree_mode(cfg: SpoConfig) -> str | None:
    spo = cfg.train.spo
    return spo.mode if spo.enabled and (spo.lambda_w > 0 or spo.lambda_l > 0) else None


def run(cfg: SpoConfig) -> dict[str, Any]:
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from spo.models.loading import apply_lora, load_tokenizer, load_trained
    from spo.training.data import load_pairs, tokenize_pairs
    from spo.training.trainer import PreferenceTrainer

    tc = cfg.train
    rows_dir, degrees_dir, sft_dir, out_dir = Path(tc.rows_dir), Path(tc.degrees_dir), Path(tc.sft_dir), Path(tc.out_dir)
    check_settings(cfg)
    if not sft_dir.is_dir():
        raise InputError(f"{sft_dir}: SFT model folder not found (run `spo sft` first, or set train.sft_dir)")
    mode = _degree_mode(cfg)

    train_rows, train_deg = load_pairs(rows_dir / "train.jsonl", degrees_dir / "train.jsonl" if mode else None)
    eval_path = rows_dir / "eval.jsonl"
    eval_rows, eval_deg = ([], None)
    if eval_path.is_file():
        eval_rows, eval_deg = load_pairs(eval_path, degrees_dir / "eval.jsonl" if mode else None)
        eval_rows = eval_rows[: tc.eval_rows]
        eval_deg = eval_deg[: tc.eval_rows] if eval_deg is not None else None
    if not train_rows:
        raise InputError(f"{rows_dir / 'train.jsonl'}: no training rows")
    if mode and train_deg and tc.spo.levels_per_step is not None and tc.spo.levels_per_step > int(train_deg[0]["n_levels"]):
        raise InputError(f"train.spo.levels_per_step {tc.spo.levels_per_step} is above the n_levels "
                         f"{train_deg[0]['n_levels']} of {degrees_dir / 'train.jsonl'}")

    tokenizer = load_tokenizer(sft_dir, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer.padding_side = "right"
    model = load_trained(sft_dir, cfg.model, trainable=True, merge=True)
    seed = cfg.training_seed  # the training's own, so a seed sweep keeps the data
    if tc.lora.enabled:
        model = apply_lora(model, tc.lora, seed=seed)

    common = dict(max_length=tc.max_length, max_prompt_length=tc.max_prompt_length, degree_mode=mode)
    train_ex, train_stats = tokenize_pairs(train_rows, train_deg, tokenizer, where=str(rows_dir / "train.jsonl"), **common)
    eval_ex = None
    if eval_rows:
        eval_ex, _ = tokenize_pairs(eval_rows, eval_deg, tokenizer, where=str(eval_path), **common)

    sft_hash = {k: v for k, v in tree_sha256(sft_dir).items() if not k.startswith("reference_logps")}
    fingerprint = str(sorted(sft_hash.items()))
    trainer = PreferenceTrainer(
        model, tokenizer, tc, train_ex, eval_ex, seed=seed, out_dir=out_dir,
        reference_cache=sft_dir / "reference_logps", reference_fingerprint=fingerprint,
    )
    summary = trainer.train()
    summary["tokenize"] = train_stats.as_dict()
    summary["degree_mode"] = mode
    summary["loss"] = tc.loss
    if trainer.accelerator.is_main_process:
        last_train = _last_metrics(out_dir / "metrics.jsonl", "train")
        metrics = {
            "loss": tc.loss, "spo": mode is not None, "steps": summary["steps"], "pairs": len(train_ex),
            "excluded_responses": train_stats.excluded, "excluded_after_truncation": train_stats.not_distinct_tokens,
            "skipped_steps": summary["skipped_steps"],
            "train": last_train, "eval": summary.get("eval", {}),
            "train_seconds": summary["train_seconds"],
        }
        write_json(tc.metrics_file, _finite(metrics))
        write_json(out_dir / "train_summary.json", _finite(summary))
        inputs: dict[str, Any] = {"rows": tree_sha256(rows_dir / "train.jsonl"), "sft": sft_hash}
        if eval_rows:
            inputs["eval_rows"] = tree_sha256(eval_path)
        if mode:
            inputs["degrees"] = tree_sha256(degrees_dir / "train.jsonl")
        write_provenance(out_dir, stage="train", config_hash=cfg.section_hash("train", "model"), inputs=inputs)
    seconds = time.perf_counter() - started
    summary["seconds"] = round(seconds, 3)
    log.info(
        "train: %s%s on %d pairs (%d eval) from %s with %s, %d steps in %.1f s -> %s (loss %s, reward acc %s)",
        tc.loss, "+spo(" + mode + ")" if mode else "", len(train_ex), len(eval_ex or []), rows_dir, sft_dir,
        summary["steps"], seconds, out_dir, _fmt(summary.get("eval", {}).get("loss")),
        _fmt(summary.get("eval", {}).get("rewards/accuracies")),
    )
    return summary


def check_settings(cfg: SpoConfig) -> None:
    """Settings that must agree before any data or model is loaded (each error names the option)."""
    import torch

    from spo.training.distributed import check_precision
    from spo.training.forward import MASK_IMPLEMENTATIONS

    tc = cfg.train
    check_sequence_and_batch("train", tc.max_length, tc.max_prompt_length, tc.optim)
    if tc.loss == "kto" and tc.optim.batch_size < 2:
        raise InputError("train.optim.batch_size must be at least 2 for KTO (its KL estimate uses mismatched pairs of a batch)")
    if cfg.model.attn_implementation not in MASK_IMPLEMENTATIONS:
        raise InputError(f"model.attn_implementation {cfg.model.attn_implementation!r}: training packs each pair into one "
                         f"row with a 4-D attention mask, which needs one of {list(MASK_IMPLEMENTATIONS)}")
    check_precision(tc, "cuda" if torch.cuda.is_available() else "cpu")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a"


def _finite(obj: Any) -> Any:
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _last_metrics(path: Path, split: str) -> dict[str, Any]:
    import json

    last: dict[str, Any] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record.get("split") == split:
                    last = record
    return last
