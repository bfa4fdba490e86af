"""spo.models: the tiny tokenizer and Llama, formatting of rows, loading/saving and LoRA."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import read_gz
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from spo.config import LoraConfig, ModelConfig, TinyModelConfig
from spo.errors import InputError
from spo.models.formatting import (
    add_special_tokens,
    format_prompt,
    format_response,
    hh_messages,
    response_offset,
)
from spo.models.loading import apply_lora, load_causal_lm, load_tokenizer, load_trained, save_model
from spo.models.tiny import SPECIAL_TOKENS, build_tiny_llama, tiny_llama_config, train_tokenizer

SMALL = TinyModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
MULTI_TURN = (
    "\n\nHuman: How can I find out what types of butterflies are in my area?"
    "\n\nAssistant: Which location are you in?"
    "\n\nHuman: I am in Oregon."
    "\n\nAssistant: There are about 175 species of butterflies in Oregon."
    "\n\nHuman: Great. What are some common species then?"
    "\n\nAssistant:"
)


@pytest.fixture(scope="module")
def hh_texts(shared_data: Path) -> list[str]:
    return [row["chosen"] for row in read_gz(shared_data / "hh" / "train.jsonl.gz", limit=300)]


@pytest.fixture(scope="module")
def tokenizer(hh_texts: list[str]) -> PreTrainedTokenizerFast:
    return train_tokenizer(hh_texts, vocab_size=512)


def test_tokenizer_round_trips_real_text_and_has_specials(tokenizer, hh_texts) -> None:
    extra = ["", "  leading and trailing  ", "emoji 🦋 ünïcödé\ttab\r\n", "\x00 control"]
    for text in hh_texts[:100] + extra:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 512
    for token in SPECIAL_TOKENS:
        assert token in tokenizer.get_vocab()
        assert len(tokenizer(token)["input_ids"]) == 1
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert tokenizer.padding_side == "right"
    assert tokenizer("hello")["input_ids"][0] != tokenizer.bos_token_id  # the template writes bos, not encode


def test_chat_template(tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|user|>Hi<|end|><|assistant|>Hello!<|eos|><|user|>Bye<|end|><|assistant|>"


def test_tiny_llama_shapes_params_and_determinism(tokenizer) -> None:
    model = build_tiny_llama(SMALL, tokenizer, seed=3)
    ids = torch.tensor([tokenizer("Hello there, how are you?")["input_ids"]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)

    state_before = torch.random.get_rng_state()
    again = build_tiny_llama(SMALL, tokenizer, seed=3)
    assert torch.equal(state_before, torch.random.get_rng_state())  # global RNG untouched
    other = build_tiny_llama(SMALL, tokenizer, seed=4)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_default_tiny_config_has_a_few_million_params(tokenizer) -> None:
    defaults = TinyModelConfig()
    config = tiny_llama_config(defaults, tokenizer)
    config.vocab_size = defaults.vocab_size  # the size the tokenizer reaches on the full train split
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"default tiny Llama: {n_params:,} parameters (vocab {defaults.vocab_size})")
    assert 2_000_000 < n_params < 20_000_000


def test_hh_messages_and_format_prompt_keep_turns_in_order(tokenizer) -> None:
    messages = hh_messages(MULTI_TURN)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("How can I find") and messages[-1]["content"].endswith("species then?")
    text = format_prompt(tokenizer, MULTI_TURN, "hh")
    positions = [text.index(m["content"]) for m in messages]
    assert positions == sorted(positions)
    assert text.startswith("<|bos|><|user|>") and text.endswith("<|assistant|>")
    assert text.count("<|user|>") == 3 and text.count("<|assistant|>") == 3


def test_format_tldr_and_response(tokenizer) -> None:
    prompt = "SUBREDDIT: r/test\n\nTITLE: t\n\nPOST: a post\n\nTL;DR:"
    assert format_prompt(tokenizer, prompt, "tldr") == f"<|bos|><|user|>{prompt}<|end|><|assistant|>"
    assert format_response(tokenizer, "  Sure thing. ") == "Sure thing.<|eos|>"
    assert response_offset("  Sure thing. ", tokenizer) == 2
    assert not add_special_tokens(tokenizer)
    with pytest.raises(ValueError, match="unknown source"):
        format_prompt(tokenizer, prompt, "other")


def test_format_without_chat_template(tokenizer) -> None:
    plain = train_tokenizer(["abc"], vocab_size=300)
    plain.chat_template = None
    assert format_prompt(plain, MULTI_TURN, "hh") == MULTI_TURN
    assert format_response(plain, " Sure.") == " Sure.<|eos|>"
    assert response_offset(" Sure.", plain) == 0
    assert add_special_tokens(plain)


def test_missing_paths_are_input_errors(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(InputError, match=str(missing)):
        load_tokenizer(missing)
    with pytest.raises(InputError, match=str(missing)):
        load_causal_lm(str(missing), ModelConfig())
    with pytest.raises(InputError, match="base_model"):
        load_causal_lm("tiny", ModelConfig())
    with pytest.raises(InputError, match="not-a-hub-id"):
        load_causal_lm("org/not-a-hub-id", ModelConfig())  # offline: resolved as a hub id, fails cleanly


def test_missing_pad_token_uses_eos_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens(["</s>"])
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(tmp_path / "tok")
    with caplog.at_level(logging.WARNING, logger="spo.models"):
        loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id
    assert any("no pad token" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_lora_trains_only_adapters_and_round_trips(tokenizer, tmp_path: Path) -> None:
    base_dir = save_model(build_tiny_llama(SMALL, tokenizer, seed=0), tokenizer, tmp_path / "base")
    cfg = ModelConfig()
    base = load_causal_lm(str(base_dir), cfg)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = apply_lora(base, LoraConfig(target_modules=["q_proj", "v_proj", "not_a_module"], dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([tokenizer("Hello there, how are you today?")["input_ids"]])
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    for name, param in model.get_base_model().named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(param, frozen[key]), name
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    out = save_model(model, tokenizer, tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    reloaded = load_trained(out, cfg)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
    merged = load_trained(out, cfg, merge=True)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)
    assert load_tokenizer(out).get_vocab() == tokenizer.get_vocab()


def test_full_model_round_trips(tokenizer, tmp_path: Path) -> None:
    model = build_tiny_llama(SMALL, tokenizer, seed=1)
    out = save_model(model, tokenizer, tmp_path / "full")
    assert (out / "model.safetensors").is_file()
    reloaded = load_trained(out, ModelConfig())
    assert not reloaded.training and not any(p.requires_grad for p in reloaded.parameters())
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_tokenizer(out).chat_template == tokenizer.chat_template
