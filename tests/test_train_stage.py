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
    """The reference stage computes the table once; cells of any loss, beta or SPO switch read it
    (checked on their first pairs) and write nothing into the SFT folder or the reference folder."""
    from spo.stages import reference, train

    shared = f"train.reference_dir={workspace}/models/reference"
    caplog.set_level(logging.INFO, logger="spo")
    made = reference.run(_cfg(workspace, "reference", shared))
    tables = list((workspace / "models/reference").glob("*.pt"))
    assert [t.stem for t in tables] == [made["key"]] and made["train_pairs"] == 64 and made["eval_pairs"] == 8
    assert json.loads((workspace / "models/reference/reference.json").read_text())["key"] == made["key"]
    before = {p: p.stat().st_mtime_ns for p in (workspace / "models").rglob("*") if p.is_file()
              and "policy" not in p.parts}

    summary = train.run(_cfg(workspace, "dpo_spo_s0", shared))
    out = workspace / "models/policy/dpo_spo_s0"
    for name in ("model.safetensors", "tokenizer.json", "degree_heads.safetensors", "metrics.jsonl",
                 "train_summary.json", "provenance.json", "degree_confusion.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((workspace / "metrics/train_dpo_spo_s0.json").read_text())
    assert metrics["steps"] == 3 and metrics["spo"] and "rewards/accuracies" in metrics["eval"]
    assert summary["reference"] == "precomputed" and summary["reference_reused"] and summary["reference_forwards"] == 0
    assert metrics["reference"] == "precomputed" and metrics["reference_reused"]
    assert any(r.message.startswith("train: dpo+spo(reencode) on 64 pairs") for r in caplog.records)
    assert any("checked against a fresh forward" in r.message for r in caplog.records)

    again = train.run(_cfg(workspace, "ipo_s0", shared, "train.loss=ipo", "train.beta=0.5",
                           "train.spo.enabled=false"))
    assert again["reference_reused"] and again["reference_forwards"] == 0
    # nothing written beside the SFT model or into the reference stage's folder (DVC outputs of other stages)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert not (workspace / "models/sft/reference_logps").exists()


def test_a_reference_table_that_does_not_match_the_model_stops_the_cell(workspace: Path, tmp_path: Path) -> None:
    """A table under the right key but with other numbers (computed from other weights, or edited)
    is caught by the fresh forward on its first pairs before any training step."""
    import shutil

    import torch

    from spo.stages import reference, train

    folder = tmp_path / "reference"
    made = reference.run(_cfg(workspace, "reference", f"train.reference_dir={folder}"))
    table_file = folder / f"{made['key']}.pt"
    payload = torch.load(table_file, weights_only=False)
    payload["table"]["train"]["chosen"][0] += 1.0  # one pair's reference log-prob off by one nat
    torch.save(payload, table_file)
    with pytest.raises(InputError, match="differ from a fresh computation"):
        train.run(_cfg(tmp_path, "dpo_s0", f"train.reference_dir={folder}",
                       f"train.rows_dir={workspace}/data/validated", f"train.degrees_dir={workspace}/data/degrees",
                       f"train.sft_dir={workspace}/models/sft"))
    assert not (tmp_path / "models/policy/dpo_s0/model.safetensors").exists()
    shutil.rmtree(folder)


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
