"""Stages base_model and sft on a slice of the real HH sample, with a shrunk tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tmp_config

from spo.config import SpoConfig
from spo.errors import ConfigError, InputError
from spo.io import read_jsonl, write_jsonl
from spo.models.loading import load_tokenizer, load_trained
from spo.stages import base_model, prepare, sft, validate

SHRUNK = [
    "model.tiny.vocab_size=512", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",
    "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=4", "model.tiny.num_key_value_heads=4",
    "model.tiny.max_position_embeddings=256",
    "sft.max_length=128", "sft.max_prompt_length=96", "sft.eval_rows=16", "sft.eval_steps=10",
    "sft.sample_prompts=1", "sft.optim.max_steps=20", "sft.optim.batch_size=8", "sft.optim.micro_batch_size=8",
    "sft.optim.warmup_steps=2", "sft.optim.learning_rate=3e-3",
]


def _config(tmp_path: Path, rows_dir: Path, *extra: str) -> SpoConfig:
    return tmp_config(
        tmp_path, None, *SHRUNK,
        f"base_model.text_dir={rows_dir}", f"base_model.out_dir={tmp_path}/models/base",
        f"sft.rows_dir={rows_dir}", f"sft.base_dir={tmp_path}/models/base",
        f"sft.out_dir={tmp_path}/models/sft", f"sft.metrics_file={tmp_path}/metrics/sft.json",
        *extra,
    )


@pytest.fixture(scope="module")
def rows_dir(tmp_path_factory: pytest.TempPathFactory, hh_slice: Path) -> Path:
    """Validated rows of the real HH slice: 64 train rows, the eval split as it is."""
    work = tmp_path_factory.mktemp("sft_rows")
    cfg = tmp_config(work, hh_slice)
    prepare.run(cfg)
    validate.run(cfg)
    out = work / "rows"
    src = Path(cfg.validate_.out_dir)
    write_jsonl(out / "train.jsonl", read_jsonl(src / "train.jsonl")[:64])
    eval_rows = read_jsonl(src / "eval.jsonl") or read_jsonl(src / "test.jsonl")
    write_jsonl(out / "eval.jsonl", eval_rows[:16])
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, rows_dir: Path) -> Path:
    tmp = tmp_path_factory.mktemp("sft_base")
    base_model.run(_config(tmp, rows_dir))
    return tmp / "models" / "base"


def test_base_model_tiny(base: Path) -> None:
    record = json.loads((base / "base_model.json").read_text())
    assert record["name"] == "tiny" and record["tokenizer_vocab_size"] == 512
    assert 10_000 < record["params"] < 1_000_000
    assert (base / "model.safetensors").is_file() and (base / "provenance.json").is_file()
    assert load_tokenizer(base).chat_template


def test_base_model_missing_text(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="train.jsonl"):
        base_model.run(_config(tmp_path, tmp_path / "nowhere"))


def test_sft_full_learns_and_saves(tmp_path: Path, rows_dir: Path, base: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(tmp_path, rows_dir, f"sft.base_dir={base}")
    with caplog.at_level("INFO", logger="spo.sft"):
        summary = sft.run(cfg)
    metrics = json.loads(Path(cfg.sft.metrics_file).read_text())
    print(f"sft full: eval loss {metrics['eval_loss_before']:.3f} -> {metrics['eval_loss_after']:.3f} "
          f"in {metrics['steps']} steps, {metrics['seconds']}s")
    assert metrics["steps"] == 20 and summary["steps"] == 20
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.5
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert [p["step"] for p in metrics["eval_curve"]] == [0, 10, 20]
    assert any("sample after SFT" in r.getMessage() for r in caplog.records)
    out = Path(cfg.sft.out_dir)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert not any(p.name.startswith(".") for p in out.iterdir())
    model = load_trained(out, cfg.model)
    assert model.config.num_hidden_layers == 2


def test_sft_lora_saves_an_adapter(tmp_path: Path, rows_dir: Path, base: Path) -> None:
    cfg = _config(tmp_path, rows_dir, f"sft.base_dir={base}", "sft.lora.enabled=true", "sft.optim.max_steps=10")
    sft.run(cfg)
    out = Path(cfg.sft.out_dir)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    metrics = json.loads(Path(cfg.sft.metrics_file).read_text())
    assert metrics["lora"] and metrics["trainable_params"] < 100_000
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    model = load_trained(out, cfg.model)
    assert any("lora_" in n for n, _ in model.named_parameters())

    # deterministic for the seed on CPU
    again = _config(tmp_path / "again", rows_dir, f"sft.base_dir={base}", "sft.lora.enabled=true",
                    "sft.optim.max_steps=10")
    sft.run(again)
    assert json.loads(Path(again.sft.metrics_file).read_text())["eval_loss_after"] == metrics["eval_loss_after"]
    reloaded = load_trained(again.sft.out_dir, cfg.model)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_sft_rejects_bad_lengths(tmp_path: Path, rows_dir: Path, base: Path) -> None:
    """Refused when the params are read, before any model loads."""
    with pytest.raises(ConfigError, match="sft.max_prompt_length: 128 must be below max_length"):
        _config(tmp_path, rows_dir, f"sft.base_dir={base}", "sft.max_prompt_length=128")
