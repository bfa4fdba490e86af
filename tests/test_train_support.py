"""Helpers shared by the test_train* modules: a tiny model and real HH pairs with degree variants.

Not a test module of its own (no tests here); imported as ``from test_train_support import ...``.
"""

from __future__ import annotations

import copy
import gzip
import json
from functools import cache
from pathlib import Path
from typing import Any

import torch

from spo.config import DegreeLossConfig, OptimConfig, TinyModelConfig, TrainConfig
from spo.degrees import TOKEN_RE, build_degree_variants

# the machine has 2 cores shared with other jobs: one intra-op thread avoids oversubscription stalls
# (set here, before any test runs an op; spo.config and spo.degrees do not import torch)
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
MARK = "\n\nAssistant:"
TINY = TinyModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)


def _split(text: str) -> tuple[str, str]:
    i = text.rfind(MARK) + len(MARK)
    return text[:i], text[i:]


def dedup(phrases: list[str]) -> list[str]:
    out, seen = [], set()
    for p in phrases:
        key = tuple(t.casefold() for t in TOKEN_RE.findall(p))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def degree_line(row: dict[str, Any], n_levels: int = 4) -> dict[str, Any]:
    from spo.keywords import extract

    out: dict[str, Any] = {"id": row["id"], "n_levels": n_levels}
    for side in ("chosen", "rejected"):
        phrases = dedup([kp.phrase for kp in extract(row[side])])
        out[side] = build_degree_variants(row[side], phrases, n_levels).to_json()
    return out


@cache
def hh_pairs(n: int = 80) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """n real HH pairs (prompt, chosen, rejected) + degree lines; shortish ones for speed."""
    from conftest import shared_data_dir

    rows: list[dict[str, Any]] = []
    with gzip.open(shared_data_dir() / "hh" / "train.jsonl.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            raw = json.loads(line)
            pc, c = _split(raw["chosen"])
            pr, r = _split(raw["rejected"])
            if pc != pr or not c.strip() or not r.strip() or c == r or len(pc) > 600 or len(c) > 400 or len(r) > 400:
                continue
            rows.append({"id": f"hh-{len(rows)}", "source": "hh", "prompt": pc, "chosen": c, "rejected": r})
            if len(rows) >= n:
                break
    return rows, [degree_line(r) for r in rows]


@cache
def _tiny(seed: int = 0) -> tuple[Any, Any]:
    from spo.models.tiny import build_tiny_llama, train_tokenizer

    rows, _ = hh_pairs()
    tok = train_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], TINY.vocab_size)
    model = build_tiny_llama(TINY, tok, seed)
    return tok, model


def tiny_model(seed: int = 0) -> tuple[Any, Any]:
    """(tokenizer, a fresh copy of the tiny Llama) — the same weights every call."""
    tok, model = _tiny(seed)
    return tok, copy.deepcopy(model)


def write_train_inputs(root: Path, train: slice, eval_: slice) -> Path:
    """What the train stage reads, under root: validated rows and degree lines of the hh_pairs
    slices, and a saved tiny SFT model (data/validated, data/degrees, models/sft)."""
    from spo.io import write_jsonl
    from spo.models.loading import save_model

    rows, degs = hh_pairs()
    for split, sl in (("train", train), ("eval", eval_)):
        write_jsonl(root / "data/validated" / f"{split}.jsonl", rows[sl])
        write_jsonl(root / "data/degrees" / f"{split}.jsonl", degs[sl])
    tok, model = tiny_model()
    save_model(model, tok, root / "models/sft")
    return root


def train_cfg(**over: Any) -> TrainConfig:
    """Small, fast defaults; keyword overrides (spo=..., optim=... as dicts or models)."""
    spo = over.pop("spo", {})
    optim = over.pop("optim", {})
    base = dict(max_length=96, max_prompt_length=48, eval_rows=8, eval_steps=1000, save_steps=1000,
                logging_steps=1, precompute_reference=False, resume=False, group_by_length=True)
    base.update(over)
    return TrainConfig(
        spo=DegreeLossConfig(**{"hidden_size": 16, "dropout": 0.0, **spo}),
        optim=OptimConfig(**{"learning_rate": 1e-3, "warmup_steps": 1, "batch_size": 4, "micro_batch_size": 2,
                             "max_steps": 3, **optim}),
        **base,
    )


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
