"""The preference trainer on a tiny Llama and real HH pairs: gradients, equivalences, resume, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train_support import hh_pairs, read_metrics, state_of, tiny_model, train_cfg

from spo.training.data import SIDES
from spo.training.losses import degree_loss
from spo.training.trainer import NonFiniteLossError, PreferenceTrainer

N_TRAIN = 64


def _trainer(cfg, out_dir=None, lora=False, seed=0, evals=False, **kw):
    rows, degs = hh_pairs()
    tok, model = tiny_model()
    if lora:
        from spo.config import LoraConfig
        from spo.models.loading import apply_lora

        model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    return PreferenceTrainer.from_rows(
        model, tok, cfg, rows[:N_TRAIN], degs[:N_TRAIN],
        rows[N_TRAIN:] if evals else None, degs[N_TRAIN:] if evals else None,
        seed=seed, out_dir=out_dir, progress=False, **kw,
    )


def _degree_backward(tr: PreferenceTrainer) -> None:
    idx = [0, 1]
    batch = tr.collator([tr.train_examples[i] for i in idx], idx, step=0)
    out = tr.module(batch.input_ids, batch.attention_mask, batch.labels, 2 * batch.n_pairs,
                    batch.deg_row, batch.deg_mask, batch.deg_pos, batch.deg_side, tr.sides)
    loss = sum(degree_loss(out[f"degree_{side}"], batch.deg_label[batch.deg_side == s]) for s, side in enumerate(SIDES))
    loss.backward()


@pytest.mark.parametrize("mode", ["reencode", "drop"])
def test_degree_loss_alone_gives_the_lm_gradients(mode: str) -> None:
    tr = _trainer(train_cfg(spo={"mode": mode}))
    _degree_backward(tr)
    lm = tr.module.lm
    grads = {n: p.grad for n, p in lm.named_parameters()}
    assert all(g is not None for g in grads.values())
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        assert grads[name].abs().sum() > 0, name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.heads.parameters() if p.ndim == 2)


def test_degree_loss_with_lora_trains_adapters_not_base() -> None:
    tr = _trainer(train_cfg(), lora=True)
    _degree_backward(tr)
    named = dict(tr.module.lm.named_parameters())
    lora = {n: p for n, p in named.items() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    # lora_B starts at zero, so gradient reaches lora_B first (lora_A's grad is B^T·… = 0 at init)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    base = [p for n, p in named.items() if "lora_" not in n]
    assert base and all(p.grad is None and not p.requires_grad for p in base)


def test_lambda_zero_is_bit_identical_to_plain_dpo() -> None:
    plain = _trainer(train_cfg(spo={"enabled": False}, optim={"max_steps": 4}))
    plain.train()
    zero = _trainer(train_cfg(spo={"enabled": True, "lambda_w": 0.0, "lambda_l": 0.0}, optim={"max_steps": 4}))
    assert zero.heads is not None and not zero.degree_active
    zero.train()
    a, b = state_of(plain.unwrapped_lm()), state_of(zero.unwrapped_lm())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and training did move the weights
    _, init = tiny_model()
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], init.state_dict()["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("lora", [False, True])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path: Path, lora: bool) -> None:
    k = 3
    spo = {"levels_per_step": 2, "dropout": 0.1}
    cfg = dict(optim={"max_steps": 2 * k, "batch_size": 4, "micro_batch_size": 2}, spo=spo, save_steps=k, resume=True)
    full = _trainer(train_cfg(**cfg), out_dir=tmp_path / "full", lora=lora)
    full.train()
    first = _trainer(train_cfg(**cfg), out_dir=tmp_path / "killed", lora=lora)
    summary = first.train(stop_after=k + 1)  # killed one step after the checkpoint at k
    assert summary["steps"] == k + 1 and (tmp_path / "killed/checkpoints" / f"step-{k}").is_dir()
    second = _trainer(train_cfg(**cfg), out_dir=tmp_path / "killed", lora=lora)
    summary = second.train()
    assert summary["start_step"] == k and summary["steps"] == 2 * k
    a, b = state_of(full.unwrapped_lm()), state_of(second.unwrapped_lm())
    assert all(torch.equal(a[key], b[key]) for key in a)
    ha, hb = state_of(full.heads), state_of(second.heads)
    assert all(torch.equal(ha[key], hb[key]) for key in ha)
    # the metrics log has each step once, as in the uninterrupted run
    steps = [m["step"] for m in read_metrics(tmp_path / "killed") if m["split"] == "train"]
    assert steps == list(range(1, 2 * k + 1))
    losses_a = [m["loss"] for m in read_metrics(tmp_path / "full") if m["split"] == "train"]
    losses_b = [m["loss"] for m in read_metrics(tmp_path / "killed") if m["split"] == "train"]
    assert losses_a == losses_b


TRAIN_KEYS = {
    "step", "split", "loss", "loss_align", "loss_degree_w", "loss_degree_l", "rewards/chosen", "rewards/rejected",
    "rewards/margin", "rewards/accuracy", "degree/accuracy_w", "degree/accuracy_l", "degree/accuracy_w/level_0",
    "degree/accuracy_l/level_3", "excluded_w", "excluded_l", "tokens_per_s", "peak_memory_mb", "lr", "skipped_steps",
}


def test_metrics_checkpoints_and_final_files(tmp_path: Path) -> None:
    out = tmp_path / "policy"
    cfg = train_cfg(optim={"max_steps": 4}, save_steps=2, keep_checkpoints=1, eval_steps=2, logging_steps=2,
                    keep_checkpoints_at_end=True)
    tr = _trainer(cfg, out_dir=out, evals=True)
    summary = tr.train()
    records = read_metrics(out)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    for record in train:
        assert TRAIN_KEYS <= record.keys(), TRAIN_KEYS - record.keys()
        assert record["peak_memory_mb"] > 0 and record["tokens_per_s"] > 0
    assert {"loss", "rewards/accuracy", "degree/accuracy_w/level_2"} <= evals[-1].keys()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]  # keep_checkpoints=1
    for name in ("model.safetensors", "config.json", "tokenizer.json", "degree_heads.safetensors",
                 "degree_heads.json", "degree_confusion.png", "degree_confusion.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir())
    confusion = json.loads((out / "degree_confusion.json").read_text())
    assert len(confusion["w"]) == 4 and sum(map(sum, confusion["w"])) > 0
    assert summary["eval"]["pairs"] == 8
    from spo.training.heads import load_classifier

    heads = load_classifier(out)
    assert all(torch.equal(heads.state_dict()[k], v) for k, v in tr.heads.state_dict().items())


def test_reference_logps_precomputed_once_and_reused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _trainer(train_cfg(precompute_reference=True, optim={"max_steps": 2}), reference_cache=cache, evals=True)
    s1 = first.train()
    assert not s1["reference_reused"] and s1["reference_forwards"] == 0 and len(list(cache.glob("*.pt"))) == 1
    # another beta / lambda / loss reuses the file; the table equals a live reference pass
    second = _trainer(train_cfg(precompute_reference=True, beta=0.5, spo={"lambda_w": 0.3}, optim={"max_steps": 2}),
                      reference_cache=cache, evals=True)
    assert second.reference_reused
    s2 = second.train()
    assert s2["reference_forwards"] == 0 and s2["reference_reused"]
    live = _trainer(train_cfg(precompute_reference=False))
    parts = live.batch_loss([0, 1, 2, 3])
    table = second.reference.table["train"]
    assert torch.allclose(parts["reference_chosen_logps"], table["chosen"][:4], atol=1e-4)
    assert torch.allclose(parts["reference_rejected_logps"], table["rejected"][:4], atol=1e-4)
    # other tokenisation -> another key, computed afresh
    third = _trainer(train_cfg(precompute_reference=True, max_length=80, optim={"max_steps": 1}), reference_cache=cache)
    assert not third.reference_reused and len(list(cache.glob("*.pt"))) == 2


@pytest.mark.parametrize("loss", ["ipo", "kto"])
def test_ipo_and_kto_train(loss: str) -> None:
    tr = _trainer(train_cfg(loss=loss, optim={"max_steps": 2}))
    parts = tr.batch_loss()
    assert torch.isfinite(torch.tensor(parts["loss"]))
    if loss == "kto":
        assert parts["kl"] >= 0.0
    summary = tr.train()
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0


def _nan_hook(tr: PreferenceTrainer, at_call: int):
    calls = {"n": 0}

    def hook(module, args, output):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == at_call:
            return output * float("nan")
        return output

    return tr.module.lm.get_output_embeddings().register_forward_hook(hook)


def test_nan_loss_raises_with_step_and_parts() -> None:
    tr = _trainer(train_cfg(optim={"max_steps": 3}))
    _nan_hook(tr, at_call=3)  # micro-batch 1 of step 2 (2 micro-batches per step)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2 .*loss_align"):
        tr.train()


def test_nan_loss_skip_policy_counts_and_continues(tmp_path: Path) -> None:
    tr = _trainer(train_cfg(nan_policy="skip", optim={"max_steps": 3}), out_dir=tmp_path)
    _nan_hook(tr, at_call=3)
    summary = tr.train()
    assert summary["steps"] == 3 and summary["skipped_steps"] == 1
    records = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 0]
    assert all(torch.isfinite(p).all() for p in tr.unwrapped_lm().parameters())


def test_stepwise_calls_equal_one_call(tmp_path: Path) -> None:
    """train(stop_after=k) repeatedly (what the benchmark does) continues in memory, never restarts."""
    once = _trainer(train_cfg(optim={"max_steps": 3}), out_dir=tmp_path / "a")
    once.train()
    steps = _trainer(train_cfg(optim={"max_steps": 3}), out_dir=tmp_path / "b")
    for k in (1, 2):
        assert steps.train(stop_after=k)["steps"] == k
    assert steps.train()["steps"] == 3
    a, b = state_of(once.unwrapped_lm()), state_of(steps.unwrapped_lm())
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert [r["step"] for r in read_metrics(tmp_path / "b") if r["split"] == "train"] == [1, 2, 3]


def test_checkpoints_of_other_data_or_weights_are_not_resumed(tmp_path: Path) -> None:
    """`dvc repro` keeps the policy folder (persist: true): after the degree data or the starting
    weights changed, its old checkpoints must start a fresh run, not finish the old one."""
    cfg = dict(optim={"max_steps": 3}, save_steps=1, resume=True)
    killed = _trainer(train_cfg(**cfg), out_dir=tmp_path / "p")
    killed.train(stop_after=2)
    assert _trainer(train_cfg(**cfg), out_dir=tmp_path / "p").train(stop_after=2)["start_step"] == 2  # same run

    rows, degs = hh_pairs()
    other = [dict(d, chosen=dict(d["chosen"], levels=[d["chosen"]["levels"][0]] * len(d["chosen"]["levels"])))
             for d in degs[:N_TRAIN]]  # other key phrases: other degree variants, same rows and ids
    tok, model = tiny_model()
    rerun = PreferenceTrainer.from_rows(model, tok, train_cfg(**cfg), rows[:N_TRAIN], other,
                                        seed=0, out_dir=tmp_path / "p", progress=False)
    assert rerun.train(stop_after=2)["start_step"] == 0

    tok, model = tiny_model()
    with torch.no_grad():
        next(model.parameters()).add_(0.01)  # another SFT model
    rerun = PreferenceTrainer.from_rows(model, tok, train_cfg(**cfg), rows[:N_TRAIN], degs[:N_TRAIN],
                                        seed=0, out_dir=tmp_path / "p", progress=False)
    assert rerun.train()["start_step"] == 0
    assert not (tmp_path / "p" / "checkpoints").exists(), "a finished run keeps its model, not its optimizer state"


def test_resume_drops_lines_after_the_checkpoint_and_a_line_cut_by_the_kill(tmp_path: Path) -> None:
    from spo.training.metrics import MetricsWriter

    log_file = tmp_path / "metrics.jsonl"
    log_file.write_text("".join(json.dumps({"step": s, "split": "train", "loss": 1.0}) + "\n" for s in (1, 2, 3))
                        + '{"step": 4, "spl')
    MetricsWriter(tmp_path, enabled=True).truncate_after(2)
    assert [json.loads(line)["step"] for line in log_file.read_text().splitlines()] == [1, 2]
