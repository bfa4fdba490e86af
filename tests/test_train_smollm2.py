"""The preference trainer on a real pretrained Llama-family model: SmolLM2-135M-Instruct (30 layers,
GQA, a 49,152-token vocabulary, its own ChatML template), offline, on short real HH pairs.

A few DPO+SPO steps with LoRA and with full fine-tuning: the losses are finite, the weights that
should move move (adapters only with LoRA), a long prompt keeps the template's system header,
and the trained policy still generates through its chat template.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from smollm2 import converted_smollm2
from test_train_support import degree_line, hh_pairs

from spo.config import DegreeLossConfig, LoraConfig, ModelConfig, OptimConfig, TrainConfig
from spo.models.loading import apply_lora, load_causal_lm, load_tokenizer
from spo.training.trainer import PreferenceTrainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted_smollm2(tmp_path_factory)


def _cfg(**over) -> TrainConfig:
    return TrainConfig(
        max_length=96, max_prompt_length=48, precompute_reference=True, group_by_length=True,
        spo=DegreeLossConfig(mode="reencode", levels_per_step=2, hidden_size=32),
        optim=OptimConfig(learning_rate=5e-4, warmup_steps=0, batch_size=4, micro_batch_size=2, max_steps=2),
        logging_steps=1, eval_steps=1000, save_steps=1000, **over,
    )


@pytest.mark.parametrize("lora", [True, False])
def test_dpo_spo_steps_on_smollm2(smollm2_base: Path, lora: bool, tmp_path: Path) -> None:
    rows, _ = hh_pairs()
    rows = rows[:8]
    degrees = [degree_line(r) for r in rows]
    tokenizer = load_tokenizer(smollm2_base)
    model = load_causal_lm(smollm2_base, ModelConfig())
    assert model.config.model_type == "llama" and model.config.num_key_value_heads < model.config.num_attention_heads
    if lora:
        model = apply_lora(model, LoraConfig(enabled=True, r=8, alpha=16, dropout=0.0), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = PreferenceTrainer.from_rows(model, tokenizer, _cfg(), rows, degrees, seed=0, out_dir=tmp_path / "policy",
                                          progress=False)
    # the template's head (its default system prompt) survives prompt truncation
    head = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).split("x")[0]
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    assert all(ex.prompt_ids[: len(head_ids)] == head_ids for ex in trainer.data.train_examples)
    summary = trainer.train()
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    trained = dict(trainer.unwrapped_lm().named_parameters())
    moved = {n for n, p in trained.items() if not torch.equal(p.detach(), before[n])}
    if lora:
        assert moved and all("lora_" in n for n in moved)
    else:
        assert "model.layers.0.self_attn.q_proj.weight" in moved and "model.layers.29.mlp.down_proj.weight" in moved
    saved = tmp_path / "policy"
    assert (saved / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()
    assert (saved / "degree_heads.safetensors").is_file()

    lm = trainer.unwrapped_lm().eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = lm.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip()  # two small steps do not break generation
