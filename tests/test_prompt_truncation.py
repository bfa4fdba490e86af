"""Prompt truncation keeps the chat template's head and generation prompt (spo.models.formatting.encode_prompt).

Keep-end truncation (the last ``max_prompt_length`` tokens) dropped bos, the system prompt and
the first role header of every long chat-templated prompt; these tests fail on it.  Real HH
prompts, the tiny tokenizer's template and a ChatML template with a default system prompt.
"""

from __future__ import annotations

import copy
import sys
import types
from functools import cache
from typing import Any

import pytest
import torch
from conftest import read_gz, shared_data_dir

from spo.config import SamplingConfig, TinyModelConfig
from spo.data.formats import split_final_turn
from spo.errors import InputError
from spo.models.formatting import (
    PromptIds,
    add_special_tokens,
    bos_prefix,
    content_spans,
    encode_example,
    encode_prompt,
    format_prompt,
    prompt_messages,
)
from spo.models.tiny import build_tiny_llama, train_tokenizer

torch.set_num_threads(1)

SYSTEM = "You are a helpful AI assistant."
CHATML = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# template text around the contents: (head, tail)
LAYOUTS = {
    "tiny": ("<|bos|><|user|>", "<|end|><|assistant|>"),
    "chatml": (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
}
SMALL = TinyModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)


@cache
def hh_prompts(n: int = 400) -> tuple[str, ...]:
    """Prompts of real HH train rows: the chosen dialogue up to its last "\\n\\nAssistant:"."""
    rows = read_gz(shared_data_dir() / "hh" / "train.jsonl.gz", limit=n)
    return tuple(split[0] for row in rows if (split := split_final_turn(row["chosen"])) is not None)


@cache
def _tokenizers() -> dict[str, Any]:
    tiny = train_tokenizer(list(hh_prompts()), vocab_size=SMALL.vocab_size)
    chatml = copy.deepcopy(tiny)
    chatml.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    chatml.chat_template = CHATML
    return {"tiny": tiny, "chatml": chatml}


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> tuple[str, Any]:
    return request.param, _tokenizers()[request.param]


def head_tail_ids(name: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    head, tail = LAYOUTS[name]
    return (tokenizer(head, add_special_tokens=False)["input_ids"],
            tokenizer(tail, add_special_tokens=False)["input_ids"])


def reference_ids(tokenizer: Any, prompt: str, source: str = "hh") -> list[int]:
    """What every stage encoded before truncation: the formatted prompt, tokenised once."""
    return tokenizer(format_prompt(tokenizer, prompt, source),
                     add_special_tokens=add_special_tokens(tokenizer))["input_ids"]


def long_multi_turn(tokenizer: Any, min_tokens: int, count: int = 25) -> list[str]:
    out = [p for p in hh_prompts()
           if len(prompt_messages(p, "hh")) >= 3 and len(reference_ids(tokenizer, p)) > min_tokens]
    assert len(out) >= 5, "not enough long multi-turn HH prompts in the sample"
    return out[:count]


def check_cut(name: str, tokenizer: Any, prompt: str, source: str, got: PromptIds, max_len: int, *,
              sliced: bool = True) -> None:
    head, tail = head_tail_ids(name, tokenizer)
    full = reference_ids(tokenizer, prompt, source)
    assert got.truncated and got.full_length == len(full)
    assert len(got.ids) <= max_len
    assert got.ids[: len(head)] == head, "the template head (bos, system prompt, first role header) was cut"
    assert got.ids[len(got.ids) - len(tail):] == tail, "the generation prompt was cut"
    middle = got.ids[len(head): len(got.ids) - len(tail)]
    if sliced and middle:  # a slice of the one tokenisation of the whole prompt: its content end
        assert middle == full[len(full) - len(tail) - len(middle): len(full) - len(tail)]
    # the kept text is a suffix of the dialogue, starting inside a message's content
    text = format_prompt(tokenizer, prompt, source)
    spans = content_spans(tokenizer, prompt_messages(prompt, source), text)
    body = text[spans[0][0]: spans[-1][1]]
    kept = tokenizer.decode(middle).lstrip("\ufffd")  # a cut may split a multi-byte character
    assert body.endswith(kept)
    if kept and not tokenizer.decode(middle).startswith("\ufffd"):
        start = spans[-1][1] - len(kept)
        assert any(s <= start < e for s, e in spans), f"cut inside template text: {kept[:40]!r}"
    if name == "chatml":
        assert not kept.startswith(("user\n", "assistant\n", "\n<|im_start|>", "<|im_start|>"))


def test_prompts_that_fit_are_encoded_as_before(layout: tuple[str, Any]) -> None:
    _, tokenizer = layout
    for prompt in hh_prompts()[:150]:
        full = reference_ids(tokenizer, prompt)
        got = encode_prompt(tokenizer, prompt, "hh", len(full))
        assert got == PromptIds(full, False, len(full))
        assert encode_prompt(tokenizer, prompt, "hh", 100_000).ids == full


@pytest.mark.parametrize("max_len", [40, 64, 128])
def test_long_multi_turn_prompts_keep_head_and_generation_prompt(layout: tuple[str, Any], max_len: int) -> None:
    name, tokenizer = layout
    for prompt in long_multi_turn(tokenizer, max_len):
        check_cut(name, tokenizer, prompt, "hh", encode_prompt(tokenizer, prompt, "hh", max_len), max_len)


def test_oldest_turns_go_first(layout: tuple[str, Any]) -> None:
    """With room for the last turns only, the first user turn is gone and the last one is whole."""
    name, tokenizer = layout
    head, tail = head_tail_ids(name, tokenizer)
    checked = 0
    for prompt in long_multi_turn(tokenizer, 150, count=40):
        messages = prompt_messages(prompt, "hh")
        last = messages[-1]["content"]
        n_last = len(tokenizer(last, add_special_tokens=False)["input_ids"])
        max_len = len(head) + len(tail) + n_last + 12
        if max_len >= len(reference_ids(tokenizer, prompt)) - 20:
            continue
        got = encode_prompt(tokenizer, prompt, "hh", max_len)
        check_cut(name, tokenizer, prompt, "hh", got, max_len)
        kept = tokenizer.decode(got.ids)
        assert last in kept
        if len(messages[0]["content"]) > 30:
            assert messages[0]["content"] not in kept
        checked += 1
    assert checked >= 3


def test_tldr_post_is_cut_from_the_left(layout: tuple[str, Any]) -> None:
    name, tokenizer = layout
    post = " ".join(p.replace("\n\nHuman:", " ").replace("\n\nAssistant:", " ") for p in hh_prompts()[:5])
    prompt = f"SUBREDDIT: r/test\n\nTITLE: a title\n\nPOST: {post}\n\nTL;DR:"
    got = encode_prompt(tokenizer, prompt, "tldr", 48)
    check_cut(name, tokenizer, prompt, "tldr", got, 48)
    assert tokenizer.decode(got.ids).endswith("\n\nTL;DR:" + LAYOUTS[name][1])
    assert "SUBREDDIT" not in tokenizer.decode(got.ids)


def test_head_and_tail_longer_than_the_limit_is_a_clear_error() -> None:
    tokenizer = _tokenizers()["chatml"]
    head, tail = head_tail_ids("chatml", tokenizer)
    prompt = long_multi_turn(tokenizer, 40)[0]
    with pytest.raises(InputError,
                       match=rf"max_prompt_length 8 .*head \({len(head)} tokens.*tail \({len(tail)} tokens"):
        encode_prompt(tokenizer, prompt, "hh", 8)
    got = encode_prompt(tokenizer, prompt, "hh", len(head) + len(tail))  # exactly the template text
    assert got.ids == head + tail and got.truncated


def test_raw_layout_keeps_bos_then_the_end() -> None:
    from tokenizers import processors

    tokenizer = copy.deepcopy(_tokenizers()["tiny"])
    tokenizer.chat_template = None
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
    assert bos_prefix(tokenizer) == [bos]
    assert bos_prefix(_tokenizers()["tiny"]) == []  # a chat template writes bos itself
    for prompt in long_multi_turn(tokenizer, 64, count=10):
        full = tokenizer(prompt)["input_ids"]
        assert full[0] == bos and reference_ids(tokenizer, prompt) == full
        assert encode_prompt(tokenizer, prompt, "hh", 10_000) == PromptIds(full, False, len(full))
        got = encode_prompt(tokenizer, prompt, "hh", 64)
        assert got.truncated and got.ids == [bos] + full[-63:]
        assert tokenizer.decode(got.ids[1:]).endswith("\n\nAssistant:")


class _SlowTokenizer:
    """A tokenizer without offset mappings (a 'slow' one), wrapping a fast one."""

    is_fast = False

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, text: str, **kwargs: Any) -> Any:
        if kwargs.pop("return_offsets_mapping", False):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self._inner(text, **kwargs)


def test_slow_tokenizer_re_encodes_the_kept_content(layout: tuple[str, Any]) -> None:
    name, fast = layout
    slow = _SlowTokenizer(fast)
    for prompt in hh_prompts()[:40]:
        assert encode_prompt(slow, prompt, "hh", 100_000).ids == reference_ids(fast, prompt)
    for prompt in long_multi_turn(fast, 64, count=10):
        got = encode_prompt(slow, prompt, "hh", 64)
        check_cut(name, fast, prompt, "hh", got, 64, sliced=False)
        assert len(got.ids) >= 64 - 6  # the bisection keeps (nearly) as much content as fits


def test_keep_end_lost_the_head_of_real_prompts() -> None:
    """The defect in numbers: every cut HH prompt lost its head with keep-end, none does now."""
    tokenizer = _tokenizers()["tiny"]
    head, tail = head_tail_ids("tiny", tokenizer)
    cut = lost_before = lost_after = 0
    for prompt in hh_prompts():
        full = reference_ids(tokenizer, prompt)
        if len(full) <= 192:
            continue
        got = encode_prompt(tokenizer, prompt, "hh", 192)
        cut += 1
        lost_before += full[-192:][: len(head)] != head
        lost_after += got.ids[: len(head)] != head or got.ids[-len(tail):] != tail or len(got.ids) > 192
    assert cut >= 20 and lost_before == cut and lost_after == 0


# --------------------------------------------------------------------------------------------
# every encoder of a prompt goes through encode_prompt


def _rows(tokenizer: Any, min_tokens: int, count: int = 4) -> list[dict[str, str]]:
    return [{"id": f"r{i}", "source": "hh", "prompt": p, "chosen": " Sure, here is how.", "rejected": " No."}
            for i, p in enumerate(long_multi_turn(tokenizer, min_tokens, count=count))]


def test_encode_example_and_sft_rows(layout: tuple[str, Any]) -> None:
    from spo.stages.sft import tokenize_rows

    name, tokenizer = layout
    head, tail = head_tail_ids(name, tokenizer)
    rows = _rows(tokenizer, 48)
    enc = encode_example(tokenizer, rows[0]["prompt"], rows[0]["chosen"], "hh", max_prompt_length=48, max_length=64)
    assert enc.prompt_ids == encode_prompt(tokenizer, rows[0]["prompt"], "hh", 48).ids and enc.prompt_truncated
    assert enc.prompt_ids[: len(head)] == head and enc.prompt_ids[-len(tail):] == tail
    examples, n_cut = tokenize_rows(tokenizer, rows, 48, 64, "test")
    assert n_cut == len(rows)
    for row, ex in zip(rows, examples):
        prompt_ids = encode_prompt(tokenizer, row["prompt"], "hh", 48).ids
        assert ex["input_ids"][: len(prompt_ids)] == prompt_ids
        assert ex["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)
        assert ex["labels"][len(prompt_ids)] != -100


def _spy_generate(model: Any, seen: list[list[int]]) -> None:
    inner = model.generate

    def generate(input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            seen.append([t for t, m in zip(ids, mask) if m])
        return inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model.generate = generate


def test_sft_samples_and_generation_use_it() -> None:
    from spo.generation import encode_prompts, generate_texts
    from spo.stages.sft import _samples

    tokenizer = _tokenizers()["tiny"]
    rows = _rows(tokenizer, 48, count=3)
    expected = [encode_prompt(tokenizer, r["prompt"], "hh", 48).ids for r in rows]
    head = head_tail_ids("tiny", tokenizer)[0]
    assert all(ids[: len(head)] == head for ids in expected)
    model = build_tiny_llama(SMALL, tokenizer, seed=0)

    seen: list[list[int]] = []
    _spy_generate(model, seen)
    _samples(model, tokenizer, rows, 48)
    assert seen == expected

    encoded = encode_prompts(tokenizer, rows, 48)
    assert [p.ids for p in encoded] == expected and all(p.truncated for p in encoded)
    assert [p.ids for p in encode_prompts(tokenizer, [(r["prompt"], "hh") for r in rows], 48)] == expected
    seen.clear()
    result = generate_texts(model, tokenizer, encoded, SamplingConfig(do_sample=False, max_new_tokens=2),
                            batch_size=1, progress=False)
    assert len(result.texts) == 3 and sorted(seen) == sorted(expected)


def test_vllm_backend_gets_the_same_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    from spo.generation import encode_prompts, generate_texts_vllm

    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kwargs: kwargs  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    inputs_seen: list[Any] = []

    class LLM:
        def generate(self, inputs: list[dict[str, Any]], params: dict[str, Any]) -> list[Any]:
            inputs_seen.extend(inputs)
            out = types.SimpleNamespace(text="ok", token_ids=[1])
            return [types.SimpleNamespace(outputs=[out] * params["n"]) for _ in inputs]

    tokenizer = _tokenizers()["chatml"]
    rows = _rows(tokenizer, 48, count=2)
    encoded = encode_prompts(tokenizer, rows, 48)
    result = generate_texts_vllm("unused", tokenizer, encoded, SamplingConfig(num_samples=1), llm=LLM())
    assert [i["prompt_token_ids"] for i in inputs_seen] == [p.ids for p in encoded]
    assert result.texts == [["ok"], ["ok"]]


def test_reward_judge_encodes_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from spo.judging import reward
    from spo.judging.base import JudgeRequest

    tokenizer = _tokenizers()["chatml"]
    head, tail = head_tail_ids("chatml", tokenizer)
    prompt = _rows(tokenizer, 48, count=1)[0]["prompt"]
    prompt_ids = encode_prompt(tokenizer, prompt, "hh", 48).ids
    ids = reward.encode(tokenizer, prompt, " A reply.", "hh", max_prompt_length=48, max_length=64)
    assert ids[: len(prompt_ids)] == prompt_ids and ids[:len(head)] == head
    assert ids[len(prompt_ids) - len(tail): len(prompt_ids)] == tail

    seen: list[list[int]] = []

    def score_sequences(model: Any, sequences: list[list[int]], pad_id: int, **kwargs: Any) -> list[float]:
        seen.extend(list(s) for s in sequences)
        return [0.0] * len(sequences)

    monkeypatch.setattr(reward, "score_sequences", score_sequences)
    lm = build_tiny_llama(SMALL, tokenizer, seed=0)
    judge = reward.RewardJudge("unused", model=reward.RewardModel(lm), tokenizer=tokenizer, max_length=64,
                               max_prompt_length=48, device="cpu")
    judge.judge_many([JudgeRequest(prompt, " A reply.", " Another.", task="dialogue")], progress=False)
    assert seen[0] == ids and seen[1][: len(prompt_ids)] == prompt_ids
