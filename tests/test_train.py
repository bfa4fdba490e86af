"""The preference trainer on a tiny Llama and real HH pairs: gradients, equivalences, resume, files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_train_support import hh_pairs, read_metrics, state_of, tiny_model, train_cfg

from spo.errors import NonFiniteLossError
from spo.training.data import SIDES
from spo.training.losses import degree_loss
from spo.training.trainer import PreferenceTrainer

N_TRAIN = 64


def _trainer(cfg, out_dir=None, lora=False, seed=0, evals=False, **kw):
    rows, degs = hh_pairs()
    tok, model = tiny_model()
    if lora:
        from spo.config import LoraConfig
        from spo.models.loading import apply_lora

        model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0), seed=seed)
    return PreferenceTrainer.from_rows(
        model, tok, cfg, rows[:N_TRAIN], degs[:N_TRAIN],
        rows[N_TRAIN:] if evals else None, degs[N_TRAIN:] if evals else None,
        seed=seed, out_dir=out_dir, progress=False, **kw,
    )


def _degree_backward(tr: PreferenceTrainer) -> None:
    idx = [0, 1]
    batch = tr.data.collator([tr.data.train_examples[i] for i in idx], idx, step=0)
    out = tr.module(batch, tr.cfg.spo.sides)
    loss = sum(degree_loss(out[f"degree_{side}"], batch.deg_label[batch.deg_side == s]) for s, side in enumerate(SIDES))
    loss.backward()


@pytest.mark.parametrize("mode", ["reencode", "drop"])
def test_degree_loss_alone_gives_the_lm_gradients(mode: str) -> None:
    tr = _trainer(train_cfg(spo={"mode": mode}))
    _degree_backward(tr)
    lm = tr.module.lm
    grads = {n: p.grad for n, p in lm.named_parameters()}
    assert all(g is not None for g in grads.values())
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.embed_tokens.weight"):
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


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_the_arms_of_a_comparison_train_on_the_same_pairs_in_the_same_order(
        loss: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22: batches were grouped by a length that counted the degree variants, so DPO+SPO got
    other batches than DPO.  Now every step of both arms (and KTO's mismatched partners) holds the
    same pair ids, with batches still grouped by length; the run's summary says so by a hash."""
    from spo.training.data import PairCollator

    seen: list[tuple[str, int, list[str]]] = []
    call, kl = PairCollator.__call__, PairCollator.kl

    def spy_call(self, examples, indices, step=0, **kw):  # noqa: ANN001, ANN202
        seen.append(("batch", step, [e.id for e in examples]))
        return call(self, examples, indices, step=step, **kw)

    def spy_kl(self, examples, partners, indices, max_length):  # noqa: ANN001, ANN202
        seen.append(("kl", -1, [f"{e.id}>{p.id}" for e, p in zip(examples, partners, strict=True)]))
        return kl(self, examples, partners, indices, max_length)

    monkeypatch.setattr(PairCollator, "__call__", spy_call)
    monkeypatch.setattr(PairCollator, "kl", spy_kl)
    runs = {}
    for spo in (False, True):
        seen.clear()
        tr = _trainer(train_cfg(loss=loss, spo={"enabled": spo}, optim={"max_steps": 6}))
        assert tr.cfg.group_by_length and (tr.heads is not None) == spo
        summary = tr.train()
        runs[spo] = (list(seen), summary["pair_order_sha256"], tr.data.pair_order())
    plain, with_spo = runs[False], runs[True]
    assert plain[0] == with_spo[0] and plain[1] == with_spo[1] and plain[2] == with_spo[2]
    assert len(plain[2]) == 6 and all(len(batch) == 4 for batch in plain[2])
    assert [ids for kind, _, ids in plain[0] if kind == "batch"] == [
        ids[i: i + 2] for ids in plain[2] for i in (0, 2)]  # the plan is what was trained on
    assert any(kind == "kl" for kind, _, _ in plain[0]) == (loss == "kto")
    # the variants do change the packed length, which is why it must not order the batches
    tr = _trainer(train_cfg(spo={"enabled": True}))
    assert any(e.length != e.alignment_length for e in tr.data.train_examples)


def test_lambda_zero_is_bit_identical_to_plain_dpo() -> None:
    plain = _trainer(train_cfg(spo={"enabled": False}, optim={"max_steps": 4}))
    plain.train()
    zero = _trainer(train_cfg(spo={"enabled": True, "lambda_w": 0.0, "lambda_l": 0.0}, optim={"max_steps": 4}))
    assert zero.heads is not None and not zero.cfg.spo.active
    zero.train()
    a, b = state_of(plain.unwrapped_lm()), state_of(zero.unwrapped_lm())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and training did move the weights
    _, init = tiny_model()
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"],
                           init.state_dict()["model.layers.0.mlp.up_proj.weight"])


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


def test_a_fresh_start_over_a_finished_policy_removes_its_old_model_first(tmp_path: Path) -> None:
    """Found by the kill matrix: the policy folder is kept between runs for its checkpoints, so a
    retrain killed before its final save left the previous run's weights beside the new run's logs,
    for a hand-run `spo generate` to take as the new policy."""
    out = tmp_path / "policy"
    cfg = dict(optim={"max_steps": 4}, save_steps=2, resume=True)
    _trainer(train_cfg(**cfg), out_dir=out).train()
    (out / "provenance.json").write_text("{}")  # as the train stage writes it after the trainer
    assert (out / "model.safetensors").is_file() and (out / "degree_heads.safetensors").is_file()
    changed = train_cfg(**{**cfg, "beta": 0.2})  # other params: nothing to resume, a fresh start
    _trainer(changed, out_dir=out).train(stop_after=3)  # killed after a checkpoint, before the final save
    left = sorted(p.name for p in out.iterdir())
    assert not {"model.safetensors", "config.json", "degree_heads.safetensors", "degree_heads.json",
                "degree_confusion.json", "provenance.json"} & set(left), left
    assert "checkpoints" in left and "metrics.jsonl" in left  # the new run's own progress is kept


TRAIN_KEYS = {
    "step", "split", "loss", "loss_align", "loss_degree_w", "loss_degree_l", "rewards/chosen", "rewards/rejected",
    "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
    "degree/accuracy_w", "degree/accuracy_l", "degree/accuracy_w/level_0", "degree/accuracy_l/level_3", "excluded_w",
    "excluded_l", "tokens_per_s", "peak_memory_mb", "learning_rate", "grad_norm", "skipped_steps",
}  # TRL's names for what TRL logs (rewards/*, logps/*, logits/*, learning_rate, grad_norm)


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
    assert {"loss", "rewards/accuracies", "degree/accuracy_w/level_2"} <= evals[-1].keys()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]  # keep_checkpoints=1
    for name in ("model.safetensors", "config.json", "tokenizer.json", "degree_heads.safetensors",
                 "degree_heads.json", "degree_confusion.png", "degree_confusion.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir())
    confusion = json.loads((out / "degree_confusion.json").read_text())
    assert len(confusion["w"]) == 4 and sum(map(sum, confusion["w"])) > 0
    assert summary["eval"]["pairs"] == 8
    # per eval response, its predictions (all 4 levels) and how many were right: the same counts as
    # the confusion matrix, and the logged interval is the bootstrap over those responses
    responses = json.loads((out / "degree_responses.json").read_text())
    eval_ids = {e.id for e in tr.data.eval_examples}
    for key in ("w", "l"):
        rows = responses[key]
        assert rows and {r[0] for r in rows} <= eval_ids and all(r[2] == 4 and 0 <= r[1] <= 4 for r in rows)
        matrix = confusion[key]
        assert sum(r[1] for r in rows) == sum(matrix[k][k] for k in range(4))
        assert sum(r[2] for r in rows) == sum(map(sum, matrix))
        low, high = summary["eval"][f"degree/accuracy_{key}/ci_low"], summary["eval"][f"degree/accuracy_{key}/ci_high"]
        assert low <= summary["eval"][f"degree/accuracy_{key}"] <= high
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
    assert second.reference.reused
    s2 = second.train()
    assert s2["reference_forwards"] == 0 and s2["reference_reused"]
    live = _trainer(train_cfg(precompute_reference=False))
    parts = live.batch_loss([0, 1, 2, 3])
    table = second.reference.table["train"]
    assert torch.allclose(parts["reference_chosen_logps"], table["chosen"][:4], atol=1e-4)
    assert torch.allclose(parts["reference_rejected_logps"], table["rejected"][:4], atol=1e-4)
    # other tokenisation -> another key, computed afresh
    third = _trainer(train_cfg(precompute_reference=True, max_length=80, optim={"max_steps": 1}), reference_cache=cache)
    assert not third.reference.reused and len(list(cache.glob("*.pt"))) == 2


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
    # other key phrases: other degree variants (here: every level removes what level 1 removes), same rows and ids
    from spo.degrees import render

    def fewer(entry: dict, text: str) -> dict:
        spans = [[]] + [entry["removed_spans"][1]] * (len(entry["levels"]) - 1)
        return dict(entry, removed_spans=spans, levels=[render(text, s) for s in spans])

    other = [dict(d, chosen=fewer(d["chosen"], r["chosen"])) for d, r in zip(degs[:N_TRAIN], rows)]
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


# --- the review's defects and the GPU-cluster knobs ------------------------------------------


def test_merged_lora_sft_model_is_trainable_and_a_frozen_model_is_refused(tmp_path: Path) -> None:
    """Defect 4: after merge_and_unload of a LoRA SFT model no LM parameter required grad, and
    training silently optimised the heads only."""
    from spo.config import LoraConfig, ModelConfig
    from spo.errors import InputError
    from spo.models.loading import apply_lora, load_trained, save_model

    tok, model = tiny_model()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    lora = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    lora.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    save_model(lora, tok, tmp_path / "sft")
    merged = load_trained(tmp_path / "sft", ModelConfig(), trainable=True, merge=True)
    assert all(p.requires_grad for p in merged.parameters())
    rows, degs = hh_pairs()
    frozen = load_trained(tmp_path / "sft", ModelConfig(), trainable=False, merge=True)
    with pytest.raises(InputError, match="no trainable parameter"):
        PreferenceTrainer.from_rows(frozen, tok, train_cfg(), rows[:8], degs[:8], progress=False)


def test_reference_precompute_reads_alignment_rows_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 5: the reference pre-computation ran the degree variants too (~N x the work)."""
    from spo.training import forward

    seen: list[int] = []
    original = forward.SPOModule.forward

    def spy(self, batch, sides=(False, False), adapters=True):  # noqa: ANN001
        if not adapters:
            seen.append(int(batch.segment_ids.max()))
        return original(self, batch, sides, adapters)

    monkeypatch.setattr(forward.SPOModule, "forward", spy)
    _trainer(train_cfg(precompute_reference=True, spo={"mode": "reencode"}), evals=True)
    assert seen and max(seen) == 2  # chosen and rejected segments, never a variant


def test_kto_per_pair_sum_is_the_spec_and_trl_mean_is_half() -> None:
    """Defect 7: KTO averaged over the 2B responses (half the spec's per-pair sum)."""
    pair = _trainer(train_cfg(loss="kto", spo={"enabled": False})).batch_loss([0, 1, 2, 3])
    response = _trainer(train_cfg(loss="kto", kto_reduction="response",
                                  spo={"enabled": False})).batch_loss([0, 1, 2, 3])
    assert pair["loss_align"] == pytest.approx(2 * response["loss_align"], rel=1e-6)
    assert pair["kl"] == pytest.approx(response["kl"]) and pair["kl"] >= 0


def test_kto_z0_is_the_global_batch_mean_of_mismatched_pairs() -> None:
    tr = _trainer(train_cfg(loss="kto", spo={"enabled": False}))
    with torch.no_grad():  # perturb the policy so that log-ratios are not all zero
        for p in tr.unwrapped_lm().parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = [3, 0, 7, 1]
    partners = {3: 0, 0: 7, 7: 1, 1: 3}
    z0 = float(tr.stepper.kl_estimate("train", batch, partners, 0))
    examples = tr.data.train_examples
    kl = tr.data.collator.kl([examples[i] for i in batch], [examples[partners[i]] for i in batch], batch, 96)
    with torch.no_grad():
        policy = tr.module(kl)["logps"]
        reference = tr.reference.logps("train", kl)
    assert len(policy) == 8  # each pair with its partner's chosen and rejected response
    assert z0 == pytest.approx(float((policy - reference).mean()), rel=1e-5) and z0 != 0.0
    # two calls over halves of the batch each give the mean of their own half only: the trainer passes the whole
    half = float(tr.stepper.kl_estimate("train", batch[:2], partners, 0))
    assert half == pytest.approx(float((policy - reference)[[0, 1, 4, 5]].mean()), rel=1e-5)


def test_kto_z0_from_a_precomputed_reference_equals_the_frozen_copys() -> None:
    """The precomputed table holds both mismatched responses of every pair of every epoch's plan,
    in the order the KL batch scores them: z0 is the same whichever reference the run uses."""
    def z0(precompute: bool) -> float:
        tr = _trainer(train_cfg(loss="kto", spo={"enabled": False}, precompute_reference=precompute))
        assert tr.reference.kind == ("precomputed" if precompute else "copy")
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():  # the same perturbation of the policy; the reference stays at the start
            for p in tr.unwrapped_lm().parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        batch = tr.data.epoch_batches(0)[0]
        return float(tr.stepper.kl_estimate("train", batch, tr.data.kl_plan()["train"][0], 0))

    copy, table = z0(False), z0(True)
    assert copy != 0.0 and table == pytest.approx(copy, rel=1e-4, abs=1e-5)


def test_dropout_is_off_in_the_policy_by_default_and_on_when_asked() -> None:
    """Defect 8: dropout in the policy but not in the reference biases the log-ratios."""
    from spo.config import LoraConfig
    from spo.models.loading import apply_lora

    def twice(disable: bool) -> tuple[float, float]:
        rows, degs = hh_pairs()
        tok, model = tiny_model()
        model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.5))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)  # non-zero adapters, so that adapter dropout changes the output
        tr = PreferenceTrainer.from_rows(model, tok, train_cfg(disable_dropout=disable), rows[:8], degs[:8],
                                         progress=False)
        return (tr.batch_loss([0, 1], train_mode=True)["loss_align"],
                tr.batch_loss([0, 1], train_mode=True)["loss_align"])

    a, b = twice(True)
    assert a == b
    a, b = twice(False)
    assert a != b


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one mixed-precision setting per process: a test that changes it starts and ends clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_keeps_float32_weights_and_fp16_on_cpu_is_refused(fresh_accelerator_state) -> None:
    from spo.errors import InputError

    tr = _trainer(train_cfg(mixed_precision="bf16", optim={"max_steps": 2}))
    assert tr.accelerator.mixed_precision == "bf16"
    summary = tr.train()
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert all(p.dtype == torch.float32 for p in tr.unwrapped_lm().parameters())  # master weights stay float32
    assert all(s.dtype == torch.float32 for group in tr.optimizer.state.values() for s in group.values()
               if torch.is_tensor(s) and s.ndim)
    with pytest.raises(InputError, match="mixed_precision fp16 needs a GPU"):
        _trainer(train_cfg(mixed_precision="fp16"))


def test_the_reference_runs_under_the_policys_precision(fresh_accelerator_state) -> None:
    """Issue 22: under bf16 mixed precision the frozen copy ran outside autocast while the policy
    and the precomputed table ran inside it, so precompute_reference true and false were different
    runs (their step-0 log-ratios differed by about 0.01).  Now both give the step-0 log-ratios of
    a policy compared with itself: zero, up to bf16 rounding of differently packed batches."""
    idx = list(range(8))

    def step0_log_ratios(precompute: bool) -> torch.Tensor:
        tr = _trainer(train_cfg(mixed_precision="bf16", precompute_reference=precompute))
        assert tr.reference.kind == ("precomputed" if precompute else "copy")
        batch = tr.data.alignment_batch(idx, "train")
        with torch.no_grad():
            policy = tr.model(batch)["logps"].float()  # the prepared policy: under autocast
            reference = tr.reference.logps("train", batch).float()
        return policy - reference

    copy, table = step0_log_ratios(False), step0_log_ratios(True)
    assert torch.equal(copy, torch.zeros_like(copy))  # the same weights, batch and precision: exactly itself
    assert table.abs().max() < 2e-3  # bf16 rounding of the table's own packing (the bug gave ~1e-2)
    assert torch.allclose(copy, table, atol=2e-3)


@pytest.mark.parametrize("lora", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(lora: bool) -> None:
    def grads(checkpointing: bool) -> tuple[float, dict[str, torch.Tensor]]:
        tr = _trainer(train_cfg(activation_checkpointing=checkpointing), lora=lora)
        assert tr.module.lm.is_activation_checkpointing == checkpointing
        tr.module.train()
        batch = tr.data.collator([tr.data.train_examples[i] for i in (0, 1)], [0, 1])
        out = tr.stepper.forward_loss(batch, "train", None)
        out.loss.backward()
        return float(out.loss.detach()), {n: p.grad.clone() for n, p in tr.module.named_parameters()
                                          if p.grad is not None}

    loss_a, a = grads(False)
    loss_b, b = grads(True)
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and a.keys() == b.keys() and a
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


def test_schedules_and_optimizers() -> None:
    from spo.config import OptimConfig
    from spo.training.optim import build_optimizer, build_scheduler

    def lrs(**kw) -> list[float]:
        params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
        cfg = OptimConfig(learning_rate=1.0, warmup_steps=2, **kw)
        sched = build_scheduler(build_optimizer(params, cfg), cfg, 10)
        out = []
        for _ in range(10):
            out.append(sched.get_last_lr()[0])
            sched.optimizer.step()
            sched.step()
        return out

    assert lrs(lr_scheduler="linear")[:4] == pytest.approx([0.0, 0.5, 1.0, 0.875])
    cosine = lrs(lr_scheduler="cosine")
    assert cosine[2] == pytest.approx(1.0) and cosine[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lrs(lr_scheduler="constant") == [1.0] * 10
    assert lrs(lr_scheduler="linear", warmup_ratio=0.5)[4] == pytest.approx(0.8)
    for name in ("adamw_torch", "sgd", "adafactor"):
        params = [torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))]
        opt = build_optimizer(params, OptimConfig(optimizer=name, weight_decay=0.1))
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # no decay on 1-D tensors
    # the degree heads' own rate: their groups start at it, and the schedule scales both alike
    body = [torch.nn.Parameter(torch.ones(3, 3))]
    head = [torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))]
    cfg = OptimConfig(learning_rate=1e-4, warmup_steps=2, weight_decay=0.1)
    opt = build_optimizer(body + head, cfg, head_params=head, head_learning_rate=1e-2)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [
        (1e-4, 0.1, 1), (1e-2, 0.1, 1), (1e-2, 0.0, 1)]
    sched = build_scheduler(opt, cfg, 10)
    opt.step()
    sched.step()
    assert sched.get_last_lr() == pytest.approx([0.5e-4, 0.5e-2, 0.5e-2])
    assert len(build_optimizer(body + head, cfg, head_params=head).param_groups) == 2  # None: one rate
    tr = _trainer(train_cfg(optim={"max_steps": 2, "optimizer": "sgd", "lr_scheduler": "cosine"}))
    assert tr.train()["steps"] == 2


def test_ipo_length_normalised_divides_the_log_ratios_by_the_response_lengths() -> None:
    from spo.training.losses import ipo_loss

    summed = _trainer(train_cfg(loss="ipo", spo={"enabled": False}))
    with torch.no_grad():
        for p in summed.unwrapped_lm().parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = state_of(summed.unwrapped_lm())
    normalised = _trainer(train_cfg(loss="ipo", ipo_length_normalize=True, spo={"enabled": False}))
    normalised.unwrapped_lm().load_state_dict(state)
    idx = [0, 1, 2, 3]
    parts = normalised.batch_loss(idx)
    n_c = torch.tensor([len(normalised.data.train_examples[i].chosen_ids) for i in idx], dtype=torch.float32)
    n_r = torch.tensor([len(normalised.data.train_examples[i].rejected_ids) for i in idx], dtype=torch.float32)
    expected, _, _ = ipo_loss(parts["chosen_logps"] / n_c, parts["rejected_logps"] / n_r,
                              parts["reference_chosen_logps"] / n_c, parts["reference_rejected_logps"] / n_r, 0.1)
    assert parts["loss_align"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert parts["loss_align"] != pytest.approx(summed.batch_loss(idx)["loss_align"], rel=1e-3)


def test_bad_settings_are_refused_before_training() -> None:
    from pydantic import ValidationError

    from spo.errors import InputError

    with pytest.raises(ValidationError, match="levels_per_step 1: level 0 is always drawn"):
        train_cfg(spo={"levels_per_step": 1})
    # levels_per_step above degrees.n_levels is refused where the params are read (test_config)
    with pytest.raises(ValidationError, match="optim.batch_size 1: loss kto needs at least 2 pairs per batch"):
        train_cfg(loss="kto", optim={"batch_size": 1, "micro_batch_size": 1})
    tok, model = tiny_model()
    model.config._attn_implementation = "flash_attention_2"
    rows, degs = hh_pairs()
    with pytest.raises(InputError, match="attn_implementation 'flash_attention_2'"):
        PreferenceTrainer.from_rows(model, tok, train_cfg(), rows[:8], degs[:8], progress=False)


@pytest.mark.parametrize("levels", [None, 2])
def test_separate_variant_passes_give_the_joint_pass_loss_and_gradients(levels: int | None) -> None:
    """variant_passes: separate bounds memory by N-independent passes; the step must not change,
    the level-weighted mean of sampled levels (levels_per_step 2, balance_levels) included."""
    def step(mode: str) -> tuple[dict, dict[str, torch.Tensor]]:
        tr = _trainer(train_cfg(spo={"variant_passes": mode, "levels_per_step": levels},
                                optim={"max_steps": 1, "batch_size": 4, "micro_batch_size": 4}))
        assert (tr.stepper.level_weights is None) == (levels is None)
        batches = tr.data.epoch_batches(0)
        grads: dict[str, torch.Tensor] = {}
        passes = tr.data.collator.variant_passes

        def counted(*args, **kwargs):  # noqa: ANN002, ANN003
            out = passes(*args, **kwargs)
            n_passes.append(len(out))
            return out

        tr.data.collator.variant_passes = counted  # type: ignore[method-assign]
        original = tr.optimizer.step
        tr.optimizer.step = lambda *a, **k: grads.update(  # type: ignore[method-assign]
            {n: p.grad.clone() for n, p in tr.module.named_parameters() if p.grad is not None})
        tr._train_step(0, batches)
        tr.optimizer.step = original  # type: ignore[method-assign]
        values, _, _ = tr.state.window.summarise(tr.accelerator, tr.cfg.spo.sides)
        return values, grads

    n_passes: list[int] = []
    joint, g_joint = step("joint")
    assert n_passes == []
    separate, g_separate = step("separate")
    assert n_passes and n_passes[0] >= (2 if levels is None else 1)  # all levels needed more than one pass of their own
    for key in ("loss", "loss_align", "loss_degree_w", "loss_degree_l", "degree/accuracy_w"):
        assert separate[key] == pytest.approx(joint[key], rel=1e-5), key
    a = _trainer(train_cfg(spo={"variant_passes": "joint", "levels_per_step": levels})).batch_loss([0, 1, 2, 3])
    b = _trainer(train_cfg(spo={"variant_passes": "separate", "levels_per_step": levels})).batch_loss([0, 1, 2, 3])
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["loss_degree_l"] == pytest.approx(a["loss_degree_l"], rel=1e-5)
    assert g_joint.keys() == g_separate.keys() and g_joint
    assert all(torch.allclose(g_joint[k], g_separate[k], atol=1e-6, rtol=1e-4) for k in g_joint)


def test_training_degree_accuracy_is_balanced_over_levels() -> None:
    """Issue 22: with levels_per_step 2 every sample has level 0 and each other level a third of
    them, so a head that always says 0 was right half the time.  Balanced, it is at chance."""
    from accelerate import Accelerator

    from spo.training.metrics import Accumulator

    window = Accumulator(4)
    # 6 responses, levels_per_step 2: level 0 and one other level each; the head always says 0
    labels = torch.tensor([0, 1, 0, 2, 0, 3, 0, 1, 0, 2, 0, 3])
    window.add_confusion(0, labels, torch.zeros_like(labels))
    values, _, _ = window.summarise(Accelerator(cpu=True), (True, False))
    assert values["degree/accuracy_w/level_0"] == 1.0 and values["degree/accuracy_w/level_3"] == 0.0
    assert values["degree/accuracy_w"] == 0.25  # not 6 / 12


def test_balance_levels_reweights_level_zero_only_when_levels_are_sampled() -> None:
    idx = [0, 1, 2, 3]

    def degree_w(**spo) -> float:
        return _trainer(train_cfg(spo=spo)).batch_loss(idx)["loss_degree_w"]

    assert degree_w(levels_per_step=2) != pytest.approx(degree_w(levels_per_step=2, balance_levels=False), rel=1e-4)
    assert degree_w() == pytest.approx(degree_w(balance_levels=False), rel=1e-9)  # all levels: nothing to balance
    # eval scores every level, so its labels are balanced already: no weights there, only on sampled batches
    tr = _trainer(train_cfg(spo={"levels_per_step": 2}))
    examples = [tr.data.train_examples[i] for i in idx]
    assert tr.stepper.weights(tr.data.collator(examples, idx, step=0, all_levels=True)) is None
    assert tr.stepper.weights(tr.data.collator(examples, idx, step=0)) is tr.stepper.level_weights is not None
