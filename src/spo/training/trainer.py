"""The preference trainer: DPO / IPO / KTO, each with or without the SPO degree loss.

A plain Accelerate loop (docs/training.md says why not ``transformers.Trainer``). Per optimizer
step, every process runs ``accumulation_steps`` micro-batches of ``optim.micro_batch_size``
pairs; ``optim.batch_size`` pairs are consumed per step over all processes. Each micro-batch is
ONE packed forward of ``[prompt | chosen | rejected | degree variants]`` rows through
:class:`~spo.training.forward.SPOModule` (the module DDP/FSDP wraps, so the degree heads and
the LM synchronise in the same backward).

This module is the loop (train, evaluate, log, the final save) and the class that puts the
pieces together, each in a module of its own:

* ``distributed``: the Accelerator and what it cannot run (FSDP, precision);
* ``plan``: the pairs of each step, and their packed batches;
* ``reference``: the reference log-probs (adapters off, a frozen copy, or precomputed);
* ``step``: forward, losses and metrics of one micro-batch;
* ``checkpoints``: save, resume, and what a checkpoint must share with the run.

Entry points (see docs/training.md):

* :meth:`PreferenceTrainer.from_rows` — build on a model + tokenizer + rows;
* :meth:`PreferenceTrainer.batch_loss` — loss parts on given pairs, no grad (parity tests);
* :meth:`PreferenceTrainer.train` — the loop (``stop_after`` simulates an interruption).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from spo.config import TrainConfig
from spo.errors import InputError, NonFiniteLossError
from spo.training.checkpoints import Checkpoints, TrainerState, config_hash
from spo.training.data import PairExample, kl_partners, tokenize_pairs
from spo.training.distributed import accumulation_steps, is_peft, is_sharded, setup_accelerator, warn_half_weights
from spo.training.forward import SPOModule, compile_layers, select_attention
from spo.training.heads import DegreeClassifier, save_classifier
from spo.training.metrics import Accumulator, MetricsWriter, peak_memory_mb, save_confusion, save_responses
from spo.training.optim import build_optimizer, build_scheduler
from spo.training.plan import DataPlan
from spo.training.reference import build_reference, even_shards, weights_fingerprint
from spo.training.step import PreferenceStep

log = logging.getLogger("spo.train")

HEADS_SEED_OFFSET = 7919


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere in ``model`` (TRL's ``disable_dropout_in_model``), attention dropout included."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # a plain float of HF attention modules
            setattr(module, "attention_dropout", 0.0)  # noqa: B010 - Module's typing takes attributes for submodules


class PreferenceTrainer:
    """DPO/IPO/KTO (+SPO) on pre-tokenised pairs. See the module docstring and docs/training.md.

    ``model``: a transformers causal LM (``Any``: its config and methods are found at run time), or
    a peft model for LoRA — apply LoRA before; ``train_examples``/
    ``eval_examples`` from :func:`spo.training.data.tokenize_pairs` (degree data included when
    the degree loss is active). ``out_dir`` None: nothing is written (benchmarks, parity tests).
    ``reference_fingerprint``: identifies the reference weights for the precompute cache (the
    stage passes the SFT folder's hash; default: a hash of the weights). ``reference_cache``:
    where the precomputed log-probs live (file or folder; default ``out_dir/reference_logps``);
    ``reference_shared``: a folder of tables to read first, never written (the reference stage's).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        cfg: TrainConfig,
        train_examples: Sequence[PairExample],
        eval_examples: Sequence[PairExample] | None = None,
        *,
        seed: int = 0,
        out_dir: str | Path | None = None,
        n_levels: int | None = None,
        accelerator: Any = None,
        reference_cache: str | Path | None = None,
        reference_shared: str | Path | None = None,
        reference_fingerprint: str | None = None,
        progress: bool = True,
    ) -> None:
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        if n_levels is None:  # the degree dataset's, else a placeholder for the unused metric shapes
            n_levels = next((sd.n_levels for ex in train_examples for sd in ex.degrees.values()), 4)
        self.n_levels = n_levels
        _check_inputs(cfg, model, train_examples)
        peft = is_peft(model)
        warn_half_weights(next(model.parameters()).dtype)
        self.accelerator = acc = setup_accelerator(cfg, peft, accelerator)
        self.accum = accumulation_steps(cfg.optim, acc.num_processes)
        self.data = DataPlan(cfg, train_examples, eval_examples, tokenizer.pad_token_id, seed, acc.device)

        if cfg.disable_dropout:
            disable_dropout(model)
        if cfg.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # built whenever SPO is enabled, even at λ = 0, from an RNG of their own: the policy's stream
        # is untouched, so λ = 0 is bit-identical to no SPO
        self.heads: DegreeClassifier | None = None
        if cfg.spo.enabled:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + HEADS_SEED_OFFSET)
                self.heads = DegreeClassifier(int(model.config.hidden_size), self.n_levels, cfg.spo)
            self.heads.to(acc.device)
        select_attention(model, cfg.packed_attention, acc.device)
        self.module = SPOModule(model, self.heads if cfg.spo.active else None, cfg.logits_chunk).to(acc.device)
        frozen_copy = None
        if not peft and not cfg.precompute_reference:  # before prepare: FSDP replaces the parameters
            frozen_copy = SPOModule(copy.deepcopy(model).eval().requires_grad_(False), None, cfg.logits_chunk)
            frozen_copy.to(acc.device)
        if cfg.compile:  # after the copy: a compiled layer is not deep-copied
            for lm in (model, *([frozen_copy.lm] if frozen_copy is not None else [])):
                log.info("train.compile: %d decoder layers compiled", compile_layers(lm))
        # before prepare: a sharded model's parameters are DTensors, which cannot be hashed as bytes
        weights = reference_fingerprint or weights_fingerprint(model)
        dtype = str(next(model.parameters()).dtype)
        self.state = TrainerState(self.n_levels, config_hash(cfg, seed, weights, dtype, self.data.train_examples))

        optimizer = build_optimizer(self.module.parameters(), cfg.optim,
                                    head_params=self.heads.parameters() if self.heads else (),
                                    head_learning_rate=cfg.spo.head_learning_rate)
        # not prepared: an AcceleratedScheduler would step once per process per step
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.data.total_steps)
        # model and optimizer in ONE call: FSDP2 shards the parameters and rebinds the optimizer to them
        self.model, self.optimizer = acc.prepare(self.module, optimizer)
        cache = Path(reference_cache) if reference_cache is not None else (
            self.out_dir / "reference_logps" if self.out_dir is not None else None)
        self.reference = build_reference(cfg, self.model, frozen_copy, self.data, acc, dtype=dtype,
                                         fingerprint=weights, cache=cache, progress=progress,
                                         shared=Path(reference_shared) if reference_shared is not None else None)
        self.stepper = PreferenceStep(cfg, self.model, self.reference, self.data, acc, self.n_levels)
        self.checkpoints = Checkpoints(self.out_dir, acc, self.scheduler, self.state, cfg.keep_checkpoints)
        self.writer = MetricsWriter(self.out_dir, acc.is_main_process)
        self.resume_checked = False  # the first train() call looks for checkpoints; a later one continues in memory
        set_seed(seed)

    @classmethod
    def from_rows(cls, model: Any, tokenizer: Any, cfg: TrainConfig, rows: Sequence[dict],
                  degrees: Sequence[dict] | None = None, eval_rows: Sequence[dict] | None = None,
                  eval_degrees: Sequence[dict] | None = None, **kwargs: Any) -> PreferenceTrainer:
        """Tokenise rows ({"prompt","chosen","rejected"[,"id","source"]}) and build the trainer.

        Rows without ``source`` are taken as HH dialogues when the prompt has "Human:" turns,
        else as a single user message (tldr layout).
        """

        def fill(rs: Sequence[dict]) -> list[dict]:
            out = []
            for i, r in enumerate(rs):
                r = dict(r)
                r.setdefault("id", str(i))
                r.setdefault("source", "hh" if "Human:" in r["prompt"] else "tldr")
                out.append(r)
            return out

        common: dict[str, Any] = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
                                  "degree_mode": cfg.spo.active_mode}
        train, _ = tokenize_pairs(fill(rows), degrees, tokenizer, where="train rows", **common)
        evals = None
        if eval_rows:
            evals, _ = tokenize_pairs(fill(eval_rows)[: cfg.eval_rows], eval_degrees, tokenizer, where="eval rows",
                                      **common)
        return cls(model, tokenizer, cfg, train, evals, **kwargs)

    # ---------------------------------------------------------------- the loop

    def train(self, stop_after: int | None = None) -> dict[str, Any]:
        """Run to ``total_steps`` (resuming from the last checkpoint when ``cfg.resume``).

        ``stop_after``: return after this many optimizer steps (absolute step count) without the
        final save — what a killed run leaves behind (tests and timing).
        """
        from tqdm import tqdm

        acc, cfg, total = self.accelerator, self.cfg, self.data.total_steps
        start = self.state.step if self.resume_checked else self._resume()
        self.resume_checked = True
        end = min(total, stop_after) if stop_after is not None else total
        self.model.train()
        cache: dict[int, list[list[int]]] = {}
        bar = tqdm(total=end, initial=start, desc=f"train {cfg.loss}", unit="step",
                   disable=not (self.progress and acc.is_local_main_process))
        started = time.perf_counter()
        window_seconds, grad_norms = 0.0, []
        try:
            while self.state.step < end:
                epoch = self.state.step // self.data.steps_per_epoch
                if epoch not in cache:
                    cache = {epoch: self.data.epoch_batches(epoch)}
                step_started = time.perf_counter()
                grad_norms.append(self._train_step(self.state.step, cache[epoch]))
                window_seconds += time.perf_counter() - step_started  # train steps only: no eval, no checkpoint
                bar.update(1)
                s = self.state.step
                if s % cfg.logging_steps == 0 or s == total:
                    values = self._window_values(window_seconds, grad_norms)
                    self._log(values, "train")
                    bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['rewards/accuracies']:.2f}")
                    window_seconds, grad_norms = 0.0, []
                if self.data.eval_examples and s % cfg.eval_steps == 0 and s < total:
                    self._log(self.evaluate(), "eval")
                if s % cfg.save_steps == 0 and s < total:
                    self.checkpoints.save()
        finally:
            bar.close()
        seconds = time.perf_counter() - started
        summary: dict[str, Any] = {
            "steps": self.state.step, "start_step": start, "total_steps": total,
            "train_seconds": round(seconds, 3), "skipped_steps": self.state.skipped_steps,
            "reference": self.reference.kind, "reference_forwards": self.reference.forwards,
            "reference_reused": self.reference.reused,
            "accumulation_steps": self.accum, "num_processes": acc.num_processes,
            "tokens_total": self.state.tokens_total,
            "pair_order_sha256": hashlib.sha256(json.dumps(self.data.pair_order()).encode()).hexdigest(),
        }
        if self.state.step < total:  # stopped early (simulated kill / timing)
            return summary
        final_eval, confusion, responses = self._evaluate() if self.data.eval_examples else ({}, None, None)
        if final_eval:
            self._log(final_eval, "eval")
        summary["eval"] = final_eval
        summary.update(self._final_save(confusion, responses))
        self.writer.close()
        return summary

    def _resume(self) -> int:
        """The step the run starts at: a checkpoint's with ``train.resume``, else 0 after the
        previous run's files are cleared."""
        if not self.cfg.resume:
            self.checkpoints.start_afresh()
            return 0
        resumed = self.checkpoints.resume()
        if resumed is None:
            return 0
        self.writer.truncate_after(self.state.step)  # the lines a killed run logged after its checkpoint
        log.info("resuming from %s (step %d of %d)", resumed, self.state.step, self.data.total_steps)
        return self.state.step

    def _train_step(self, step: int, batches: list[list[int]]) -> float:
        """One optimizer step on this process's micro-batches of the step's global batch; the grad norm."""
        acc, oc, stepper = self.accelerator, self.cfg.optim, self.stepper
        epoch, pos = divmod(step, self.data.steps_per_epoch)
        global_batch = batches[pos]
        mb = oc.micro_batch_size
        micro = [global_batch[i: i + mb] for i in range(0, len(global_batch), mb)]
        mine = micro[acc.process_index * self.accum: (acc.process_index + 1) * self.accum]
        z0 = None
        if self.cfg.loss == "kto":
            z0 = stepper.kl_estimate("train", [i for idx in mine for i in idx], kl_partners(global_batch), epoch)
        nonfinite = 0.0
        parts_seen: dict[str, float] = {}
        for j, idx in enumerate(mine):
            examples = [self.data.train_examples[i] for i in idx]
            with record_function("spo/collate"):  # named for bench/bench_gpu.py --profile (free without a profiler)
                batch = self.data.collator(examples, idx, step=step).to(acc.device)
            totals: list[float] | None = None
            carried: dict[int, float] | None = None
            if self.data.collator.separate_variants:  # variants first, in passes no larger than the alignment pass
                passes, totals = stepper.variant_passes(examples, idx, step, batch)
                carried = {}
                for vb in passes:
                    with acc.no_sync(self.model):
                        loss, parts = stepper.variant_pass(vb, totals, self.state.window)
                        if not all(math.isfinite(v) for v in parts.values()):
                            nonfinite = 1.0
                        acc.backward(loss / self.accum)
                    for s, value in parts.items():
                        carried[s] = carried.get(s, 0.0) + value
            sync = j == len(mine) - 1
            # the alignment pass last: it uses every parameter, as DDP's synchronised backward needs
            with nullcontext() if sync else acc.no_sync(self.model):
                out = stepper.forward_loss(batch, "train", self.state.window, z0, totals, carried)
                if not torch.isfinite(out.loss.detach()) or nonfinite:
                    nonfinite = 1.0
                    parts_seen = {k: v for k, v in out.parts.items() if isinstance(v, float)}
                acc.backward(out.loss / self.accum)
        flag = torch.tensor(nonfinite, device=acc.device)
        if acc.num_processes > 1:
            flag = acc.reduce(flag, reduction="sum")
        # named for bench/bench_gpu.py --profile (free without a profiler): clipping, the step, zero_grad
        with record_function("spo/optimizer"):
            # the prepared model's own parameters: FSDP computes the norm of its shards only for exactly those
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), oc.max_grad_norm)
            grad_norm = float(grad_norm) if grad_norm is not None else 0.0
            if float(flag) > 0 or not math.isfinite(grad_norm):
                what = f"loss parts {parts_seen}" if parts_seen else f"gradient norm {grad_norm}"
                if self.cfg.nan_policy == "raise":
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step + 1} ({what}); set train.nan_policy=skip to skip such steps"
                    )
                log.warning("step %d: non-finite %s; step skipped (nan_policy=skip)", step + 1, what)
                self.state.skipped_steps += 1
                self.state.window.add("nonfinite_steps", 1)
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return grad_norm

    # ---------------------------------------------------------------- eval

    def evaluate(self) -> dict[str, float]:
        """Eval metrics over the eval pairs (all levels, no grad, eval mode), reduced across processes."""
        return self._evaluate()[0]

    @torch.no_grad()
    def _evaluate(self) -> tuple[dict[str, float], Tensor | None, Tensor | None]:
        """The eval metrics, and the degree confusion and per-response counts they come from.

        Every process runs the same number of forwards (padding rounds are computed and not
        counted), as a sharded model's forward is a collective.
        """
        acc, evals = self.accelerator, self.data.eval_examples
        if not evals:
            return {}, None, None
        metrics = Accumulator(self.n_levels, len(evals))
        n = len(evals)
        mb = self.cfg.optim.micro_batch_size
        chunks = [list(range(i, min(i + mb, n))) for i in range(0, n, mb)]
        was = self.model.training
        self.model.eval()
        try:
            z0 = None
            if self.cfg.loss == "kto":
                mine = [i for c in even_shards(len(chunks), acc.process_index, acc.num_processes) if c is not None
                        for i in chunks[c]]
                z0 = self.stepper.kl_estimate("eval", mine, kl_partners(list(range(n))), 0)
            for c in even_shards(len(chunks), acc.process_index, acc.num_processes):
                idx = chunks[c if c is not None else 0]
                batch = self.data.collator([evals[i] for i in idx], idx, step=0, all_levels=True).to(acc.device)
                self.stepper.forward_loss(batch, "eval", metrics if c is not None else None, z0)
        finally:
            self.model.train(was)
        return metrics.summarise(acc, self.cfg.spo.sides)

    def batch_loss(self, indices: Sequence[int] | None = None, split: str = "train",
                   train_mode: bool = False) -> dict[str, Any]:
        """Loss parts on the given pairs (default: the first global batch of epoch 0), without grad.

        ``train_mode=False`` runs in eval mode (no dropout): the number a parity test compares.
        Returns floats (loss, loss_align, loss_degree_w/l, kl) and per-pair log-prob tensors.
        KTO's z0 is estimated on the same pairs (each with the next one's response).
        """
        stepper = self.stepper
        examples = self.data.examples(split)
        indices = list(indices) if indices is not None else self.data.epoch_batches(0)[0]
        was = self.model.training
        self.model.train(train_mode)
        try:
            with torch.no_grad():
                z0 = None
                if self.cfg.loss == "kto":  # a precomputed reference knows the run's own mismatched rows (epoch 0) only
                    precomputed = self.reference.kind == "precomputed"
                    partners = self.data.kl_plan()[split][0] if precomputed else kl_partners(indices)
                    if any(i not in partners for i in indices):
                        raise InputError(f"pairs {indices} have no precomputed KTO mismatched row in split {split!r}")
                    z0 = stepper.kl_estimate(split, indices, partners, 0)
                chosen = [examples[i] for i in indices]
                batch = self.data.collator(chosen, indices, step=0).to(self.accelerator.device)
                totals: list[float] | None = None
                carried: dict[int, float] | None = None
                if self.data.collator.separate_variants:
                    passes, totals = stepper.variant_passes(chosen, indices, 0, batch)
                    carried = {}
                    for vb in passes:
                        for s, value in stepper.variant_pass(vb, totals, None)[1].items():
                            carried[s] = carried.get(s, 0.0) + value
                return stepper.forward_loss(batch, split, None, z0, totals, carried).parts
        finally:
            self.model.train(was)

    # ---------------------------------------------------------------- logging

    def _log(self, values: dict[str, float], split: str) -> None:
        if self.accelerator.is_main_process:
            self.writer.write(self.state.step, split, values)

    def _window_values(self, seconds: float, grad_norms: list[float]) -> dict[str, float]:
        """The logged values of the steps since the last log line; the window starts again."""
        values, _, _ = self.state.window.summarise(self.accelerator, self.cfg.spo.sides)
        values["tokens_per_s"] = values["tokens"] / seconds if seconds > 0 else 0.0
        values["peak_memory_mb"] = self._peak_memory()
        values["learning_rate"] = float(self.scheduler.get_last_lr()[0])
        values["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        values["epoch"] = self.state.step / self.data.steps_per_epoch
        values["skipped_steps"] = float(self.state.skipped_steps)
        self.state.tokens_total += values["tokens"]
        self.state.window.reset()
        return values

    def _peak_memory(self) -> float:
        """The mean over processes of each one's peak memory."""
        acc = self.accelerator
        value = torch.tensor(peak_memory_mb(acc.device), device=acc.device)
        if acc.num_processes > 1:
            value = acc.reduce(value, reduction="sum") / acc.num_processes
        return float(value)

    # ---------------------------------------------------------------- the final save

    def _final_save(self, confusion: Tensor | None, responses: Tensor | None) -> dict[str, Any]:
        """The trained LM (full weights or the adapter), the degree heads and, with the degree loss
        on, the final eval's confusion matrix and per-response degree counts."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.out_dir is None:
            return {}
        from spo.models.loading import save_model

        # under FSDP the full weights exist only once gathered (a collective: every process calls it)
        state = acc.get_state_dict(self.model) if is_sharded(acc) else None
        if not acc.is_main_process:
            return {}
        lm = acc.unwrap_model(self.model).lm
        lm_state = None
        if state is not None:  # gathered copies: a tied weight comes back twice, saved once (as save_pretrained would)
            tied = set(getattr(lm, "all_tied_weights_keys", {}) or {})
            lm_state = {k.removeprefix("lm."): v for k, v in state.items()
                        if k.startswith("lm.") and k.removeprefix("lm.") not in tied}
        save_model(lm, self.tokenizer, self.out_dir, state_dict=lm_state)
        out: dict[str, Any] = {"out_dir": str(self.out_dir)}
        if self.heads is not None:
            heads = self.heads
            if state is not None and self.cfg.spo.active:  # sharded: rebuild from the gathered tensors
                heads = DegreeClassifier(self.heads.hidden_size_of_lm, self.heads.n_levels, self.cfg.spo)
                heads.load_state_dict({k.removeprefix("heads."): v for k, v in state.items() if k.startswith("heads.")})
            save_classifier(heads, self.out_dir)
        if self.cfg.spo.active and confusion is not None and responses is not None:
            sides = self.cfg.spo.sides
            save_confusion(confusion, sides, self.out_dir)
            save_responses(responses, [e.id for e in self.data.eval_examples], sides, self.n_levels, self.out_dir)
            out["confusion"] = str(self.out_dir / "degree_confusion.png")
        if not self.cfg.keep_checkpoints_at_end:
            self.checkpoints.remove()
        return out

    def unwrapped_lm(self) -> nn.Module:
        return self.module.lm


def _check_inputs(cfg: TrainConfig, model: nn.Module, train_examples: Sequence[PairExample]) -> None:
    """What the model and the pairs must hold before any expensive work (each error names the option)."""
    if cfg.spo.active and not any(ex.degrees for ex in train_examples):
        raise InputError("the degree loss is on but the training pairs carry no degree variants "
                         "(tokenise them with degree_mode, or set train.spo.enabled=false)")
    if sum(p.numel() for p in model.parameters() if p.requires_grad) == 0:
        raise InputError(
            "the model has no trainable parameter (requires_grad is off everywhere): training would only move the "
            "degree heads. A LoRA model merged into its base is frozen: load it with trainable=True, or set "
            "train.lora.enabled=true"
        )
