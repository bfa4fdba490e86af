"""On a task where degree levels are learnable, the tiny model's degree accuracy climbs well above chance."""

from __future__ import annotations

import random

import pytest
from test_train_support import TINY, read_metrics, train_cfg

from spo.degrees import build_degree_variants
from spo.training.trainer import PreferenceTrainer

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def synthetic(n: int, n_levels: int = 4, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Responses of 12 distinctive key words joined by "then"; level k removes the top 4k of them."""
    rng = random.Random(seed)
    rows, degrees = [], []
    for i in range(n):
        line = {"id": f"s{i}", "n_levels": n_levels}
        row = {"id": f"s{i}", "source": "hh", "prompt": f"\n\nHuman: list words {i % 7}\n\nAssistant:"}
        for side in ("chosen", "rejected"):
            keys = rng.sample(WORDS, 12)
            text = " " + " then ".join(keys) + "."
            row[side] = text
            line[side] = build_degree_variants(text, keys, n_levels).to_json()
        rows.append(row)
        degrees.append(line)
    return rows, degrees


@pytest.mark.parametrize("mode", ["reencode", "drop"])
def test_degree_accuracy_climbs_above_chance(tmp_path, mode: str) -> None:
    from spo.models.tiny import build_tiny_llama, train_tokenizer

    rows, degrees = synthetic(96)
    tok = train_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], 300)
    model = build_tiny_llama(TINY, tok, seed=0)
    cfg = train_cfg(
        # reencode samples 2 of the 4 levels per response per step (cheaper); eval uses all 4
        spo={"mode": mode, "lambda_w": 1.0, "lambda_l": 1.0, "hidden_size": 32,
             "levels_per_step": 2 if mode == "reencode" else None},
        optim={"max_steps": 60, "batch_size": 8, "micro_batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 5},
        logging_steps=20, max_length=128, max_prompt_length=32,
    )
    tr = PreferenceTrainer.from_rows(model, tok, cfg, rows[:80], degrees[:80], rows[80:], degrees[80:],
                                     out_dir=tmp_path, progress=False)
    summary = tr.train()
    train = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    first, last = train[0], train[-1]
    chance = 1 / 4  # eval: all 4 levels of every response
    assert last["degree/accuracy_w"] > 0.7 and last["degree/accuracy_l"] > 0.7, last
    assert last["degree/accuracy_w"] > first["degree/accuracy_w"]
    for head in ("w", "l"):
        assert summary["eval"][f"degree/accuracy_{head}"] > 2.4 * chance, summary["eval"]
