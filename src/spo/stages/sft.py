"""Stage ``sft``: supervised fine-tuning on prompt + chosen of the train split.

Rows are formatted with :mod:`spo.models.formatting` (the same layout preference training and
generation use) and tokenized here: a prompt longer than ``max_prompt_length`` is cut by
:func:`~spo.models.formatting.encode_prompt` (the chat template's head and generation prompt are
kept, dialogue content is cut from the left), the response is then cut to fit ``max_length``,
and the loss covers response tokens only (prompt labels are -100).  The pre-tokenized
``input_ids``/``labels`` rows go to TRL's ``SFTTrainer``, which uses the labels as they are
(docs/models.md says why TRL and why pre-tokenized).

Full fine-tuning or LoRA per ``sft.lora``; the output folder holds the full model or the
adapter, plus the tokenizer.  Eval loss is measured on ``eval_rows`` eval-split rows before
training, every ``eval_steps`` and at the end; metrics go to ``sft.metrics_file``; a few greedy
generations from eval prompts are logged at the end.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from spo.config import SpoConfig
from spo.errors import InputError
from spo.io import atomic_dir, read_jsonl, tree_sha256, write_json, write_provenance

log = logging.getLogger("spo.sft")
_Split = tuple[list[dict[str, Any]], Path]  # a split's rows and the file they came from


def _rows(folder: Path, split: str) -> _Split:
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: {split} split not found (run prepare and validate first)")
    rows = read_jsonl(path)
    for line_no, row in enumerate(rows, start=1):
        for field in ("prompt", "chosen", "source"):
            if not isinstance(row.get(field), str):
                raise InputError(f"{path}:{line_no}: field {field!r} is missing or not a string")
    return rows, path


def tokenize_rows(
    tokenizer: Any, rows: list[dict[str, Any]], max_prompt_length: int, max_length: int, desc: str
) -> tuple[list[dict[str, list[int]]], int]:
    """``input_ids`` + ``labels`` (-100 on the prompt) for each row's prompt + chosen, and how
    many prompts were cut to ``max_prompt_length``."""
    from spo.models.formatting import encode_example

    examples = []
    truncated = 0
    for row in tqdm(rows, desc=f"sft tokenize {desc}", unit=" rows", leave=False, disable=None):
        enc = encode_example(
            tokenizer, row["prompt"], row["chosen"], row["source"],
            max_prompt_length=max_prompt_length, max_length=max_length,
        )
        truncated += enc.prompt_truncated
        examples.append({"input_ids": enc.prompt_ids + enc.response_ids,
                         "labels": [-100] * len(enc.prompt_ids) + enc.response_ids})
    if truncated:
        log.info("sft %s: %d of %d prompts cut to %d tokens (template head and generation prompt kept)",
                 desc, truncated, len(rows), max_prompt_length)
    return examples, truncated


def _progress_callback() -> Any:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """A quiet progress bar (transformers' own prints every log dict) that keeps every loss."""

        def __init__(self) -> None:
            self.bar: tqdm | None = None
            self.train_losses: list[tuple[int, float]] = []
            self.eval_losses: list[tuple[int, float]] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar = tqdm(total=state.max_steps, desc="sft", unit=" steps", leave=False, disable=None)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.update(1)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                self.train_losses.append((state.global_step, float(logs["loss"])))
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{logs['loss']:.3f}")
            if "eval_loss" in logs:
                self.eval_losses.append((state.global_step, float(logs["eval_loss"])))

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.close()

    return Progress()


def _samples(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_prompt_length: int) -> list[dict[str, str]]:
    import torch

    from spo.models.formatting import encode_prompt

    model.eval()
    out = []
    for row in rows:
        ids = encode_prompt(tokenizer, row["prompt"], row["source"], max_prompt_length).ids
        input_ids = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=40,
                do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
        completion = tokenizer.decode(generated[0, len(ids):], skip_special_tokens=True)
        out.append({"prompt": row["prompt"][-300:], "completion": completion})
    return out


@dataclass(frozen=True)
class _Fitted:
    """What the stage reads back from TRL's trainer once it is done: the model and every loss."""

    model: Any
    eval_before: float
    eval_after: float
    train_loss_mean: float
    train_losses: list[tuple[int, float]]
    eval_losses: list[tuple[int, float]]
    steps: int
    epochs: float | None
    tokens_seen: int
    train_seconds: float


def run(cfg: SpoConfig) -> dict[str, Any]:
    """Tokenize the splits, fit with TRL's SFTTrainer, log a few samples, save the model whole.

    The seed is set before the model is loaded: LoRA's initialisation and the trainer's data order
    both draw from it, which makes a CPU run repeat bit for bit.
    """
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import set_seed

    from spo.models.loading import save_model

    sft = cfg.sft
    set_seed(cfg.seed, deterministic=False)
    rows_dir, base_dir, out_dir = Path(sft.rows_dir), Path(sft.base_dir), Path(sft.out_dir)
    (train_rows, train_file), (eval_rows, eval_file) = _splits(rows_dir, sft.eval_rows)
    tokenizer, model = _load_model(cfg, base_dir)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_examples, prompts_cut = tokenize_rows(tokenizer, train_rows, sft.max_prompt_length, sft.max_length, "train")
    eval_examples, _ = tokenize_rows(tokenizer, eval_rows, sft.max_prompt_length, sft.max_length, "eval")
    if sum(sum(1 for t in ex["labels"] if t != -100) for ex in train_examples) == 0:
        raise InputError(f"{train_file}: no response tokens left after truncation; raise sft.max_length")

    fitted = _fit(cfg, model, tokenizer, train_examples, eval_examples)
    samples = _samples(fitted.model, tokenizer, eval_rows[: sft.sample_prompts], sft.max_prompt_length)
    for sample in samples:
        log.info("sample after SFT:\n  prompt: ...%s\n  completion: %r", sample["prompt"][-200:], sample["completion"])
    metrics = _metrics(cfg, fitted, train_examples, eval_examples, prompts_cut, n_trainable, started) | {
        "samples": samples}
    if not math.isfinite(fitted.eval_after):
        raise InputError(f"sft: eval loss is {fitted.eval_after} after training; lower sft.optim.learning_rate")
    # whole or not at all: a killed run leaves the previous model folder (or none), never some of its files
    with atomic_dir(out_dir) as building:
        save_model(fitted.model, tokenizer, building)
        write_provenance(
            building, stage="sft", config_hash=cfg.section_hash("model", "sft"),
            inputs={"train": tree_sha256(train_file), "eval": tree_sha256(eval_file), "base": tree_sha256(base_dir)},
        )
    write_json(sft.metrics_file, metrics)
    log.info(
        "sft: %d train rows, %d steps (%s, %s trainable params), eval loss %.3f -> %.3f, %.0f tok/s, %s -> %s in %.1fs",
        len(train_examples), fitted.steps, "LoRA" if sft.lora.enabled else "full", f"{n_trainable:,}",
        fitted.eval_before, fitted.eval_after, metrics["tokens_per_second"] or 0.0, rows_dir, out_dir,
        metrics["seconds"],
    )
    return {k: v for k, v in metrics.items() if k not in ("samples", "eval_curve")} | {"out_dir": str(out_dir)}


def _splits(rows_dir: Path, eval_rows: int) -> tuple[_Split, _Split]:
    """The train split and the first ``eval_rows`` of the eval split, each with its file; an empty
    one is an InputError here rather than a trainer that silently does nothing."""
    train, train_file = _rows(rows_dir, "train")
    evals, eval_file = _rows(rows_dir, "eval")
    evals = evals[:eval_rows]
    if not train or not evals:
        raise InputError(f"{rows_dir}: the train and eval splits must both have rows "
                         f"(train {len(train)}, eval {len(evals)})")
    return (train, train_file), (evals, eval_file)


def _load_model(cfg: SpoConfig, base_dir: Path) -> tuple[Any, Any]:
    """The base tokenizer (padding on the right, as the trainer's collator expects) and the base
    model, trainable in full or through fresh LoRA adapters per ``sft.lora``."""
    from spo.models.loading import apply_lora, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(base_dir, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer.padding_side = "right"
    model = load_causal_lm(str(base_dir), cfg.model, trainable=True)
    if cfg.sft.lora.enabled:
        model = apply_lora(model, cfg.sft.lora, seed=cfg.seed)
    return tokenizer, model


def _trainer_args(cfg: SpoConfig, output_dir: str) -> Any:
    """``sft.optim`` in TRL's words: one optimizer vocabulary for every stage, whatever runs the loop."""
    import torch
    from trl import SFTConfig as TrlSFTConfig

    optim = cfg.sft.optim
    return TrlSFTConfig(
        output_dir=output_dir,
        seed=cfg.seed,
        data_seed=cfg.seed,
        per_device_train_batch_size=optim.micro_batch_size,
        per_device_eval_batch_size=optim.micro_batch_size,
        gradient_accumulation_steps=optim.batch_size // optim.micro_batch_size,
        learning_rate=optim.learning_rate,
        optim=optim.optimizer,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_epsilon=optim.adam_epsilon,
        weight_decay=optim.weight_decay,
        warmup_steps=optim.warmup_ratio if optim.warmup_ratio is not None else optim.warmup_steps,  # < 1: a ratio
        max_grad_norm=optim.max_grad_norm,
        num_train_epochs=optim.epochs,
        max_steps=optim.max_steps or -1,
        lr_scheduler_type=optim.lr_scheduler,
        eval_strategy="steps",
        eval_steps=cfg.sft.eval_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        max_length=cfg.sft.max_length,
        packing=False,
        dataset_num_proc=None,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        bf16=cfg.model.dtype == "bfloat16" and torch.cuda.is_available(),
    )


def _fit(cfg: SpoConfig, model: Any, tokenizer: Any, train_examples: list[dict[str, list[int]]],
         eval_examples: list[dict[str, list[int]]]) -> _Fitted:
    """The training loop is TRL's ``SFTTrainer`` (docs/models.md says why): eval loss once before,
    every ``eval_steps`` and once after, every train loss kept by the progress callback."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTTrainer

    progress = _progress_callback()
    scratch = tempfile.mkdtemp(prefix="spo-sft-")  # Trainer wants an output_dir; nothing is saved there
    trainer = SFTTrainer(
        model=model,
        args=_trainer_args(cfg, scratch),
        train_dataset=Dataset.from_list(train_examples),
        eval_dataset=Dataset.from_list(eval_examples),
        processing_class=tokenizer,
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the progress bar shows the loss
    eval_before = float(trainer.evaluate()["eval_loss"])
    train_started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - train_started
    eval_after = float(trainer.evaluate()["eval_loss"])
    shutil.rmtree(scratch, ignore_errors=True)
    steps = trainer.state.global_step
    tokens_seen = trainer.state.num_input_tokens_seen or 0
    if not tokens_seen:  # the trainer counts tokens only when asked to: estimated from the rows and epochs seen
        epochs_done = steps * cfg.sft.optim.batch_size / len(train_examples)
        tokens_seen = int(sum(len(ex["input_ids"]) for ex in train_examples) * epochs_done)
    return _Fitted(
        model=trainer.model, eval_before=eval_before, eval_after=eval_after,
        train_loss_mean=float(result.training_loss), train_losses=progress.train_losses,
        eval_losses=progress.eval_losses, steps=steps, epochs=trainer.state.epoch, tokens_seen=tokens_seen,
        train_seconds=train_seconds,
    )


def _metrics(cfg: SpoConfig, fitted: _Fitted, train_examples: list[dict[str, list[int]]],
             eval_examples: list[dict[str, list[int]]], prompts_cut: int, n_trainable: int,
             started: float) -> dict[str, Any]:
    """The DVC metrics record: losses first and last, the eval curve (one point per step, the first
    value logged at it), sizes and throughput."""
    train_losses, seconds = fitted.train_losses, fitted.train_seconds
    return {
        "train_loss_first": train_losses[0][1] if train_losses else None,
        "train_loss_last": train_losses[-1][1] if train_losses else None,
        "train_loss_mean": fitted.train_loss_mean,
        "eval_loss_before": fitted.eval_before,
        "eval_loss_after": fitted.eval_after,
        "eval_curve": [{"step": s, "eval_loss": v} for s, v in dict(reversed(fitted.eval_losses)).items()][::-1],
        "steps": fitted.steps,
        "epochs": fitted.epochs,
        "train_rows": len(train_examples),
        "eval_rows": len(eval_examples),
        "train_prompts_truncated": prompts_cut,
        "trainable_params": n_trainable,
        "lora": cfg.sft.lora.enabled,
        "tokens_seen": fitted.tokens_seen,
        "tokens_per_second": fitted.tokens_seen / seconds if seconds > 0 else None,
        "train_seconds": round(seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }
