"""Stage ``reference``: the SFT model's log-probs of every train and eval pair, once for the grid.

Every cell of the grid (variant x seed) starts from the same SFT model on the same pairs, so its
reference log-probs are the same table: this stage computes it once, with the trainer's own code
(the prepared model, packed batches, the train section's tokenisation and precision), and saves
it as ``<train.reference_dir>/<key>.pt``. The key is a hash of what determines the numbers (the
tokenised pairs, the SFT folder's files, the dtype; spo.training.reference.cache_key); each cell
looks its key up there, checks the table's first rows against a fresh forward, and trains on it
instead of a frozen reference copy. A cell whose key is not there computes its own (KTO, whose
mismatched rows depend on the training seed; a variant whose ``set`` changes the tokenisation).

``reference.json`` beside the table records its key, the pairs and the time it took.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from spo.config import SpoConfig
from spo.io import atomic_dir, write_json, write_provenance

log = logging.getLogger("spo.reference")


def run(cfg: SpoConfig) -> dict[str, Any]:
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from spo.stages.train import _load_policy, _read_pairs, check_settings, sft_fingerprint
    from spo.training.data import tokenize_pairs
    from spo.training.trainer import PreferenceTrainer

    # the alignment pairs alone (no degree variants: a reference scores the responses only), loss
    # DPO (KTO's mismatched rows are the cells' own), the table precomputed
    cfg = cfg.with_settings({"train.loss": "dpo", "train.spo.enabled": False, "train.precompute_reference": True})
    tc, out = cfg.train, Path(cfg.train.reference_dir)
    check_settings(cfg)
    pairs = _read_pairs(cfg)
    model, tokenizer = _load_policy(cfg)
    common: dict[str, Any] = {"max_length": tc.max_length, "max_prompt_length": tc.max_prompt_length,
                              "degree_mode": None}
    train_ex, _ = tokenize_pairs(pairs.train_rows, None, tokenizer, where=str(Path(tc.rows_dir, "train.jsonl")),
                                 **common)
    eval_ex = tokenize_pairs(pairs.eval_rows, None, tokenizer, where=str(Path(tc.rows_dir, "eval.jsonl")),
                             **common)[0] if pairs.eval_rows else None
    with atomic_dir(out) as building:
        trainer = PreferenceTrainer(model, tokenizer, tc, train_ex, eval_ex, seed=cfg.training_seed,
                                    out_dir=None, reference_cache=building,
                                    reference_fingerprint=sft_fingerprint(Path(tc.sft_dir)))
        tables = sorted(building.glob("*.pt"))
        seconds = round(time.perf_counter() - started, 3)
        summary = {"key": tables[0].stem if tables else None, "reference": trainer.reference.kind,
                   "train_pairs": len(train_ex),
                   "eval_pairs": len(eval_ex or []), "dtype": str(next(model.parameters()).dtype),
                   "mixed_precision": tc.mixed_precision, "seconds": seconds}
        write_json(building / "reference.json", summary)
        write_provenance(building, stage="reference", config_hash=cfg.section_hash("train", "model"),
                         inputs={"sft": sft_fingerprint(Path(tc.sft_dir))})
    log.info("reference: log-probs of %d train and %d eval pairs under %s, key %s (%.1f s)", len(train_ex),
             len(eval_ex or []), out, summary["key"], seconds)
    return summary
