"""The reward model judge: Bradley-Terry training learns a synthetic preference, the stage refuses
pairs that overlap the policy's train pairs or the test prompts, the judge keeps request order,
and save/load round-trips the scores."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from spo.config import OptimConfig, SpoConfig, TinyModelConfig
from spo.errors import InputError
from spo.io import read_jsonl, write_jsonl
from spo.judging.base import Judge, JudgeRequest
from spo.judging.reward import RewardJudge, RewardModel, collate, encode
from spo.models.loading import load_tokenizer, save_model
from spo.models.tiny import build_tiny_llama, train_tokenizer
from spo.stages import reward_model as stage

MARKER = "banana"
WORDS = "the a cat dog runs sits blue green house tree river stone small big quick slow red old new".split()
TINY = TinyModelConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _rows(split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        body = _sentence(rng, rng.randint(3, 6))
        rows.append({
            "id": f"{split}-{i}", "group": f"g-{split}-{i}", "source": "hh",
            "prompt": f"\n\nHuman: {_sentence(rng, 5)}?\n\nAssistant:",
            "chosen": f"{body} {MARKER}", "rejected": f"{body} {rng.choice(WORDS)}",
        })
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reward")
    splits = {"train": _rows("train", 20, 1), "eval": _rows("eval", 160, 2), "test": _rows("test", 20, 3)}
    for split, rows in splits.items():
        write_jsonl(root / "rows" / f"{split}.jsonl", rows)
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for rows in splits.values() for r in rows]
    tokenizer = train_tokenizer(texts, TINY.vocab_size)
    save_model(build_tiny_llama(TINY, tokenizer, seed=0), tokenizer, root / "sft")
    return root


def _cfg(root: Path, **optim) -> SpoConfig:
    cfg = SpoConfig()
    cfg.reward_model = cfg.reward_model.model_copy(update={
        "rows_dir": str(root / "rows"), "sft_dir": str(root / "sft"), "out_dir": str(root / "reward"),
        "metrics_file": str(root / "metrics.json"), "max_length": 64, "max_prompt_length": 32,
        "optim": OptimConfig(**({"learning_rate": 3e-3, "warmup_steps": 3, "batch_size": 16, "micro_batch_size": 8,
                                 "epochs": 100.0, "max_steps": 40} | optim)),
    })
    return cfg


@pytest.fixture(scope="module")
def trained(workdir: Path) -> dict:
    return stage.run(_cfg(workdir))


def test_training_learns_the_marker_preference(workdir: Path, trained: dict) -> None:
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["train_pairs"] + metrics["held_out_pairs"] == 160
    assert metrics["held_out_pairs"] > 10
    assert metrics["steps"] == 40
    assert metrics["held_out_accuracy_after"] >= 0.85, metrics
    assert metrics["held_out_accuracy_after"] > metrics["held_out_accuracy_before"]
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert (workdir / "reward" / "value_head.safetensors").is_file()


def test_held_out_split_is_deterministic_and_by_group() -> None:
    row = {"id": "x1", "group": "g"}
    assert stage.is_held_out(row, 0.5) == stage.is_held_out({"id": "other", "group": "g"}, 0.5)
    rows = [{"id": str(i)} for i in range(1000)]
    share = sum(stage.is_held_out(r, 0.2) for r in rows) / len(rows)
    assert 0.15 < share < 0.25


@pytest.mark.parametrize("field", ["id", "group"])
@pytest.mark.parametrize("other", ["train", "test"])
def test_overlap_with_train_or_test_is_refused(workdir: Path, tmp_path: Path, field: str, other: str) -> None:
    rows = {s: read_jsonl(workdir / "rows" / f"{s}.jsonl") for s in ("train", "eval", "test")}
    rows["eval"][5] = dict(rows["eval"][5], **{field: rows[other][0][field]})
    for split, data in rows.items():
        write_jsonl(tmp_path / "rows" / f"{split}.jsonl", data)
    (tmp_path / "sft").symlink_to(workdir / "sft")
    with pytest.raises(InputError, match=rf"eval.jsonl:6: .*{other}.jsonl"):
        stage.run(_cfg(tmp_path))


def test_judge_prefers_marker_and_keeps_order(workdir: Path, trained: dict) -> None:
    judge = RewardJudge(workdir / "reward")
    assert isinstance(judge, Judge)
    assert judge.judge_id == f"reward:{workdir / 'reward'}"
    rows = _rows("fresh", 40, 99)
    requests = []
    for i, r in enumerate(rows):  # the marker response alternates between sides
        a, b = (r["chosen"], r["rejected"]) if i % 2 == 0 else (r["rejected"], r["chosen"])
        requests.append(JudgeRequest(prompt=r["prompt"], response_a=a, response_b=b, task="dialogue"))
    verdicts = judge.judge_many(requests, progress=False)
    assert len(verdicts) == len(requests)
    expected = ["A" if i % 2 == 0 else "B" for i in range(len(requests))]
    agree = sum(v.winner == e for v, e in zip(verdicts, expected)) / len(requests)
    assert agree >= 0.85
    for v, (r_a, r_b) in zip(verdicts, judge.scores(requests, progress=False)):  # order: verdict i is request i
        assert v.raw == f"reward A={r_a:.4f} B={r_b:.4f}" and v.explanation is None and not v.cached
        assert v.winner == ("A" if r_a >= r_b else "B")
    single = judge.judge_many(requests[1:2], progress=False)[0]
    assert single.raw == verdicts[1].raw  # batching/sorting does not change a request's scores
    with pytest.raises(ValueError, match="unknown judge task"):
        judge.judge_many([JudgeRequest("p", "a", "b", task="poetry")])


def test_save_load_round_trip(workdir: Path, trained: dict, tmp_path: Path) -> None:
    cfg = SpoConfig()
    model = RewardModel.load(workdir / "reward", cfg.model)
    tokenizer = load_tokenizer(workdir / "reward")
    seqs = [encode(tokenizer, "\n\nHuman: hi\n\nAssistant:", resp, "hh", max_prompt_length=32, max_length=64)
            for resp in ("the cat banana", "a dog sits by the old river", "red")]
    ids, mask = collate(seqs, tokenizer.pad_token_id)
    with torch.no_grad():
        before = model.score(ids, mask)
    model.save(tmp_path / "copy", tokenizer)
    again = RewardModel.load(tmp_path / "copy", cfg.model)
    with torch.no_grad():
        after = again.score(ids, mask)
    assert torch.equal(before, after)
    assert again.max_length == 64 and again.max_prompt_length == 32
    # Padding does not change a row's reward (read at its last real token).
    with torch.no_grad():
        alone = model.score(*collate(seqs[2:], tokenizer.pad_token_id))
    torch.testing.assert_close(alone, before[2:], rtol=1e-4, atol=1e-5)


def test_lora_reward_model_round_trip(workdir: Path, tmp_path: Path) -> None:
    cfg = _cfg(workdir, max_steps=3)
    cfg.reward_model = cfg.reward_model.model_copy(update={
        "out_dir": str(tmp_path / "reward_lora"), "metrics_file": str(tmp_path / "m.json"),
        "lora": cfg.reward_model.lora.model_copy(update={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}),
    })
    metrics = stage.run(cfg)
    assert metrics["lora"] and metrics["steps"] == 3
    assert (tmp_path / "reward_lora" / "adapter_config.json").is_file()
    judge = RewardJudge(tmp_path / "reward_lora")
    verdicts = judge.judge_many([JudgeRequest("\n\nHuman: hi\n\nAssistant:", "the cat banana", "the cat", "dialogue")],
                                progress=False)
    assert verdicts[0] is not None and verdicts[0].winner in ("A", "B")


def test_missing_value_head_is_an_input_error(workdir: Path) -> None:
    with pytest.raises(InputError, match="value_head.safetensors"):
        RewardModel.load(workdir / "sft", SpoConfig().model)


def test_scoring_builds_no_autograd_graph(workdir: Path, trained: dict) -> None:
    """The held-out accuracy and the judge score thousands of sequences: with autograd on, each
    batch kept every layer's activations for a backward that never comes."""
    import torch

    from spo.config import ModelConfig
    from spo.judging.reward import RewardModel, score_sequences

    model = RewardModel.load(workdir / "reward", ModelConfig())
    seen: list[bool] = []
    score = model.score
    model.score = lambda ids, mask: (seen.append(torch.is_grad_enabled()), score(ids, mask))[1]  # type: ignore[method-assign]
    scores = score_sequences(model, [[5, 6, 7], [5, 6], [8]], pad_id=0, batch_size=2)
    assert len(scores) == 3 and seen == [False, False] and torch.is_grad_enabled()


def test_probe_fits_the_value_head_alone_on_the_frozen_sft_backbone(workdir: Path, tmp_path: Path) -> None:
    """train_backbone false: the backbone saved is the SFT one, bit for bit; the head ranks the
    held-out pairs, and the judge, scoring the same rows its own way, finds the same accuracy."""
    from safetensors.torch import load_file

    from spo.judging.reward import pair_accuracy

    cfg = _cfg(workdir)
    cfg.reward_model = cfg.reward_model.model_copy(update={
        "out_dir": str(tmp_path / "probe"), "metrics_file": str(tmp_path / "m.json"), "train_backbone": False})
    metrics = stage.run(cfg)
    assert metrics["steps"] == 0 and metrics["trainable_params"] == TINY.hidden_size + 1
    assert metrics["held_out_accuracy_after"] >= 0.85 > metrics["held_out_accuracy_before"], metrics
    assert metrics["probe_l2"] in cfg.reward_model.probe_l2
    assert len(metrics["probe_cv_accuracy"]) == len(cfg.reward_model.probe_l2)
    sft = load_file(str(workdir / "sft" / "model.safetensors"))
    saved = load_file(str(tmp_path / "probe" / "model.safetensors"))
    assert sft.keys() == saved.keys() and all(torch.equal(sft[k], saved[k]) for k in sft)
    held = [r for r in read_jsonl(workdir / "rows" / "eval.jsonl")
            if stage.is_held_out(r, cfg.reward_model.held_out_fraction)]
    judge = RewardJudge(tmp_path / "probe")
    scores = judge.scores([JudgeRequest(r["prompt"], r["chosen"], r["rejected"], "dialogue") for r in held],
                          progress=False)
    assert (pair_accuracy([a for a, _ in scores], [b for _, b in scores])
            == pytest.approx(metrics["held_out_accuracy_after"]))


def test_probe_with_lora_adapters_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="lora.enabled false"):
        SpoConfig.model_validate({"reward_model": {"train_backbone": False, "lora": {"enabled": True}}})
