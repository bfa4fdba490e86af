"""Step-0 parity with TRL: our DPO and IPO losses equal ``trl.DPOTrainer``'s on the same model and batch.

Both trainers get the same tiny random-init Llama (spo.models.tiny) as reference and the same
perturbed copy of it as policy (policy != reference, so the log-ratios — and the losses — are
not the trivial log 2 / (1/2β)² of an untrained policy), and the same real HH pairs: the prompt
is the dialogue up to and including the last "\\n\\nAssistant:", the responses the text after it.

What TRL 1.16 does with plain-string (non-conversational) prompt/chosen/rejected columns:

* it appends ``eos_token`` to chosen and rejected (text), then tokenises ``prompt`` and
  ``prompt + chosen`` / ``prompt + rejected`` with the tokenizer's own special tokens (a bos
  when the tokenizer adds one; no chat template); the completion is the part after the longest
  common prefix of the prompt ids and the prompt+completion ids;
* the collator concatenates [chosen rows; rejected rows], pads on the right, truncates the
  whole sequence to ``max_length`` keeping the start (default 1024);
* log-probs are summed over completion tokens (a fused, chunked LM head); ``sigmoid`` (DPO) is
  ``-logsigmoid(β·Δ)``; ``ipo`` divides each response's log-ratio by its completion length
  before ``(Δ_avg − 1/(2β))²`` — length-averaged log-probs.

Our trainer sees the same token ids when the tokenizer has no chat template (the raw layout of
``spo.models.formatting``: raw prompt, response + eos), which the test asserts first, so a
failure says whether tokenisation or the loss differs. Our ``train.loss=ipo`` uses SUMMED
log-probs by default (losses.ipo_loss is normalisation-agnostic; averaging is `train.ipo_length_normalize`),
so the IPO comparison feeds our ``ipo_loss`` the trainer's per-pair log-probs divided by the
response lengths, separately checks the trainer's own (summed) IPO number, and checks that
``train.ipo_length_normalize: true`` gives TRL's number.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from spo.config import DegreeLossConfig, OptimConfig, TinyModelConfig, TrainConfig  # noqa: E402
from spo.models.tiny import build_tiny_llama, train_tokenizer  # noqa: E402

HH_MARKER = "\n\nAssistant:"
BETA = 0.1
N_PAIRS = 4
MAX_TOKENS = 200  # prompt + response, so that neither trainer truncates
TOL = 1e-5
TINY = TinyModelConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)


def shared_data_dir() -> Path:
    env = os.environ.get("SPO_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for candidate in candidates:
        if (candidate / "hh" / "train.jsonl.gz").is_file():
            return candidate
    pytest.fail(f"HH sample not found in {[str(c) for c in candidates]}; set SPO_SHARED_DATA")


def split_hh(row: dict) -> dict[str, str]:
    cut = row["chosen"].rfind(HH_MARKER) + len(HH_MARKER)
    prompt = row["chosen"][:cut]
    assert row["rejected"][:cut] == prompt, "chosen and rejected do not share the dialogue"
    return {"prompt": prompt, "chosen": row["chosen"][cut:], "rejected": row["rejected"][cut:]}


@pytest.fixture(scope="module")
def setup() -> dict:
    with gzip.open(shared_data_dir() / "hh" / "train.jsonl.gz", "rt", encoding="utf-8") as handle:
        raw = [json.loads(line) for _, line in zip(range(300), handle)]
    tokenizer = train_tokenizer([r["chosen"] for r in raw] + [r["rejected"] for r in raw], TINY.vocab_size)
    tokenizer.chat_template = None  # the raw layout: what TRL does with non-conversational strings
    pairs = []
    for row in raw:
        pair = split_hh(row)
        longest = max(len(tokenizer(pair["prompt"] + pair[s] + tokenizer.eos_token)["input_ids"])
                      for s in ("chosen", "rejected"))
        if (longest <= MAX_TOKENS and pair["chosen"].strip() and pair["rejected"].strip()
                and pair["chosen"] != pair["rejected"]):
            pairs.append(pair)
        if len(pairs) == N_PAIRS:
            break
    assert len(pairs) == N_PAIRS
    reference = build_tiny_llama(TINY, tokenizer, seed=0)
    policy = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return {"tokenizer": tokenizer, "pairs": pairs, "reference": reference, "policy": policy}


def trl_step0(setup: dict, loss_type: str, tmp_path: Path) -> dict:
    """TRL's loss on the first (only) batch, before any optimizer step, and its tokenised examples."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = setup["pairs"]
    dataset = Dataset.from_dict({k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected")})
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=N_PAIRS, loss_type=[loss_type], beta=BETA,
        max_length=1024, bf16=False, fp16=False, use_cpu=True, activation_checkpointing=False, report_to=[],
        save_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = DPOTrainer(model=copy.deepcopy(setup["policy"]), ref_model=copy.deepcopy(setup["reference"]), args=args,
                         train_dataset=dataset, processing_class=copy.deepcopy(setup["tokenizer"]))
    examples = [trainer.train_dataset[i] for i in range(N_PAIRS)]
    batch = trainer.data_collator(examples)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    metrics = trainer._metrics["eval"]
    return {"loss": float(loss), "examples": examples,
            "logps_chosen_mean": metrics["logps/chosen"][-1], "logps_rejected_mean": metrics["logps/rejected"][-1]}


def ours_step0(setup: dict, loss: str, **options: object) -> tuple[dict, object]:
    """Our trainer's loss parts on the same pairs, before any optimizer step.

    The trainer takes its reference from the model it is built on (precomputed log-probs of the
    model at construction), so it is built on the reference weights and the policy weights are
    loaded into its LM afterwards.
    """
    from spo.training.trainer import PreferenceTrainer

    cfg = TrainConfig(loss=loss, beta=BETA, spo=DegreeLossConfig(enabled=False), max_length=512, max_prompt_length=384,
                      group_by_length=False, precompute_reference=True, **options,
                      optim=OptimConfig(batch_size=N_PAIRS, micro_batch_size=N_PAIRS, warmup_steps=0))
    trainer = PreferenceTrainer.from_rows(copy.deepcopy(setup["reference"]), setup["tokenizer"], cfg, setup["pairs"],
                                          seed=0, out_dir=None, progress=False)
    trainer.unwrapped_lm().load_state_dict(setup["policy"].state_dict())
    return trainer.batch_loss(indices=list(range(N_PAIRS))), trainer


def assert_same_tokens(trl_examples: list[dict], trainer: object) -> None:
    ours = trainer.data.train_examples  # type: ignore[attr-defined]
    assert len(ours) == len(trl_examples)
    for i, (t, o) in enumerate(zip(trl_examples, ours)):
        assert o.prompt_ids == t["prompt_ids"], f"pair {i}: prompt token ids differ (tokenisation, not the loss)"
        assert o.chosen_ids == t["chosen_ids"], f"pair {i}: chosen token ids differ (tokenisation, not the loss)"
        assert o.rejected_ids == t["rejected_ids"], f"pair {i}: rejected token ids differ (tokenisation, not the loss)"


def assert_same_logps(trl: dict, parts: dict) -> None:
    # TRL logs only batch means of the policy log-probs; equal means localise a failure to the loss
    assert float(parts["chosen_logps"].mean()) == pytest.approx(trl["logps_chosen_mean"], abs=1e-3)
    assert float(parts["rejected_logps"].mean()) == pytest.approx(trl["logps_rejected_mean"], abs=1e-3)


def test_dpo_loss_matches_trl_at_step0(setup: dict, tmp_path: Path) -> None:
    trl = trl_step0(setup, "sigmoid", tmp_path)
    parts, trainer = ours_step0(setup, "dpo")
    assert_same_tokens(trl["examples"], trainer)
    assert_same_logps(trl, parts)
    # non-trivial: an untrained policy (policy == reference) would give exactly log 2
    assert abs(trl["loss"] - 0.6931472) > 1e-2
    assert parts["loss_align"] == pytest.approx(trl["loss"], abs=TOL)
    assert parts["loss"] == pytest.approx(trl["loss"], abs=TOL)  # no SPO term


def test_ipo_loss_matches_trl_at_step0(setup: dict, tmp_path: Path) -> None:
    from spo.training.losses import ipo_loss

    trl = trl_step0(setup, "ipo", tmp_path)
    parts, trainer = ours_step0(setup, "ipo")
    assert_same_tokens(trl["examples"], trainer)
    assert_same_logps(trl, parts)
    assert abs(trl["loss"] - 1 / (2 * BETA) ** 2) > 1e-2

    examples = trainer.data.train_examples  # type: ignore[attr-defined]
    n_chosen = torch.tensor([len(e.chosen_ids) for e in examples], dtype=torch.float32)
    n_rejected = torch.tensor([len(e.rejected_ids) for e in examples], dtype=torch.float32)
    pc, pr = parts["chosen_logps"], parts["rejected_logps"]
    rc, rr = parts["reference_chosen_logps"], parts["reference_rejected_logps"]
    # TRL's IPO = ours on length-averaged log-probs (a loss near 25: compare relatively)
    averaged, _, _ = ipo_loss(pc / n_chosen, pr / n_rejected, rc / n_chosen, rr / n_rejected, BETA)
    assert float(averaged.mean()) == pytest.approx(trl["loss"], rel=TOL / 10)
    # the trainer's own train.loss=ipo is the summed form (same formula, unnormalised log-probs) ...
    summed, _, _ = ipo_loss(pc, pr, rc, rr, BETA)
    assert parts["loss_align"] == pytest.approx(float(summed.mean()), rel=1e-6)
    # ... and train.ipo_length_normalize: true is TRL's
    normalised, _ = ours_step0(setup, "ipo", ipo_length_normalize=True)
    assert normalised["loss_align"] == pytest.approx(trl["loss"], rel=TOL / 10)
