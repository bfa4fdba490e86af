"""Batched generation: transformers (default) or vLLM (optional, GPU images).

:func:`generate_texts` takes prompts as token ids and returns ``num_samples`` response texts per
prompt, without the prompt and without special tokens:

* :func:`encode_prompts` turns rows ``(prompt, source)`` into those ids with
  :func:`spo.models.formatting.encode_prompt`, the layout and truncation SFT and training use: a
  prompt that fits is ``format_prompt`` encoded with ``add_special_tokens(tokenizer)``; a longer
  one keeps the chat template's head (bos, system prompt, first role header) and generation
  prompt and loses dialogue content from the left (the end of a dialogue is what the reply
  answers); raw prompts keep bos and their last ``max_prompt_length`` tokens;
* they are sorted by length into batches of ``batch_size`` sequences (a prompt with
  ``num_samples`` samples takes ``num_samples`` of them), so a batch holds prompts of similar
  length and pays little padding; the results come back in the input order;
* padding is on the **left** (the tokenizer's ``padding_side`` is set for the call and restored),
  so every row's last prompt token sits at the end and new tokens follow it; the KV cache is on;
* each batch is seeded with a seed derived from ``(seed, batch index)``: the same seed, prompts
  and batch size give the same texts on CPU. A sampled text does depend on which batch its
  prompt landed in (the random draws are shared by the rows of a batch); greedy text does not;
* decoding stops at eos or when a stop string (the next turn marker, e.g. ``"\\n\\nHuman:"`` for
  raw HH prompts) appears in the new text — transformers' ``stop_strings`` criterion — and the
  text is cut before the first stop string.

:class:`GenerationResult` also carries the number of generated tokens (for tokens/s).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spo.config import SamplingConfig
from spo.errors import InputError
from spo.models.formatting import PromptIds

log = logging.getLogger("spo.generation")

VLLM_MISSING = (
    "generate.backend is 'vllm' but the vllm package is not installed; install it on a GPU image "
    "(pip install vllm) or set generate.backend=transformers"
)


@dataclass
class GenerationResult:
    texts: list[list[str]]  # per prompt, num_samples responses
    tokens: list[list[int]]  # generated tokens per response (eos included when it ended one)
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def generated_tokens(self) -> int:
        return sum(sum(row) for row in self.tokens)

    @property
    def tokens_per_second(self) -> float | None:
        return self.generated_tokens / self.seconds if self.seconds > 0 else None


def batch_seed(seed: int, batch_index: int) -> int:
    """A 63-bit seed for one batch, derived from the run seed and the batch index."""
    digest = hashlib.sha256(f"spo-generate:{seed}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string it contains."""
    cut = len(text)
    for stop in stop_strings:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def encode_prompts(
    tokenizer: Any, rows: Sequence[Mapping[str, Any] | tuple[str, str]], max_prompt_length: int
) -> list[PromptIds]:
    """:func:`~spo.models.formatting.encode_prompt` of each row: a ``{"prompt", "source"}``
    mapping (a data row) or a ``(prompt, source)`` pair. The raw prompt, not ``format_prompt``'s
    text: the formatting and the template-aware truncation happen here."""
    from spo.models.formatting import encode_prompt

    out = []
    for row in rows:
        if isinstance(row, str):
            raise TypeError("encode_prompts takes rows (prompt, source), not formatted prompt strings")
        prompt, source = (row["prompt"], row["source"]) if isinstance(row, Mapping) else row
        out.append(encode_prompt(tokenizer, prompt, source, max_prompt_length))
    return out


def _prompt_id_lists(prompts: Sequence[Sequence[int] | PromptIds]) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            raise TypeError(
                "generate_texts takes token ids (spo.generation.encode_prompts(tokenizer, rows, "
                "max_prompt_length)), not prompt strings"
            )
        out.append(list(p.ids if isinstance(p, PromptIds) else p))
    return out


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return sorted(ids)


def _generated_length(row: list[int], eos_ids: Sequence[int], pad_id: int | None) -> int:
    """Tokens the model produced in one output row: up to and including the first eos, else the
    row without the trailing padding generate() adds once a row is finished (stop string)."""
    for i, token in enumerate(row):
        if token in eos_ids:
            return i + 1
    n = len(row)
    if pad_id is not None:
        while n and row[n - 1] == pad_id:
            n -= 1
    return n


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int] | PromptIds],
    sampling: SamplingConfig,
    *,
    batch_size: int = 8,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    progress: bool = True,
    desc: str = "generate",
) -> GenerationResult:
    """``num_samples`` responses per prompt with transformers ``generate`` (see the module doc).

    ``prompts``: token ids per prompt, already truncated (:func:`encode_prompts`).
    """
    import torch
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n = sampling.num_samples
    stop_strings = [s for s in stop_strings if s]
    encoded = _prompt_id_lists(prompts)
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    per_batch = max(1, batch_size // n)
    batches = [order[i : i + per_batch] for i in range(0, len(order), per_batch)]

    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": sampling.do_sample,
        "num_return_sequences": n,
        "use_cache": True,
        "pad_token_id": pad_id,
        "eos_token_id": eos_ids or None,
    }
    if sampling.do_sample:
        gen_kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    else:  # the model's generation_config may carry sampling defaults; greedy must ignore them
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    if stop_strings:
        gen_kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)

    texts: list[list[str]] = [[] for _ in prompts]
    counts: list[list[int]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    bar = tqdm(total=len(prompts), desc=desc, unit=" prompts", leave=False, disable=None if progress else True)
    try:
        for b, members in enumerate(batches):
            rows = [encoded[i] for i in members]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):  # left padding
                if r:
                    input_ids[j, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                    attention[j, width - len(r) :] = 1
            torch.manual_seed(batch_seed(seed, b))
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device), **gen_kwargs
                )
            new = output[:, width:].tolist()
            for j, i in enumerate(members):
                for k in range(n):
                    row = new[j * n + k]
                    length = _generated_length(row, eos_ids, pad_id)
                    text = tokenizer.decode(row[:length], skip_special_tokens=True)
                    texts[i].append(cut_at_stop(text, stop_strings))
                    counts[i].append(length)
            bar.update(len(members))
    finally:
        bar.close()
        if was_training:
            model.train()
    seconds = time.perf_counter() - started
    return GenerationResult(
        texts=texts, tokens=counts, seconds=seconds,
        meta={"batches": len(batches), "prompts_per_batch": per_batch, "backend": "transformers"},
    )


def import_vllm() -> Any:
    """The vllm module, or an InputError saying how to get it."""
    try:
        import vllm
    except ImportError:
        raise InputError(VLLM_MISSING) from None
    return vllm


def generate_texts_vllm(
    model_path: str | Path,
    tokenizer: Any,
    prompts: Sequence[Sequence[int] | PromptIds],
    sampling: SamplingConfig,
    *,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    dtype: str = "auto",
    adapter_base: str | None = None,
    llm: Any = None,
) -> GenerationResult:
    """Same contract as :func:`generate_texts`, with vLLM (continuous batching, its own KV cache).

    ``model_path`` is a full model folder, or a LoRA adapter folder whose base is
    ``adapter_base`` (served with ``enable_lora``). Prompts go in as the same token ids as in
    the transformers backend (:func:`encode_prompts`). Not tested here (no GPU, no vllm).
    """
    vllm = import_vllm()
    from vllm import SamplingParams

    if llm is None:
        if adapter_base is not None:
            llm = vllm.LLM(model=adapter_base, seed=seed, dtype=dtype, enable_lora=True)
        else:
            llm = vllm.LLM(model=str(model_path), seed=seed, dtype=dtype)
    params = SamplingParams(
        n=sampling.num_samples,
        temperature=sampling.temperature if sampling.do_sample else 0.0,
        top_p=sampling.top_p if sampling.do_sample else 1.0,
        max_tokens=sampling.max_new_tokens,
        stop=list(stop_strings) or None,
        seed=seed,
        skip_special_tokens=True,
    )
    encoded = _prompt_id_lists(prompts)
    inputs = [{"prompt_token_ids": ids} for ids in encoded]
    kwargs: dict[str, Any] = {}
    if adapter_base is not None:
        from vllm.lora.request import LoRARequest

        kwargs["lora_request"] = LoRARequest("adapter", 1, str(model_path))
    started = time.perf_counter()
    outputs = llm.generate(inputs, params, **kwargs)
    seconds = time.perf_counter() - started
    texts = [[cut_at_stop(c.text, stop_strings) for c in out.outputs] for out in outputs]
    counts = [[len(c.token_ids) for c in out.outputs] for out in outputs]
    return GenerationResult(texts=texts, tokens=counts, seconds=seconds, meta={"backend": "vllm"})
