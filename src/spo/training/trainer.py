"""The preference trainer: DPO / IPO / KTO, each with or without the SPO degree loss.

A plain Accelerate loop (docs/training.md says why not ``transformers.Trainer``). Per optimizer
step, every process runs ``accumulation_steps`` micro-batches of ``optim.micro_batch_size``
pairs; ``optim.batch_size`` pairs are consumed per step over all processes. Each micro-batch is
ONE padded forward of [b chosen, b rejected, reencode variants] through :class:`SPOModule`
(the module DDP wraps, so the degree heads and the LM synchronise in the same backward).

Entry points (see docs/training.md):

* :meth:`PreferenceTrainer.from_rows` — build on a model + tokenizer + rows;
* :meth:`PreferenceTrainer.batch_loss` — loss parts on given pairs, no grad (parity tests);
* :meth:`PreferenceTrainer.train` — the loop (``stop_after`` simulates an interruption).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spo.config import TrainConfig
from spo.errors import StageFailed
from spo.io import InputError, write_json
from spo.training.data import SIDES, Batch, PairCollator, PairExample, epoch_batches, tokenize_pairs
from spo.training.metrics import Accumulator, MetricsWriter, peak_memory_mb, save_confusion
from spo.training.reference import (
    Reference,
    cache_key,
    examples_fingerprint,
    load_table,
    precompute,
    save_table,
    sequence_logps,
    weights_fingerprint,
)

log = logging.getLogger("spo.train")

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
HEADS_SEED_OFFSET = 7919


class NonFiniteLossError(StageFailed):
    """A non-finite loss or gradient with ``nan_policy: raise``."""


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


# --------------------------------------------------------------------------------------------
# the module DDP wraps


class SPOModule(nn.Module):
    """The policy LM plus the degree heads, so that one DDP wrapper synchronises both.

    ``forward`` runs the concatenated batch once and returns the summed response log-probs of
    the 2b alignment rows and, when degree rows are given, the heads' logits per side. With
    variant rows (reencode) the decoder runs on all rows and the LM head only on the 2b
    alignment rows (the variants need hidden states, not vocabulary logits).
    """

    def __init__(self, lm: nn.Module, heads: nn.Module | None) -> None:
        super().__init__()
        self.lm = lm
        self.heads = heads

    def _decoder_path(self) -> bool:
        cfg = getattr(self.lm, "config", None)
        if cfg is not None and getattr(cfg, "final_logit_softcapping", None):
            return False
        try:
            return self.lm.get_decoder() is not None and self.lm.get_output_embeddings() is not None
        except (AttributeError, NotImplementedError):
            return False

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, n_align: int,
                deg_row: Tensor | None = None, deg_mask: Tensor | None = None, deg_pos: Tensor | None = None,
                deg_side: Tensor | None = None, sides: tuple[bool, bool] = (False, False)) -> dict[str, Any]:
        need_hidden = self.heads is not None and any(sides)
        if need_hidden and input_ids.shape[0] > n_align and self._decoder_path():
            hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            logits = self.lm.get_output_embeddings()(hidden[:n_align])
        else:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                          output_hidden_states=need_hidden)
            logits = out.logits[:n_align]
            hidden = out.hidden_states[-1] if need_hidden else None
        result: dict[str, Any] = {"logps": sequence_logps(logits, labels[:n_align])}
        if need_hidden:
            assert hidden is not None and deg_row is not None and deg_mask is not None and deg_pos is not None
            for s, side in enumerate(SIDES):
                if not sides[s]:
                    continue
                sel = (deg_side == s).nonzero(as_tuple=True)[0]
                if sel.numel():
                    rows = deg_row[sel]
                    result[f"degree_{side}"] = self.heads(hidden[rows], deg_mask[sel], deg_pos[sel], side)
                else:  # keep the head in the graph (DDP): a zero-weight dummy row
                    result[f"degree_{side}"] = self.heads(hidden[:1], attention_mask[:1].bool(), torch.zeros_like(input_ids[:1]), side)
        return result


# --------------------------------------------------------------------------------------------
# state saved with each checkpoint


class TrainerState:
    """Step counter + the metric window, saved by ``accelerator.save_state`` (register_for_checkpointing)."""

    def __init__(self, n_levels: int) -> None:
        self.step = 0
        self.skipped_steps = 0
        self.tokens_total = 0.0
        self.window = Accumulator(n_levels)
        self.config_hash = ""

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "skipped_steps": self.skipped_steps, "tokens_total": self.tokens_total,
            "window_sums": self.window.sums.clone(), "window_confusion": self.window.confusion.clone(),
            "config_hash": self.config_hash,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.tokens_total = float(state["tokens_total"])
        self.window.sums = state["window_sums"].clone()
        self.window.confusion = state["window_confusion"].clone()
        self.config_hash = state["config_hash"]


@dataclass
class StepOutput:
    loss: Tensor
    parts: dict[str, float]


# --------------------------------------------------------------------------------------------
# the trainer


class PreferenceTrainer:
    """DPO/IPO/KTO (+SPO) on pre-tokenised pairs. See the module docstring and docs/training.md.

    ``model``: a causal LM (a peft model for LoRA — apply LoRA before); ``train_examples``/
    ``eval_examples`` from :func:`spo.training.data.tokenize_pairs` (degree data included when
    the degree loss is active). ``out_dir`` None: nothing is written (benchmarks, parity tests).
    ``reference_fingerprint``: identifies the reference weights for the precompute cache (the
    stage passes the SFT folder's hash; default: a hash of the weights). ``reference_cache``:
    where the precomputed log-probs live (file or folder; default ``out_dir/reference_logps``).
    """

    def __init__(
        self,
        model: nn.Module,
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
        reference_fingerprint: str | None = None,
        progress: bool = True,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.seed = seed
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples or [])[: cfg.eval_rows]
        self.progress = progress
        spo = cfg.spo
        self.sides = (spo.enabled and spo.lambda_w > 0, spo.enabled and spo.lambda_l > 0)
        self.degree_active = any(self.sides)
        self.degree_mode = spo.mode if self.degree_active else None
        self.is_kto = cfg.loss == "kto"
        self.is_peft = _is_peft(model)

        if self.degree_active and not any(ex.degrees for ex in self.train_examples):
            raise InputError("the degree loss is on but the training pairs carry no degree variants "
                             "(tokenise them with degree_mode, or set train.spo.enabled=false)")
        if self.is_kto and not all(ex.kl_ids for ex in self.train_examples):
            raise InputError("KTO needs the mismatched responses: tokenise with with_kl=True")
        if n_levels is None:
            n_levels = next((sd.n_levels for ex in self.train_examples for sd in ex.degrees.values()), 4)
        self.n_levels = n_levels

        find_unused = self.degree_active and spo.heads == "two" and not all(self.sides)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.accelerator = accelerator or Accelerator(
            # torchrun on a machine without GPU: Accelerate only goes multi-process (gloo) with cpu=True
            cpu=world > 1 and not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
        )
        acc = self.accelerator
        if world != acc.num_processes:
            raise StageFailed(f"WORLD_SIZE is {world} but Accelerate runs {acc.num_processes} process(es): "
                              "launch with `accelerate launch` (add --cpu without GPUs) or torchrun")
        oc = cfg.optim
        per_step = oc.micro_batch_size * acc.num_processes
        if oc.batch_size % per_step:
            raise InputError(
                f"optim.batch_size {oc.batch_size} is not a multiple of micro_batch_size {oc.micro_batch_size} "
                f"x {acc.num_processes} processes"
            )
        self.accum = oc.batch_size // per_step
        self.steps_per_epoch = len(self.train_examples) // oc.batch_size
        if self.steps_per_epoch == 0:
            raise InputError(f"{len(self.train_examples)} training pairs are fewer than one batch "
                             f"(optim.batch_size {oc.batch_size})")
        self.total_steps = oc.max_steps or max(1, int(math.ceil(oc.epochs * self.steps_per_epoch)))

        # heads: own RNG so the policy's stream is untouched (λ=0 is bit-identical to no SPO)
        self.heads = None
        if spo.enabled:
            from spo.training.heads import DegreeClassifier

            hidden = int(model.config.hidden_size)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + HEADS_SEED_OFFSET)
                self.heads = DegreeClassifier(hidden, n_levels, spo)
        self.module = SPOModule(model, self.heads if self.degree_active else None).to(acc.device)
        if self.heads is not None:
            self.heads.to(acc.device)

        self.collator = PairCollator(
            tokenizer.pad_token_id, self.degree_mode, spo.levels_per_step, seed,
        )
        self.state = TrainerState(n_levels)
        self.state.config_hash = self._config_hash(reference_fingerprint or weights_fingerprint(model))

        # reference
        self.reference = self._setup_reference(reference_cache, reference_fingerprint)

        params = [p for p in self.module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": oc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=oc.learning_rate,
        )
        warmup, total = oc.warmup_steps, self.total_steps

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        # the scheduler is not prepared: AcceleratedScheduler steps once per process per step
        self.model, self.optimizer = acc.prepare(self.module, optimizer)
        acc.register_for_checkpointing(self.scheduler, self.state)
        self.params = params
        self.writer = MetricsWriter(self.out_dir, acc.is_main_process)
        set_seed(seed)

    # ---------------------------------------------------------------- construction helpers

    @classmethod
    def from_rows(cls, model: nn.Module, tokenizer: Any, cfg: TrainConfig, rows: Sequence[dict],
                  degrees: Sequence[dict] | None = None, eval_rows: Sequence[dict] | None = None,
                  eval_degrees: Sequence[dict] | None = None, **kwargs: Any) -> PreferenceTrainer:
        """Tokenise rows ({"prompt","chosen","rejected"[,"id","source"]}) and build the trainer.

        Rows without ``source`` are taken as HH dialogues when the prompt has "Human:" turns,
        else as a single user message (tldr layout).
        """
        mode = cfg.spo.mode if cfg.spo.enabled and (cfg.spo.lambda_w > 0 or cfg.spo.lambda_l > 0) else None

        def fill(rs: Sequence[dict]) -> list[dict]:
            out = []
            for i, r in enumerate(rs):
                r = dict(r)
                r.setdefault("id", str(i))
                r.setdefault("source", "hh" if "Human:" in r["prompt"] else "tldr")
                out.append(r)
            return out

        common = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, degree_mode=mode,
                      with_kl=cfg.loss == "kto")
        train, _ = tokenize_pairs(fill(rows), degrees, tokenizer, where="train rows", **common)
        evals = None
        if eval_rows:
            evals, _ = tokenize_pairs(fill(eval_rows)[: cfg.eval_rows], eval_degrees, tokenizer, where="eval rows", **common)
        return cls(model, tokenizer, cfg, train, evals, **kwargs)

    def _config_hash(self, weights: str) -> str:
        """What a checkpoint must share with this run to be resumed: the training config, the
        seed, the starting weights and every token of the training data, degree variants
        included (a rerun after `keywords` or `sft` changed must not resume the old run)."""
        skip = {"resume", "logging_steps", "eval_steps", "save_steps", "keep_checkpoints", "keep_checkpoints_at_end",
                "out_dir", "metrics_file"}
        dumped = {k: v for k, v in self.cfg.model_dump(mode="json").items() if k not in skip}
        payload = json.dumps({
            "cfg": dumped, "seed": self.seed, "weights": weights, "dtype": str(next(self.module.lm.parameters()).dtype),
            "ids": [e.id for e in self.train_examples],
            "data": examples_fingerprint({"train": self.train_examples}, with_degrees=True),
        }, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def _setup_reference(self, cache: str | Path | None, fingerprint: str | None) -> Reference:
        acc = self.accelerator
        lm = self.module.lm
        if not self.cfg.precompute_reference:
            return Reference.build(lm, self.is_peft)
        splits = {"train": self.train_examples}
        if self.eval_examples:
            splits["eval"] = self.eval_examples
        fingerprint = fingerprint or weights_fingerprint(lm)
        dtype = str(next(lm.parameters()).dtype)
        key = cache_key(splits, fingerprint, dtype, self.is_kto)
        explicit = self.cfg.reference_logps_file is not None
        if explicit:
            path = Path(self.cfg.reference_logps_file)  # type: ignore[arg-type]
        else:
            base = Path(cache) if cache is not None else (self.out_dir / "reference_logps" if self.out_dir else None)
            path = (base / f"{key}.pt") if base is not None and base.suffix != ".pt" else base
        table = load_table(path, key, splits, explicit) if path is not None else None
        self.reference_reused = table is not None
        if table is not None:
            log.info("reference log-probs: reusing %s (%d train pairs)", path, len(self.train_examples))
        else:
            if acc.is_main_process or path is None:
                started = time.perf_counter()
                table = precompute(lm, self.is_peft, splits, self.collator, self.cfg.optim.micro_batch_size,
                                   acc.device, self.is_kto, self.progress and acc.is_local_main_process)
                if path is not None:
                    save_table(path, key, table)
                log.info("reference log-probs: computed for %s pairs in %.1f s, saved to %s",
                         " + ".join(f"{len(v)} {k}" for k, v in splits.items()), time.perf_counter() - started, path)
            acc.wait_for_everyone()
            if table is None:
                table = load_table(path, key, splits, True)  # type: ignore[arg-type]
        self.reference_path = path
        return Reference("precomputed", table=table)

    # ---------------------------------------------------------------- the loss

    def _forward_loss(self, batch: Batch, split: str, train: bool, acc_metrics: Accumulator | None) -> StepOutput:
        from spo.training.losses import degree_loss, dpo_loss, ipo_loss, kto_loss

        cfg = self.cfg
        b = batch.n_pairs
        model = self.model if train else self.module
        out = model(batch.input_ids, batch.attention_mask, batch.labels, 2 * b,
                    batch.deg_row, batch.deg_mask, batch.deg_pos, batch.deg_side, self.sides)
        logps = out["logps"]
        pc, pr = logps[:b], logps[b:2 * b]
        ref = self.reference.logps(split, batch.indices, lambda: (batch.input_ids[: 2 * b], batch.attention_mask[: 2 * b],
                                                                  batch.labels[: 2 * b]), lm=self.module.lm).to(logps.device)
        rc, rr = ref[:b].to(logps.dtype), ref[b:].to(logps.dtype)
        parts: dict[str, float] = {}
        if cfg.loss == "dpo":
            losses, cr, rj = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing)
        elif cfg.loss == "ipo":
            losses, cr, rj = ipo_loss(pc, pr, rc, rr, cfg.beta)
        else:
            with torch.no_grad():
                pkl = self.module.lm(input_ids=batch.kl_input_ids, attention_mask=batch.kl_attention_mask,
                                     use_cache=False).logits
                pkl = sequence_logps(pkl, batch.kl_labels)
            rkl = self.reference.logps(split, batch.indices, lambda: (batch.kl_input_ids, batch.kl_attention_mask,
                                                                      batch.kl_labels), key="kl", lm=self.module.lm)
            kl = (pkl - rkl.to(pkl.device)).mean().detach()
            if train and self.accelerator.num_processes > 1:
                kl = self.accelerator.reduce(kl, reduction="mean")
            losses, cr, rj, z0 = kto_loss(pc, pr, pkl, rc, rr, rkl, cfg.beta, cfg.desirable_weight,
                                          cfg.undesirable_weight, kl=kl)
            parts["kl"] = float(z0)
        loss_align = losses.mean()
        loss = loss_align
        spo = cfg.spo
        for s, (side, lam) in enumerate(zip(SIDES, (spo.lambda_w, spo.lambda_l))):
            if not self.sides[s]:
                continue
            logits = out[f"degree_{side}"]
            sel = batch.deg_side == s
            labels = batch.deg_label[sel] if sel.any() else torch.full((1,), -100, device=logits.device)
            dl = degree_loss(logits, labels)
            loss = loss + lam * dl
            parts[f"loss_degree_{'wl'[s]}"] = float(dl.detach())
            if acc_metrics is not None and sel.any():
                acc_metrics.add_confusion(s, labels.detach(), logits.detach().argmax(-1))
        parts["loss_align"] = float(loss_align.detach())
        parts["loss"] = float(loss.detach())
        if acc_metrics is not None:
            for name, value in parts.items():
                acc_metrics.add(name, value)
            acc_metrics.add("micro_batches", 1)
            acc_metrics.add("pairs", b)
            acc_metrics.add("reward_chosen", cr.float().sum())
            acc_metrics.add("reward_rejected", rj.float().sum())
            acc_metrics.add("reward_margin", (cr - rj).float().sum())
            acc_metrics.add("reward_accuracy", (cr > rj).float().sum())
            acc_metrics.add("excluded_w", batch.excluded[0])
            acc_metrics.add("excluded_l", batch.excluded[1])
            acc_metrics.add("tokens", batch.n_tokens)
        parts.update({"chosen_logps": pc.detach().cpu(), "rejected_logps": pr.detach().cpu(),  # type: ignore[dict-item]
                      "reference_chosen_logps": rc.detach().cpu(), "reference_rejected_logps": rr.detach().cpu()})
        return StepOutput(loss, parts)

    def batch_loss(self, indices: Sequence[int] | None = None, split: str = "train", train_mode: bool = False) -> dict[str, Any]:
        """Loss parts on the given pairs (default: the first global batch of epoch 0), without grad.

        ``train_mode=False`` runs in eval mode (no dropout): the number a parity test compares.
        Returns floats (loss, loss_align, loss_degree_w/l, kl) and per-pair log-prob tensors.
        """
        examples = self.train_examples if split == "train" else self.eval_examples
        if indices is None:
            indices = epoch_batches([e.length for e in examples], self.cfg.optim.batch_size, self.cfg.optim.micro_batch_size,
                                    self.seed, 0, self.cfg.group_by_length)[0]
        indices = list(indices)
        was = self.module.training
        self.module.train(train_mode)
        try:
            with torch.no_grad():
                batch = self.collator([examples[i] for i in indices], indices, step=0, with_kl=self.is_kto).to(self.accelerator.device)
                return self._forward_loss(batch, split, False, None).parts
        finally:
            self.module.train(was)

    # ---------------------------------------------------------------- checkpoints

    def _checkpoint_dir(self) -> Path | None:
        return self.out_dir / CHECKPOINTS if self.out_dir is not None else None

    def _checkpoints(self) -> list[Path]:
        root = self._checkpoint_dir()
        if root is None or not root.is_dir():
            return []
        found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))

    def save_checkpoint(self) -> Path | None:
        root = self._checkpoint_dir()
        if root is None:
            return None
        acc = self.accelerator
        target = root / f"step-{self.state.step}"
        acc.save_state(str(target))
        if acc.is_main_process:
            write_json(target / STATE_FILE, {"step": self.state.step, "config_hash": self.state.config_hash})
            for old in self._checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return target

    def _maybe_resume(self) -> int:
        checkpoints = self._checkpoints()
        if not self.cfg.resume or not checkpoints:
            if self.accelerator.is_main_process and self.out_dir is not None:
                shutil.rmtree(self.out_dir / CHECKPOINTS, ignore_errors=True)
                (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
                shutil.rmtree(self.out_dir / "tensorboard", ignore_errors=True)
            self.accelerator.wait_for_everyone()
            return 0
        last = checkpoints[-1]
        saved = json.loads((last / STATE_FILE).read_text())
        if saved.get("config_hash") != self.state.config_hash:
            log.warning("%s was written with another config or data (hash %s, now %s): starting afresh",
                        last, saved.get("config_hash"), self.state.config_hash)
            self.cfg.resume = False
            try:
                return self._maybe_resume()
            finally:
                self.cfg.resume = True
        self.accelerator.load_state(str(last))
        self.writer.truncate_after(self.state.step)
        log.info("resuming from %s (step %d of %d)", last, self.state.step, self.total_steps)
        return self.state.step

    # ---------------------------------------------------------------- eval

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Eval metrics over the eval pairs (all levels, no grad, eval mode), reduced across processes."""
        acc = self.accelerator
        metrics = Accumulator(self.n_levels)
        if not self.eval_examples:
            return {}
        mb = self.cfg.optim.micro_batch_size
        chunks = [list(range(i, min(i + mb, len(self.eval_examples)))) for i in range(0, len(self.eval_examples), mb)]
        was = self.module.training
        self.module.eval()
        try:
            for idx in chunks[acc.process_index:: acc.num_processes]:
                batch = self.collator([self.eval_examples[i] for i in idx], idx, step=0, all_levels=True,
                                      with_kl=self.is_kto).to(acc.device)
                self._forward_loss(batch, "eval", False, metrics)
        finally:
            self.module.train(was)
        values, confusion = metrics.summarise(acc, self.sides)
        self.last_eval_confusion = confusion
        return values

    # ---------------------------------------------------------------- the loop

    def _log(self, values: dict[str, float], split: str) -> None:
        if self.accelerator.is_main_process:
            self.writer.write(self.state.step, split, values)

    def train(self, stop_after: int | None = None) -> dict[str, Any]:
        """Run to ``total_steps`` (resuming from the last checkpoint when ``cfg.resume``).

        ``stop_after``: return after this many optimizer steps (absolute step count) without the
        final save — what a killed run leaves behind (tests and timing).
        """
        from tqdm import tqdm

        acc = self.accelerator
        cfg, oc = self.cfg, self.cfg.optim
        # a later call (after stop_after) continues in memory; only the first looks at checkpoints
        start = self.state.step if getattr(self, "_started", False) else self._maybe_resume()
        self._started = True
        end = min(self.total_steps, stop_after) if stop_after is not None else self.total_steps
        self.module.train()
        lengths = [e.length for e in self.train_examples]
        cache: dict[int, list[list[int]]] = {}
        bar = tqdm(total=end, initial=start, desc=f"train {cfg.loss}", unit="step",
                   disable=not (self.progress and acc.is_local_main_process))
        window_started = time.perf_counter()
        started = time.perf_counter()
        mb = oc.micro_batch_size
        while self.state.step < end:
            step = self.state.step
            epoch, pos = divmod(step, self.steps_per_epoch)
            if epoch not in cache:
                cache.clear()
                cache[epoch] = epoch_batches(lengths, oc.batch_size, mb, self.seed, epoch, cfg.group_by_length)
            global_batch = cache[epoch][pos]
            micro = [global_batch[i: i + mb] for i in range(0, len(global_batch), mb)]
            mine = micro[acc.process_index * self.accum: (acc.process_index + 1) * self.accum]
            nonfinite = 0.0
            parts_seen: dict[str, float] = {}
            for j, idx in enumerate(mine):
                batch = self.collator([self.train_examples[i] for i in idx], idx, step=step,
                                      with_kl=self.is_kto).to(acc.device)
                sync = j == len(mine) - 1
                with nullcontext() if sync else acc.no_sync(self.model):
                    out = self._forward_loss(batch, "train", True, self.state.window)
                    if not torch.isfinite(out.loss.detach()):
                        nonfinite = 1.0
                        parts_seen = {k: v for k, v in out.parts.items() if isinstance(v, float)}
                    acc.backward(out.loss / self.accum)
            flag = torch.tensor(nonfinite, device=acc.device)
            if acc.num_processes > 1:
                flag = acc.reduce(flag, reduction="sum")
            grad_norm = acc.clip_grad_norm_(self.params, oc.max_grad_norm)
            grad_norm = float(grad_norm) if grad_norm is not None else 0.0
            if float(flag) > 0 or not math.isfinite(grad_norm):
                what = f"loss parts {parts_seen}" if parts_seen else f"gradient norm {grad_norm}"
                if cfg.nan_policy == "raise":
                    bar.close()
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
            bar.update(1)

            s = self.state.step
            if s % cfg.logging_steps == 0 or s == self.total_steps:
                values, _ = self.state.window.summarise(acc, self.sides)
                elapsed = time.perf_counter() - window_started
                values["tokens_per_s"] = values["tokens"] / elapsed if elapsed > 0 else 0.0
                values["peak_memory_mb"] = self._peak_memory()
                values["lr"] = self.scheduler.get_last_lr()[0]
                values["epoch"] = s / self.steps_per_epoch
                values["skipped_steps"] = float(self.state.skipped_steps)
                self.state.tokens_total += values["tokens"]
                self._log(values, "train")
                bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['rewards/accuracy']:.2f}")
                self.state.window.reset()
                window_started = time.perf_counter()
            if self.eval_examples and s % cfg.eval_steps == 0 and s < self.total_steps:
                self._log(self.evaluate(), "eval")
            if s % cfg.save_steps == 0 and s < self.total_steps:
                self.save_checkpoint()
        bar.close()
        seconds = time.perf_counter() - started
        summary: dict[str, Any] = {
            "steps": self.state.step, "start_step": start, "total_steps": self.total_steps,
            "train_seconds": round(seconds, 3), "skipped_steps": self.state.skipped_steps,
            "reference": self.reference.kind, "reference_forwards": self.reference.forwards,
            "reference_reused": getattr(self, "reference_reused", False),
            "accumulation_steps": self.accum, "num_processes": acc.num_processes,
        }
        if self.state.step < self.total_steps:  # stopped early (simulated kill / timing)
            return summary
        final_eval = self.evaluate() if self.eval_examples else {}
        if final_eval:
            self._log(final_eval, "eval")
        summary["eval"] = final_eval
        summary.update(self._final_save(final_eval))
        self.writer.close()
        return summary

    def _peak_memory(self) -> float:
        value = torch.tensor(peak_memory_mb(self.accelerator.device), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            value = self.accelerator.reduce(value, reduction="sum") / self.accelerator.num_processes
        return float(value)

    def _final_save(self, final_eval: dict[str, float]) -> dict[str, Any]:
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.out_dir is None or not acc.is_main_process:
            return {}
        from spo.models.loading import save_model

        lm = acc.unwrap_model(self.model).lm
        save_model(lm, self.tokenizer, self.out_dir)
        out: dict[str, Any] = {"out_dir": str(self.out_dir)}
        if self.heads is not None:
            from spo.training.heads import save_classifier

            save_classifier(self.heads, self.out_dir)
        if self.degree_active and final_eval and hasattr(self, "last_eval_confusion"):
            save_confusion(self.last_eval_confusion, self.sides, self.out_dir)
            out["confusion"] = str(self.out_dir / "degree_confusion.png")
        if not self.cfg.keep_checkpoints_at_end:  # only a crash needs them; the final model is saved
            shutil.rmtree(self.out_dir / CHECKPOINTS, ignore_errors=True)
        return out

    def unwrapped_lm(self) -> nn.Module:
        return self.module.lm
