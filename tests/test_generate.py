"""Batched generation (spo.generation) and the generate stage, on a very small random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tmp_config

from spo.config import LoraConfig, SamplingConfig, TinyModelConfig
from spo.errors import InputError
from spo.generation import VLLM_MISSING, GenerationResult, cut_at_stop, encode_prompts, generate_texts, import_vllm
from spo.io import read_jsonl, write_jsonl
from spo.models.formatting import PromptIds, add_special_tokens, format_prompt
from spo.stages import generate as generate_stage
from spo.stages import load_stage

TEXTS = [
    "Human: How do I bake bread at home? Assistant: Mix flour, water, salt and yeast, knead, let it rise.",
    "Human: What is the capital of France? Assistant: Paris is the capital of France.",
    "Human: Can you help me write a poem about the sea? Assistant: Waves roll in under a grey sky.",
    "Human: Why is the sky blue? Assistant: Sunlight scatters off air molecules, blue light the most.",
] * 8

PROMPTS = [
    ("\n\nHuman: How do I bake bread?\n\nAssistant:", "hh"),
    ("\n\nHuman: What is the capital of France and why is it so famous around the world?\n\nAssistant:", "hh"),
    ("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Write a poem about the sea.\n\nAssistant:", "hh"),
    ("\n\nHuman: Why is the sky blue?\n\nAssistant:", "hh"),
    ("\n\nHuman: Tell me a long story about a baker, a fish and a sky that was never blue.\n\nAssistant:", "hh"),
]
GREEDY = SamplingConfig(do_sample=False, max_new_tokens=12)


def _untied_llama(dims: TinyModelConfig, tokenizer):
    """A random Llama whose LM head is not the embedding: a tied random model only ever repeats
    its last input token (here the ``<|assistant|>`` marker), which would make texts empty."""
    import torch
    from transformers import LlamaForCausalLM

    from spo.models.tiny import tiny_llama_config

    config = tiny_llama_config(dims, tokenizer)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A full model folder and a LoRA adapter folder (on that model) with their tokenizer."""
    from spo.config import ModelConfig
    from spo.models.loading import apply_lora, load_causal_lm, save_model
    from spo.models.tiny import train_tokenizer

    root = tmp_path_factory.mktemp("gen_models")
    tokenizer = train_tokenizer(TEXTS, vocab_size=320)
    dims = TinyModelConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
    )
    full = save_model(_untied_llama(dims, tokenizer), tokenizer, root / "full")
    base = load_causal_lm(full, ModelConfig())
    lora = apply_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    adapter = save_model(lora, tokenizer, root / "adapter")
    return {"full": full, "adapter": adapter}


@pytest.fixture(scope="module")
def loaded(models: dict[str, Path]) -> tuple:
    from spo.config import ModelConfig
    from spo.models.loading import load_tokenizer, load_trained

    model = load_trained(models["full"], ModelConfig(attn_implementation="eager"))
    tokenizer = load_tokenizer(models["full"])
    prompts = encode_prompts(tokenizer, PROMPTS, 192)
    return model, tokenizer, prompts


def test_left_padded_batch_equals_one_by_one(loaded: tuple) -> None:
    model, tokenizer, prompts = loaded
    side = tokenizer.padding_side
    batched = generate_texts(model, tokenizer, prompts, GREEDY, batch_size=4, progress=False)
    single = generate_texts(model, tokenizer, prompts, GREEDY, batch_size=1, progress=False)
    assert isinstance(batched, GenerationResult)
    assert batched.meta["batches"] == 2 and single.meta["batches"] == len(prompts)
    assert sum(len(t[0]) > 0 for t in batched.texts) >= 3  # real text, not only special tokens
    assert len({t[0] for t in batched.texts}) > 1
    assert batched.texts == single.texts  # padding does not change what a prompt gets
    assert batched.tokens == single.tokens
    assert all(len(t) == 1 for t in batched.texts)
    assert tokenizer.padding_side == side  # the caller's tokenizer is untouched
    assert batched.generated_tokens > 0 and batched.tokens_per_second > 0


def test_order_restored_after_length_sort(loaded: tuple) -> None:
    model, tokenizer, prompts = loaded
    forward = generate_texts(model, tokenizer, prompts, GREEDY, batch_size=2, progress=False)
    backward = generate_texts(model, tokenizer, prompts[::-1], GREEDY, batch_size=2, progress=False)
    assert backward.texts[::-1] == forward.texts


def test_sampling_deterministic_for_seed(loaded: tuple) -> None:
    model, tokenizer, prompts = loaded
    sampling = SamplingConfig(do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=10, num_samples=3)
    first = generate_texts(model, tokenizer, prompts, sampling, batch_size=6, seed=7, progress=False)
    second = generate_texts(model, tokenizer, prompts, sampling, batch_size=6, seed=7, progress=False)
    other = generate_texts(model, tokenizer, prompts, sampling, batch_size=6, seed=8, progress=False)
    assert first.texts == second.texts and first.tokens == second.tokens
    assert all(len(samples) == 3 for samples in first.texts)
    assert first.texts != other.texts
    assert any(len(set(samples)) > 1 for samples in first.texts)  # samples of one prompt differ


def test_stop_string_stops_and_cuts(loaded: tuple) -> None:
    model, tokenizer, prompts = loaded
    sampling = SamplingConfig(do_sample=False, max_new_tokens=24)
    free = generate_texts(model, tokenizer, prompts[:1], sampling, batch_size=1, progress=False)
    text = free.texts[0][0]
    assert len(text) > 8, text
    # a printable ASCII stop string that the free text contains after its start (random weights
    # also emit lone UTF-8 bytes, which decode to U+FFFD and match no token string)
    start = next(i for i in range(2, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].isalnum())
    stop = text[start : start + 2]
    expected = text[: text.find(stop)]
    stopped = generate_texts(model, tokenizer, prompts[:1], sampling, batch_size=1, stop_strings=[stop], progress=False)
    assert stopped.texts[0][0] == expected
    assert stop not in stopped.texts[0][0]
    assert stopped.tokens[0][0] < free.tokens[0][0]  # generation itself stopped early


def test_cut_at_stop_and_prompt_truncation(loaded: tuple) -> None:
    _, tokenizer, prompts = loaded
    assert cut_at_stop("a reply\n\nHuman: more", ["\n\nHuman:"]) == "a reply"
    assert cut_at_stop("x END y STOP", ["STOP", "END"]) == "x "
    assert cut_at_stop("plain", []) == "plain"
    full = encode_prompts(tokenizer, PROMPTS, 10_000)
    rows = [{"prompt": p, "source": s, "id": "x"} for p, s in PROMPTS]  # data rows work too
    assert [p.ids for p in encode_prompts(tokenizer, rows, 10_000)] == [p.ids for p in full]
    for (prompt, source), f in zip(PROMPTS, full):  # the ids of the formatted prompt, as in training
        assert isinstance(f, PromptIds) and not f.truncated
        assert f.ids == tokenizer(format_prompt(tokenizer, prompt, source),
                                  add_special_tokens=add_special_tokens(tokenizer))["input_ids"]
    head = tokenizer("<|bos|><|user|>", add_special_tokens=False)["input_ids"]
    tail = tokenizer("<|end|><|assistant|>", add_special_tokens=False)["input_ids"]
    cut = encode_prompts(tokenizer, PROMPTS, 8)
    for c, f in zip(cut, full):  # cut from the left, but the template head and generation prompt stay
        assert c.truncated == (len(f.ids) > 8) and len(c.ids) <= 8
        assert c.ids[:2] == head and c.ids[-2:] == tail
        assert c.ids[2:-2] == f.ids[len(f.ids) - len(c.ids) + 2 : -2] or not c.ids[2:-2]
    with pytest.raises(TypeError, match="token ids"):
        generate_texts(None, tokenizer, ["already formatted text"], GREEDY)


def test_vllm_missing_is_clear() -> None:
    """vllm is not installable here (no GPU); the error must say what to do."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="pip install vllm"):
            import_vllm()
        assert "GPU" in VLLM_MISSING
    else:  # pragma: no cover - a GPU image
        pytest.skip("vllm is installed")


def _stage_config(tmp_path: Path, models: dict[str, Path], *extra: str):
    rows = [{"id": f"r{i}", "prompt": p, "chosen": "ok", "rejected": "no", "source": s}
            for i, (p, s) in enumerate(PROMPTS)]
    write_jsonl(tmp_path / "rows" / "test.jsonl", rows)
    return tmp_config(
        tmp_path, None,
        f"generate.rows_dir={tmp_path}/rows", f"generate.out_dir={tmp_path}/gen",
        f"generate.metrics_file={tmp_path}/metrics/generate.json",
        "generate.max_prompts=4", "generate.batch_size=4", "generate.sampling.max_new_tokens=8",
        "generate.sampling.num_samples=2",
        "model.attn_implementation=eager",
        *extra,
    )


def test_stage_writes_samples_metrics_and_provenance(tmp_path: Path, models: dict[str, Path]) -> None:
    cfg = _stage_config(tmp_path, models)
    cfg.generate.policies = False
    cfg.generate.models = {"full": str(models["full"]), "lora": str(models["adapter"])}
    assert load_stage("generate") is generate_stage
    summary = generate_stage.run(cfg)
    assert summary["prompts"] == 4
    metrics = json.loads((tmp_path / "metrics" / "generate.json").read_text())
    for name in ("full", "lora"):
        lines = read_jsonl(tmp_path / "gen" / f"{name}.jsonl")
        assert len(lines) == 4 * 2
        assert [(line["id"], line["sample"]) for line in lines] == [(f"r{i}", k) for i in range(4) for k in range(2)]
        line = lines[0]
        assert set(line) == {"id", "prompt", "response", "sample", "model", "model_path", "settings", "provenance"}
        assert line["model"] == name and line["model_path"] == str(models["full" if name == "full" else "adapter"])
        assert line["prompt"] == PROMPTS[0][0]
        assert isinstance(line["response"], str)
        settings = line["settings"]
        assert settings["seed"] == cfg.seed and settings["backend"] == "transformers"
        assert settings["max_prompt_length"] == cfg.generate.max_prompt_length
        assert settings["temperature"] == 0.7 and settings["num_samples"] == 2 and settings["do_sample"] is True
        shas = line["provenance"]["model_sha256"]
        assert shas and all(len(v) == 64 for v in shas.values())
        m = metrics[name]
        assert m["prompts"] == 4 and m["samples"] == 8 and m["prompts_truncated"] == 0
        assert 0 < m["generated_tokens"] <= 8 * 8
        assert m["tokens_per_second"] > 0 and m["seconds"] > 0
        assert "mean_response_chars" in m
    lora_shas = read_jsonl(tmp_path / "gen" / "lora.jsonl")[0]["provenance"]["model_sha256"]
    assert any("adapter_model.safetensors" in k for k in lora_shas)  # the adapter ...
    assert any(k.endswith("full/model.safetensors") for k in lora_shas)  # ... and its base
    provenance = json.loads((tmp_path / "gen" / "provenance.json").read_text())
    assert provenance["stage"] == "generate" and set(provenance["inputs"]) == {"prompts", "full", "lora"}


def test_stage_missing_model_folder(tmp_path: Path, models: dict[str, Path]) -> None:
    cfg = _stage_config(tmp_path, models)
    cfg.generate.policies = False
    cfg.generate.models = {"full": str(models["full"]), "ghost": str(tmp_path / "models" / "nope")}
    with pytest.raises(InputError, match=r"model folder not found: ghost -> .*nope"):
        generate_stage.run(cfg)
    assert not (tmp_path / "gen").exists()  # checked before any work


def test_stage_vllm_backend_missing(tmp_path: Path, models: dict[str, Path]) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - a GPU image
        pytest.skip("vllm is installed")
    cfg = _stage_config(tmp_path, models, "generate.backend=vllm")
    cfg.generate.policies = False
    cfg.generate.models = {"full": str(models["full"])}
    with pytest.raises(InputError, match="vllm package is not installed"):
        generate_stage.run(cfg)


def test_hh_stop_string_for_raw_prompts(loaded: tuple) -> None:
    _, tokenizer, _ = loaded
    assert generate_stage.stop_strings_for(tokenizer, {"hh"}) == []  # chat template: eos ends the turn
    import copy  # a copy: the module fixture's tokenizer stays as it is

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert generate_stage.stop_strings_for(plain, {"hh"}) == ["\n\nHuman:"]
    assert generate_stage.stop_strings_for(plain, {"tldr"}) == []


def test_the_stage_samples_on_the_gpu_when_there_is_one(tmp_path: Path, models: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The model loads on the CPU; a GPU task must sample on its GPU, not on the pod's CPU. The device
    the stage picks (here a stand-in, the meta device) is where the model is when sampling starts."""
    import torch

    import spo.generation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert generate_stage.generation_device() == torch.device("cuda")
    seen: list[torch.device] = []

    def record(model, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        seen.append(next(model.parameters()).device)
        raise RuntimeError("stop after placement")

    monkeypatch.setattr(generate_stage, "generation_device", lambda: torch.device("meta"))
    monkeypatch.setattr(spo.generation, "generate_texts", record)
    cfg = _stage_config(tmp_path, models)
    cfg.generate.policies = False
    cfg.generate.models = {"full": str(models["full"])}
    with pytest.raises(RuntimeError, match="stop after placement"):
        generate_stage.run(cfg)
    assert seen == [torch.device("meta")]
