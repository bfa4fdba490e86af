"""Stage ``sft``: supervised fine-tuning on prompt + chosen of the train split.

Rows are formatted with :mod:`spo.models.formatting` (the same layout preference training and
generation use) and tokenized here: a prompt longer than ``max_prompt_length`` is cut by
:func:`~spo.models.formatting.encode_prompt` (the chat template's head and generation prompt are
kept, dialogue content is cut from the left), the response is then cut to fit ``max_length``,
and the loss covers response tokens only (prompt labels are -100).  The pre-tokenized ``input_ids``/``labels`` rows go to TRL's ``SFTTrainer``, which
uses the labels as they are (docs/models.md says why TRL and why pre-tokenized).

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
from pathlib import Path
from typing import Any

from tqdm import tqdm

from spo.config import SpoConfig, check_sequence_and_batch
from spo.io import InputError, atomic_dir, read_jsonl, tree_sha256, write_json, write_provenance

log = logging.getLogger("spo.sft")


def _rows(folder: Path, split: str) -> tuple[list[dict[str, Any]], Path]:
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
        examples.append({"input_ids": enc.prompt_ids + enc.response_ids, "labels": [-100] * len(enc.prompt_ids) + enc.response_ids})
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

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.bar = tqdm(total=state.max_steps, desc="sft", unit=" steps", leave=False, disable=None)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            logs = logs or {}
            if "loss" in logs:
                self.train_losses.append((state.global_step, float(logs["loss"])))
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{logs['loss']:.3f}")
            if "eval_loss" in logs:
                self.eval_losses.append((state.global_step, float(logs["eval_loss"])))

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
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


def run(cfg: SpoConfig) -> dict[str, Any]:
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import PrinterCallback, set_seed
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer
    from datasets import Dataset

    from spo.models.loading import apply_lora, load_causal_lm, load_tokenizer, save_model

    sft, optim = cfg.sft, cfg.sft.optim
    check_sequence_and_batch("sft", sft.max_length, sft.max_prompt_length, optim)
    set_seed(cfg.seed, deterministic=False)

    rows_dir, base_dir, out_dir = Path(sft.rows_dir), Path(sft.base_dir), Path(sft.out_dir)
    train_rows, train_file = _rows(rows_dir, "train")
    eval_rows, eval_file = _rows(rows_dir, "eval")
    eval_rows = eval_rows[: sft.eval_rows]
    if not train_rows or not eval_rows:
        raise InputError(f"{rows_dir}: the train and eval splits must both have rows (train {len(train_rows)}, eval {len(eval_rows)})")

    tokenizer = load_tokenizer(base_dir, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer.padding_side = "right"
    model = load_causal_lm(str(base_dir), cfg.model, trainable=True)
    if sft.lora.enabled:
        model = apply_lora(model, sft.lora, seed=cfg.seed)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    train_examples, train_prompts_cut = tokenize_rows(tokenizer, train_rows, sft.max_prompt_length, sft.max_length, "train")
    eval_examples, _ = tokenize_rows(tokenizer, eval_rows, sft.max_prompt_length, sft.max_length, "eval")
    response_tokens = sum(sum(1 for t in ex["labels"] if t != -100) for ex in train_examples)
    if response_tokens == 0:
        raise InputError(f"{train_file}: no response tokens left after truncation; raise sft.max_length")

    progress = _progress_callback()
    scratch = tempfile.mkdtemp(prefix="spo-sft-")  # Trainer wants an output_dir; nothing is saved there
    args = TrlSFTConfig(
        output_dir=scratch,
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
        eval_steps=sft.eval_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        max_length=sft.max_length,
        packing=False,
        dataset_num_proc=None,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        bf16=cfg.model.dtype == "bfloat16" and torch.cuda.is_available(),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
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
    final_eval = trainer.evaluate()
    eval_after = float(final_eval["eval_loss"])
    shutil.rmtree(scratch, ignore_errors=True)

    model = trainer.model
    samples = _samples(model, tokenizer, eval_rows[: sft.sample_prompts], sft.max_prompt_length)
    for sample in samples:
        log.info("sample after SFT:\n  prompt: ...%s\n  completion: %r", sample["prompt"][-200:], sample["completion"])

    steps = trainer.state.global_step
    tokens_seen = trainer.state.num_input_tokens_seen or 0
    if not tokens_seen:
        epochs_done = steps * optim.batch_size / len(train_examples)
        tokens_seen = int(sum(len(ex["input_ids"]) for ex in train_examples) * epochs_done)
    metrics = {
        "train_loss_first": progress.train_losses[0][1] if progress.train_losses else None,
        "train_loss_last": progress.train_losses[-1][1] if progress.train_losses else None,
        "train_loss_mean": float(result.training_loss),
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "eval_curve": [{"step": s, "eval_loss": v} for s, v in dict(reversed(progress.eval_losses)).items()][::-1],
        "steps": steps,
        "epochs": trainer.state.epoch,
        "train_rows": len(train_examples),
        "eval_rows": len(eval_examples),
        "train_prompts_truncated": train_prompts_cut,
        "trainable_params": n_trainable,
        "lora": sft.lora.enabled,
        "tokens_seen": tokens_seen,
        "tokens_per_second": tokens_seen / train_seconds if train_seconds > 0 else None,
        "train_seconds": round(train_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
        "samples": samples,
    }
    if not math.isfinite(eval_after):
        raise InputError(f"sft: eval loss is {eval_after} after training; lower sft.optim.learning_rate")
    # whole or not at all: a killed run leaves the previous model folder (or none), never some of its files
    with atomic_dir(out_dir) as building:
        save_model(model, tokenizer, building)
        write_provenance(
            building, stage="sft", config_hash=cfg.section_hash("model", "sft"),
            inputs={"train": tree_sha256(train_file), "eval": tree_sha256(eval_file), "base": tree_sha256(base_dir)},
        )
    write_json(sft.metrics_file, metrics)
    log.info(
        "sft: %d train rows, %d steps (%s, %s trainable params), eval loss %.3f -> %.3f, %.0f tok/s, %s -> %s in %.1fs",
        len(train_examples), steps, "LoRA" if sft.lora.enabled else "full", f"{n_trainable:,}",
        eval_before, eval_after, metrics["tokens_per_second"] or 0.0, rows_dir, out_dir, metrics["seconds"],
    )
    return {k: v for k, v in metrics.items() if k not in ("samples", "eval_curve")} | {"out_dir": str(out_dir)}
