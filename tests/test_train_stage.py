"""The ``train`` stage end to end on files: a saved tiny SFT model, real HH rows and their degrees."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_train_support import write_train_inputs

from spo.config import load_config
from spo.errors import ConfigError, InputError
from spo.io import write_jsonl


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_train_inputs(tmp_path_factory.mktemp("train_stage"), slice(0, 64), slice(64, 80))


def _cfg(root: Path, cell: str, *overrides: str):
    return load_config(None, [
        f"train.rows_dir={root}/data/validated", f"train.degrees_dir={root}/data/degrees",
        f"train.sft_dir={root}/models/sft", f"train.out_dir={root}/models/policy/{cell}",
        f"train.metrics_file={root}/metrics/train_{cell}.json",
        "train.max_length=96", "train.max_prompt_length=48", "train.optim.batch_size=4",
        "train.optim.micro_batch_size=2",
        "train.optim.max_steps=3", "train.eval_rows=8", "train.logging_steps=1", "train.spo.hidden_size=16",
        *overrides,
    ])


def test_stage_writes_everything_and_reuses_reference(workspace: Path, caplog: pytest.LogCaptureFixture) -> None:
    from spo.stages import train

    caplog.set_level(logging.INFO, logger="spo.train")
    summary = train.run(_cfg(workspace, "dpo_spo_s0", "train.precompute_reference=true"))
    out = workspace / "models/policy/dpo_spo_s0"
    for name in ("model.safetensors", "tokenizer.json", "degree_heads.safetensors", "metrics.jsonl",
                 "train_summary.json", "provenance.json", "degree_confusion.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((workspace / "metrics/train_dpo_spo_s0.json").read_text())
    assert metrics["steps"] == 3 and metrics["spo"] and "rewards/accuracies" in metrics["eval"]
    assert summary["reference"] == "precomputed" and not summary["reference_reused"]
    assert len(list((workspace / "models/sft/reference_logps").glob("*.pt"))) == 1
    assert any(r.message.startswith("train: dpo+spo(reencode) on 64 pairs") for r in caplog.records)

    caplog.clear()
    again = train.run(_cfg(workspace, "ipo_s0", "train.loss=ipo", "train.beta=0.5", "train.spo.enabled=false",
                           "train.precompute_reference=true"))
    assert again["reference_reused"] and again["reference_forwards"] == 0
    assert any("reusing" in r.message for r in caplog.records)


def test_stage_with_lora_saves_an_adapter(workspace: Path) -> None:
    from spo.stages import train

    train.run(_cfg(workspace, "lora_s0", "train.lora.enabled=true", "train.lora.r=4",
                   "train.precompute_reference=false", "train.spo.mode=drop"))
    out = workspace / "models/policy/lora_s0"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()


def test_stage_bad_inputs(workspace: Path, tmp_path: Path) -> None:
    from spo.stages import train

    with pytest.raises(InputError, match=r"nope: SFT model folder not found"):
        train.run(_cfg(workspace, "x", f"train.sft_dir={tmp_path}/nope"))
    rows_dir = tmp_path / "rows"
    rows = [json.loads(line) for line in (workspace / "data/validated/train.jsonl").read_text().splitlines()]
    write_jsonl(rows_dir / "train.jsonl", [rows[1], rows[0], *rows[2:]])
    with pytest.raises(InputError, match=r"degrees/train.jsonl:1 does not match .*rows/train.jsonl:1"):
        train.run(_cfg(workspace, "x", f"train.rows_dir={rows_dir}"))
    write_jsonl(rows_dir / "train.jsonl", [{**r, "rejected": r["chosen"]} for r in rows])
    with pytest.raises(InputError, match="no usable pair left"):
        train.run(_cfg(workspace, "x", f"train.rows_dir={rows_dir}", "train.spo.enabled=false"))
    # refused when the params are read, before any data is loaded or tokenised
    with pytest.raises(ConfigError, match=r"train.optim.batch_size: 6 is not a multiple of micro_batch_size 4"):
        _cfg(workspace, "x", "train.optim.batch_size=6", "train.optim.micro_batch_size=4",
             "train.precompute_reference=false")


def test_cli_exit_code_on_missing_sft(workspace: Path, tmp_path: Path) -> None:
    from spo.cli import main

    code = main(["train", "-q", "-S", f"train.sft_dir={tmp_path}/nope",
                 "-S", f"train.rows_dir={workspace}/data/validated"])
    assert code == 2
