"""Stage ``generate``: sample responses to test prompts from each trained model.

For every ``name -> folder`` of :meth:`~spo.config.SpoConfig.generation_models` (``generate.models``
plus, with ``generate.policies``, each policy of ``variants``; a full model or a LoRA adapter on its
base, read with :func:`~spo.models.loading.load_trained`), the first ``max_prompts`` prompts of
``{rows_dir}/{split}.jsonl`` are formatted and encoded with
:func:`~spo.models.formatting.encode_prompt` (the layout and truncation the model was trained
with: a long prompt keeps the chat template's head and generation prompt and loses dialogue
content from the left) and answered ``sampling.num_samples`` times by :mod:`spo.generation`.
Output: ``{out_dir}/{name}.jsonl``, one line per prompt and sample::

    {"id", "prompt", "response", "sample": k, "model": name, "model_path",
     "settings": {sampling..., "seed", "backend", "max_prompt_length", "batch_size", "stop_strings"},
     "provenance": {"model_sha256": {weights file: sha256}}}

plus ``provenance.json`` in ``out_dir`` and ``generate.metrics_file`` keyed by model name
(prompts, prompts cut to ``max_prompt_length``, samples, generated tokens, tokens/s, seconds,
mean response length in characters).

Stop strings: raw prompts (a tokenizer without chat template) of HH dialogues stop at the next
``"\\n\\nHuman:"`` turn marker; with a chat template the end-of-turn token is eos, which stops
generation by itself.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spo.config import SpoConfig
from spo.errors import InputError
from spo.io import atomic_dir, file_sha256, read_jsonl, tree_sha256, write_json, write_jsonl, write_provenance

if TYPE_CHECKING:  # the generation module loads when the stage runs
    from spo.generation import GenerationResult

log = logging.getLogger("spo.generate")

HH_STOP = "\n\nHuman:"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _prompts(rows_dir: Path, split: str, max_prompts: int | None) -> tuple[list[dict[str, Any]], Path]:
    path = rows_dir / f"{split}.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: {split} split not found (run prepare and validate first)")
    rows = read_jsonl(path)
    if max_prompts is not None:
        rows = rows[:max_prompts]
    for line_no, row in enumerate(rows, start=1):
        for name in ("prompt", "source"):
            if not isinstance(row.get(name), str):
                raise InputError(f"{path}:{line_no}: field {name!r} is missing or not a string")
    if not rows:
        raise InputError(f"{path}: no prompts to generate from")
    return rows, path


def weights_sha256(folder: str | Path) -> dict[str, str]:
    """sha256 of each weights file of a model folder; for a LoRA adapter, its base's too."""
    from spo.models.loading import adapter_base

    folder = Path(folder)
    out = {
        str(p): file_sha256(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)
    }
    base = adapter_base(folder)
    if base is not None:
        base_path = Path(base) if Path(base).exists() else folder / base
        if base_path.is_dir():
            out.update(weights_sha256(base_path))
        else:
            out[f"base:{base}"] = "hub"  # weights resolved from the hub cache, not hashed here
    return out


def stop_strings_for(tokenizer: Any, sources: set[str]) -> list[str]:
    from spo.models.formatting import has_chat_template

    if not has_chat_template(tokenizer) and "hh" in sources:
        return [HH_STOP]
    return []


def run(cfg: SpoConfig) -> dict[str, Any]:
    """Answer the same prompts with every model, one model at a time (each is freed before the next
    loads), into one folder written whole or not at all: a killed run leaves the previous generations
    folder (or none), never some models' files of this run beside another run's."""
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    gen = cfg.generate
    models = _models(cfg)
    rows, rows_file = _prompts(Path(gen.rows_dir), gen.split, gen.max_prompts)
    out_dir = Path(gen.out_dir)
    settings = gen.sampling.model_dump(mode="json") | {
        "seed": cfg.seed, "backend": gen.backend, "max_prompt_length": gen.max_prompt_length,
        "batch_size": gen.batch_size,
    }
    metrics: dict[str, Any] = {}
    inputs: dict[str, Any] = {"prompts": tree_sha256(rows_file)}
    with atomic_dir(out_dir) as building:
        for name, path in models.items():
            model_started = time.perf_counter()
            result, prompts_cut, stops = _generate(cfg, name, path, rows)
            shas = weights_sha256(path)
            lines = _lines(rows, result.texts, name, path, settings | {"stop_strings": stops}, shas)
            write_jsonl(building / f"{name}.jsonl", lines)
            metrics[name] = _model_metrics(result, lines, len(rows), prompts_cut, model_started)
            inputs[name] = shas
            log.info(
                "generate %s: %d prompts x %d samples, %d tokens in %.1fs (%.0f tok/s, %s), %s -> %s",
                name, len(rows), gen.sampling.num_samples, result.generated_tokens, result.seconds,
                result.tokens_per_second or 0.0, gen.backend, path, out_dir / f"{name}.jsonl",
            )
        write_provenance(building, stage="generate", config_hash=cfg.section_hash("model", "generate"), inputs=inputs)
    write_json(gen.metrics_file, metrics)
    return {
        "models": list(gen.models), "prompts": len(rows), "out_dir": str(out_dir),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _models(cfg: SpoConfig) -> dict[str, str]:
    """``name -> folder`` of every model to sample from, checked before anything is loaded: a missing
    folder, or vllm asked for but not installed, fails in a second rather than after the first model."""
    from spo.generation import import_vllm

    models = cfg.generation_models()
    if not models:
        raise InputError("nothing to generate from: generate.models is empty and no policy in `variants`")
    missing = {name: path for name, path in models.items() if not Path(path).is_dir()}
    if missing:
        listed = ", ".join(f"{name} -> {path}" for name, path in missing.items())
        raise InputError(f"generate: model folder not found: {listed} "
                         "(train it first, or fix generate.models / variants)")
    if cfg.generate.backend == "vllm":
        import_vllm()
    return models


def _generate(cfg: SpoConfig, name: str, path: str, rows: list[dict[str, Any]],
              ) -> tuple[GenerationResult, int, list[str]]:
    """One model's samples for every prompt, encoded with its own tokenizer (the layout it was trained
    with); also how many prompts were cut and the stop strings used."""
    import torch

    from spo.generation import encode_prompts, generate_texts, generate_texts_vllm
    from spo.models.loading import adapter_base, load_tokenizer, load_trained

    gen = cfg.generate
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    prompts = encode_prompts(tokenizer, rows, gen.max_prompt_length)
    prompts_cut = sum(p.truncated for p in prompts)
    if prompts_cut:
        log.info("generate %s: %d of %d prompts cut to %d tokens (template head and generation prompt kept)",
                 name, prompts_cut, len(prompts), gen.max_prompt_length)
    stops = stop_strings_for(tokenizer, {row["source"] for row in rows})
    if gen.backend == "vllm":
        result = generate_texts_vllm(
            path, tokenizer, prompts, gen.sampling, seed=cfg.seed,
            stop_strings=stops, dtype=cfg.model.dtype, adapter_base=adapter_base(path),
        )
        return result, prompts_cut, stops
    # a LoRA adapter folded into its base: the same function, without the adapter's extra
    # matmuls in every layer at every generated token
    model = load_trained(path, cfg.model, merge=True)
    model.to(generation_device())  # loaded on the CPU: a GPU task would otherwise sample on its CPU
    model.eval()
    with torch.no_grad():
        result = generate_texts(
            model, tokenizer, prompts, gen.sampling, batch_size=gen.batch_size, seed=cfg.seed,
            stop_strings=stops, desc=f"generate {name}",
        )
    return result, prompts_cut, stops


def generation_device() -> Any:
    """Where the transformers backend samples: the GPU when there is one (as the reward model and the
    judge place themselves), else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _lines(rows: list[dict[str, Any]], texts: list[list[str]], name: str, path: str, settings: dict[str, Any],
           shas: dict[str, str]) -> list[dict[str, Any]]:
    """One output line per prompt and sample, each carrying what made it (model, settings, weights'
    sha256), so a line read on its own says where it came from."""
    return [
        {
            "id": row.get("id"),
            "prompt": row["prompt"],
            "response": text,
            "sample": k,
            "model": name,
            "model_path": str(path),
            "settings": settings,
            "provenance": {"model_sha256": shas},
        }
        for row, samples in zip(rows, texts)
        for k, text in enumerate(samples)
    ]


def _model_metrics(result: GenerationResult, lines: list[dict[str, Any]], n_prompts: int, prompts_cut: int,
                   started: float) -> dict[str, Any]:
    """One model's metrics entry: sizes, throughput, and the response lengths that reveal a model
    that stops at once or never stops."""
    n_samples = len(lines)
    lengths = [len(line["response"]) for line in lines]
    return {
        "prompts": n_prompts,
        "prompts_truncated": prompts_cut,
        "samples": n_samples,
        "generated_tokens": result.generated_tokens,
        "tokens_per_second": round(result.tokens_per_second, 2) if result.tokens_per_second else None,
        "generate_seconds": round(result.seconds, 3),
        "seconds": round(time.perf_counter() - started, 3),
        "mean_response_chars": sum(lengths) / n_samples if n_samples else 0.0,
        "mean_response_tokens": result.generated_tokens / n_samples if n_samples else 0.0,
        "empty_responses": sum(1 for n in lengths if n == 0),
    }
