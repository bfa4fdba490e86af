"""The preference trainer: DPO / IPO / KTO, each with or without the SPO degree loss.

A plain Accelerate loop (docs/training.md says why not ``transformers.Trainer``). Per optimizer
step, every process runs ``accumulation_steps`` micro-batches of ``optim.micro_batch_size``
pairs; ``optim.batch_size`` pairs are consumed per step over all processes. Each micro-batch is
ONE packed forward of ``[prompt | chosen | rejected | degree variants]`` rows through
:class:`~spo.training.forward.SPOModule` (the module DDP/FSDP wraps, so the degree heads and
the LM synchronise in the same backward). As in the DPO reference implementation, the step is
three pieces: the concatenated forward, the losses (``spo.training.losses``) and the metrics.

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
from spo.io import InputError, disk_full, output_error, write_json
from spo.training.data import SIDES, PackedBatch, PairCollator, PairExample, epoch_batches, kl_partners, tokenize_pairs
from spo.training.forward import SPOModule
from spo.training.metrics import Accumulator, MetricsWriter, peak_memory_mb, save_confusion, save_responses
from spo.training.optim import build_optimizer, build_scheduler
from spo.training.reference import (
    KlPlan,
    Reference,
    cache_key,
    even_shards,
    examples_fingerprint,
    load_table,
    precompute,
    save_table,
    weights_fingerprint,
)

log = logging.getLogger("spo.train")

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
HEADS_SEED_OFFSET = 7919


class NonFiniteLossError(StageFailed):
    """A non-finite loss or gradient with ``nan_policy: raise``."""


class CheckpointError(StageFailed):
    """``train.resume`` found checkpoints but none is usable; the message names each damaged file."""


def _file_problem(path: Path) -> str | None:
    """A cheap completeness check of one checkpoint file (reads headers and tails, not the tensors):
    a safetensors header must parse and cover the whole file; a torch.save zip archive must have
    its central directory (a truncated copy has lost it)."""
    import zipfile

    if path.suffix not in (".safetensors", ".bin", ".pkl", ".pt"):
        return None
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if path.suffix == ".safetensors":
            if len(head) < 8:
                return f"truncated ({size} bytes)"
            length = int.from_bytes(head, "little")
            if length <= 0 or 8 + length > size:
                return f"truncated or not a safetensors file (a header of {length} bytes in a file of {size})"
            try:
                header = json.loads(handle.read(length))
            except ValueError:
                return "its safetensors header is not valid JSON (garbled)"
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
            if ends and 8 + length + max(ends) != size:
                return f"truncated: its header describes {8 + length + max(ends)} bytes, the file has {size}"
            return None
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            return f"truncated or garbled ({size} bytes, no intact zip directory)"
    elif size == 0:
        return "empty"
    return None


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere in ``model`` (TRL's ``disable_dropout_in_model``), attention dropout included."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _fsdp_on_cpu() -> None:
    """Let Accelerate run FSDP over gloo on a CPU (tests of sharded training without GPUs).

    Accelerate 1.15 promotes only GPU-like states to FSDP: with ``cpu=True`` it would silently
    wrap the model in DDP instead (accelerate/state.py). The process group is made for the CPU,
    then the state is marked multi-GPU so that the FSDP plugin of the launch config applies.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    PartialState(cpu=True)
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def check_precision(cfg: TrainConfig, device_type: str) -> None:
    """Refuse precision settings the device cannot run, before any expensive work."""
    if cfg.mixed_precision == "fp16" and device_type != "cuda":
        raise InputError(f"train.mixed_precision fp16 needs a GPU (loss scaling runs on CUDA); this run is on {device_type}: "
                         "use bf16 or no")
    if cfg.mixed_precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("train.mixed_precision bf16: this GPU has no bfloat16 support (pre-Ampere); use fp16")


def warn_half_weights(model_dtype: torch.dtype) -> None:
    """Half-precision weights mean no float32 master copy: say what that costs."""
    if model_dtype in (torch.bfloat16, torch.float16):
        log.warning(
            "model.dtype is %s: the weights and AdamW's state are trained in %s (no float32 master copy). At DPO "
            "learning rates most updates are below its resolution and are lost; prefer model.dtype float32 with "
            "train.mixed_precision bf16", model_dtype, model_dtype,
        )


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
    parts: dict[str, Any]


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
        from accelerate.utils import set_seed

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
        if n_levels is None:
            n_levels = next((sd.n_levels for ex in self.train_examples for sd in ex.degrees.values()), 4)
        self.n_levels = n_levels
        self._check_inputs(model)
        check_precision(cfg, accelerator.device.type if accelerator is not None else
                        ("cuda" if torch.cuda.is_available() else "cpu"))
        warn_half_weights(next(model.parameters()).dtype)

        self.accelerator = accelerator or self._accelerator()
        acc = self.accelerator
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

        if cfg.disable_dropout:
            disable_dropout(model)
        if cfg.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # heads: own RNG so the policy's stream is untouched (λ=0 is bit-identical to no SPO)
        self.heads = None
        if spo.enabled:
            from spo.training.heads import DegreeClassifier

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + HEADS_SEED_OFFSET)
                self.heads = DegreeClassifier(int(model.config.hidden_size), n_levels, spo)
        self.module = SPOModule(model, self.heads if self.degree_active else None, cfg.logits_chunk).to(acc.device)
        if self.heads is not None:
            self.heads.to(acc.device)
        reference_copy = None
        if not self.is_peft and not cfg.precompute_reference:  # before prepare: FSDP replaces the parameters
            frozen = copy.deepcopy(model).eval().requires_grad_(False)
            reference_copy = SPOModule(frozen, None, cfg.logits_chunk).to(acc.device)

        from spo.training.losses import level_weights

        # (m-1)/(N-1) on level 0 when m < N levels are sampled per step: else the head can learn the prior alone
        self.level_weights = level_weights(n_levels, spo.levels_per_step) if spo.balance_levels else None
        self.collator = PairCollator(tokenizer.pad_token_id, self.degree_mode, spo.levels_per_step, seed,
                                     separate_variants=spo.variant_passes == "separate")
        self.state = TrainerState(n_levels)
        # before prepare: a sharded model's parameters are DTensors, which cannot be hashed as bytes
        weights = reference_fingerprint or weights_fingerprint(model)
        self.state.config_hash = self._config_hash(weights)

        optimizer = build_optimizer(self.module.parameters(), oc, head_params=self.heads.parameters() if self.heads else (),
                                    head_learning_rate=spo.head_learning_rate)
        self.scheduler = build_scheduler(optimizer, oc, self.total_steps)
        # the scheduler is not prepared: AcceleratedScheduler steps once per process per step
        # model and optimizer in ONE call: FSDP2 shards the parameters and rebinds the optimizer to them
        self.model, self.optimizer = acc.prepare(self.module, optimizer)
        self.reference = self._setup_reference(reference_copy, reference_cache, weights)
        acc.register_for_checkpointing(self.scheduler, self.state)
        self.writer = MetricsWriter(self.out_dir, acc.is_main_process)
        set_seed(seed)

    # ---------------------------------------------------------------- construction helpers

    def _check_inputs(self, model: nn.Module) -> None:
        """What must hold before any expensive work (each error names the option to change)."""
        cfg = self.cfg
        if self.degree_active and not any(ex.degrees for ex in self.train_examples):
            raise InputError("the degree loss is on but the training pairs carry no degree variants "
                             "(tokenise them with degree_mode, or set train.spo.enabled=false)")
        m = cfg.spo.levels_per_step
        if self.degree_active and m is not None and m > self.n_levels:
            raise InputError(f"train.spo.levels_per_step {m} is above the degree dataset's n_levels {self.n_levels}")
        if self.is_kto and cfg.optim.batch_size < 2:
            raise InputError("KTO estimates its KL reference point from mismatched pairs of a batch: "
                             "train.optim.batch_size must be at least 2")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if trainable == 0:
            raise InputError(
                "the model has no trainable parameter (requires_grad is off everywhere): training would only move the "
                "degree heads. A LoRA model merged into its base is frozen: load it with trainable=True, or set "
                "train.lora.enabled=true"
            )

    def _accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        spo = self.cfg.spo
        find_unused = self.degree_active and spo.heads == "two" and not all(self.sides)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # several processes on a machine without GPU: Accelerate only goes multi-process (gloo) with cpu=True
        cpu = world > 1 and not torch.cuda.is_available()
        if cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            _fsdp_on_cpu()
        acc = Accelerator(
            cpu=cpu,
            mixed_precision=None if self.cfg.mixed_precision == "no" else self.cfg.mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
        )
        if world != acc.num_processes:
            raise StageFailed(f"WORLD_SIZE is {world} but Accelerate runs {acc.num_processes} process(es): launch "
                              "with `accelerate launch --config_file configs/accelerate/<ddp|fsdp>.yaml` or torchrun")
        self._check_sharding(acc)
        return acc

    def _check_sharding(self, acc: Any) -> None:
        """What FSDP cannot honour, refused before any model work (each names the option)."""
        from accelerate.utils import DistributedType

        if acc.distributed_type != DistributedType.FSDP:
            return
        version = getattr(acc.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise InputError(
                f"fsdp_version {version}: the trainer supports FSDP version 2 (configs/accelerate/fsdp.yaml). "
                "Version 1 flattens each unit into one parameter (LoRA's frozen and trainable tensors cannot share "
                "one unless fsdp_use_orig_params), and peft then saves an empty adapter"
            )
        if not self.is_peft and not self.cfg.precompute_reference:
            raise InputError(
                "FSDP with full fine-tuning needs train.precompute_reference: true (the reference log-probs are "
                "computed once, sharded, and no reference model is kept) or LoRA (train.lora.enabled: the reference "
                "is the sharded policy with its adapters off); a second, unsharded frozen copy is not supported"
            )

    @property
    def _sharded(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

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

        common = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, degree_mode=mode)
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

    # ---------------------------------------------------------------- batches

    def _examples(self, split: str) -> list[PairExample]:
        return self.train_examples if split == "train" else self.eval_examples

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        lengths = [e.alignment_length for e in self.train_examples]
        return epoch_batches(lengths, self.cfg.optim.batch_size, self.seed, epoch, self.cfg.group_by_length)

    def pair_order(self) -> list[list[str]]:
        """The pair ids of every optimizer step's global batch, in order: the run's data plan.

        It depends on the rows, the seed, the batch size and the alignment lengths only, never on
        the loss options, so the policies of a comparison share it; its hash is in the summary
        (``pair_order_sha256``) for anyone to check that they did.
        """
        order: list[list[str]] = []
        for step in range(self.total_steps):
            epoch, pos = divmod(step, self.steps_per_epoch)
            if pos == 0:
                batches = self._epoch_batches(epoch)
            order.append([self.train_examples[i].id for i in batches[pos]])
        return order

    def _alignment_batch(self, indices: Sequence[int], split: str) -> PackedBatch:
        examples = self._examples(split)
        return self.collator([examples[i] for i in indices], list(indices), degrees=False).to(self.accelerator.device)

    def _kl_batch(self, indices: Sequence[int], partners: dict[int, int], split: str) -> PackedBatch:
        examples = self._examples(split)
        return self.collator.kl([examples[i] for i in indices], [examples[partners[i]] for i in indices], list(indices),
                                self.cfg.max_length).to(self.accelerator.device)

    def _kl_plan(self) -> KlPlan:
        """Every KTO mismatched row of the run: per epoch, each pair with the next pair of its global
        batch; eval: each eval pair with the next eval pair (the whole eval set is z0's batch)."""
        epochs = -(-self.total_steps // self.steps_per_epoch)
        plan: KlPlan = {"train": {}}
        for epoch in range(epochs):
            partners: dict[int, int] = {}
            for batch in self._epoch_batches(epoch):
                partners.update(kl_partners(batch))
            plan["train"][epoch] = partners
        if self.eval_examples:
            plan["eval"] = {0: kl_partners(list(range(len(self.eval_examples))))}
        return plan

    # ---------------------------------------------------------------- reference

    def _setup_reference(self, reference_copy: nn.Module | None, cache: str | Path | None, fingerprint: str) -> Reference:
        if not self.cfg.precompute_reference:
            if reference_copy is not None:  # not prepared by Accelerate: the policy's autocast made explicit
                return Reference("copy", model=reference_copy, autocast=self.accelerator.autocast)
            return Reference("adapter", model=self.model)
        acc = self.accelerator
        lm = self.module.lm
        splits = {"train": self.train_examples}
        if self.eval_examples:
            splits["eval"] = self.eval_examples
        plan = self._kl_plan() if self.is_kto else None
        key = cache_key(splits, fingerprint, str(next(lm.parameters()).dtype), plan)
        explicit = self.cfg.reference_logps_file is not None
        if explicit:
            path: Path | None = Path(self.cfg.reference_logps_file)  # type: ignore[arg-type]
        else:
            base = Path(cache) if cache is not None else (self.out_dir / "reference_logps" if self.out_dir else None)
            path = (base / f"{key}.pt") if base is not None and base.suffix != ".pt" else base
        table = load_table(path, key, splits, explicit) if path is not None else None
        self.reference_reused = table is not None
        if table is not None:
            log.info("reference log-probs: reusing %s (%d train pairs)", path, len(self.train_examples))
        else:
            started = time.perf_counter()
            table = precompute(self.model, splits, plan, self._alignment_batch, self._kl_batch,
                               self.cfg.optim.micro_batch_size, acc, self.progress and acc.is_local_main_process)
            if path is not None and acc.is_main_process:
                save_table(path, key, table)
            acc.wait_for_everyone()
            log.info("reference log-probs: computed for %s pairs on %d process(es) in %.1f s, saved to %s",
                     " + ".join(f"{len(v)} {k}" for k, v in splits.items()), acc.num_processes,
                     time.perf_counter() - started, path)
        self.reference_path = path
        return Reference("precomputed", table=table)

    # ---------------------------------------------------------------- the step: forward, losses, metrics

    def concatenated_forward(self, batch: PackedBatch) -> dict[str, Any]:
        """The policy on one packed batch: log-probs of the 2b alignment rows and the degree logits.

        Always through the prepared (DDP/FSDP) module: a sharded model's parameters exist only
        inside its own forward."""
        return self.model(batch, self.sides)

    @torch.no_grad()
    def kl_estimate(self, split: str, indices: Sequence[int], partners: dict[int, int], epoch: int) -> Tensor:
        """KTO's z0 before clamping: the mean over ``indices`` of all processes, and over both
        responses of each one's partner, of log π_θ(y'|x) − log π_ref(y'|x) on mismatched rows;
        every process must call it (all-reduce)."""
        mb = self.cfg.optim.micro_batch_size
        chunks = [list(indices[i: i + mb]) for i in range(0, len(indices), mb)]
        total = torch.zeros(2, device=self.accelerator.device, dtype=torch.float64)
        for idx in chunks:
            batch = self._kl_batch(idx, partners, split)
            policy = self.model(batch)["logps"]
            reference = self.reference.logps(split, batch, kl_epoch=epoch).to(policy.device)
            total[0] += (policy.double() - reference.double()).sum()
            total[1] += policy.numel()  # two rows per pair: its partner's chosen and rejected responses
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return (total[0] / total[1].clamp(min=1)).float()

    def alignment_losses(self, policy: Tensor, reference: Tensor, counts: Tensor, b: int,
                         z0: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Per-pair alignment losses and the detached rewards: (losses [b], chosen [b], rejected [b], z0)."""
        from spo.training.losses import dpo_loss, ipo_loss, kto_loss

        cfg = self.cfg
        pc, pr = policy[:b], policy[b:]
        rc, rr = reference[:b].to(policy.dtype), reference[b:].to(policy.dtype)
        if cfg.loss == "dpo":
            return (*dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing), None)
        if cfg.loss == "ipo":
            if cfg.ipo_length_normalize:  # per-token averages (TRL's ipo)
                n = counts.to(policy.dtype).clamp(min=1)
                pc, pr, rc, rr = pc / n[:b], pr / n[b:], rc / n[:b], rr / n[b:]
            return (*ipo_loss(pc, pr, rc, rr, cfg.beta), None)
        assert z0 is not None
        losses, cr, rj, z0 = kto_loss(pc, pr, None, rc, rr, None, cfg.beta, cfg.desirable_weight,  # type: ignore[arg-type]
                                      cfg.undesirable_weight, kl=z0)
        return (losses if cfg.kto_reduction == "pair" else losses / 2), cr, rj, z0

    def degree_losses(self, out: dict[str, Any], batch: PackedBatch, totals: Sequence[float] | None = None,
                      metrics: Accumulator | None = None) -> tuple[Tensor | float, dict[int, float]]:
        """λ_w·L_w + λ_l·L_l of the batch's samples and each side's L (detached); ``totals``: the
        samples' summed level weight per side over all of a micro-batch's passes (the mean's denominator)."""
        from spo.training.losses import degree_loss

        loss: Tensor | float = 0.0
        parts: dict[int, float] = {}
        for s, side in enumerate(SIDES):
            if not self.sides[s]:
                continue
            logits = out[f"degree_{side}"]
            sel = batch.deg_side == s
            labels = batch.deg_label[sel] if sel.any() else torch.full((1,), -100, device=logits.device)
            dl = degree_loss(logits, labels, None if totals is None else totals[s], self._weights(batch))
            loss = loss + (self.cfg.spo.lambda_w, self.cfg.spo.lambda_l)[s] * dl
            parts[s] = float(dl.detach())
            if metrics is not None and labels.ne(-100).any():
                predicted = logits.detach().argmax(-1)
                metrics.add_confusion(s, labels.detach(), predicted)
                metrics.add_responses(s, batch.deg_pair[sel], labels.detach(), predicted)
        return loss, parts

    def _variant_passes(self, examples: list[PairExample], indices: Sequence[int], step: int,
                        batch: PackedBatch) -> tuple[list[PackedBatch], list[float]]:
        """The micro-batch's variant passes (on the device) and its samples per side over all passes."""
        passes = [p.to(self.accelerator.device) for p in self.collator.variant_passes(examples, indices, step, batch.n_tokens)]
        return passes, [sum(self._sample_weight(p, s) for p in (batch, *passes)) for s in range(2)]

    def _weights(self, batch: PackedBatch) -> Tensor | None:
        """The level weights where the batch's levels were sampled; an all-levels (eval) batch is balanced already."""
        return self.level_weights if batch.levels_sampled else None

    def _sample_weight(self, batch: PackedBatch, side: int) -> float:
        """The summed level weight of a pass's degree samples of one side (their count when unweighted)."""
        labels = batch.deg_label[(batch.deg_side == side) & (batch.deg_label != -100)]
        weights = self._weights(batch)
        if weights is None:
            return float(labels.numel())
        return float(weights.to(labels.device)[labels].sum())

    def variant_pass(self, batch: PackedBatch, totals: Sequence[float], metrics: Accumulator | None) -> tuple[Tensor, dict[int, float]]:
        """The degree loss of one pass of variants (``variant_passes: separate``): no alignment rows."""
        loss, parts = self.degree_losses(self.concatenated_forward(batch), batch, totals, metrics)
        return loss, parts  # type: ignore[return-value]

    def _forward_loss(self, batch: PackedBatch, split: str, train: bool, metrics: Accumulator | None,
                      z0: Tensor | None = None, totals: Sequence[float] | None = None,
                      carried: dict[int, float] | None = None) -> StepOutput:
        """The alignment pass's loss; ``carried``: the degree losses the micro-batch's variant passes
        already back-propagated, added to the reported parts only."""
        b = batch.n_pairs
        out = self.concatenated_forward(batch)
        policy = out["logps"]
        reference = self.reference.logps(split, batch).to(policy.device)
        counts = batch.score_counts()
        losses, chosen_rewards, rejected_rewards, z0 = self.alignment_losses(policy, reference, counts, b, z0)
        loss_align = losses.mean()
        degree, degree_parts = self.degree_losses(out, batch, totals, metrics)
        loss = loss_align + degree
        parts: dict[str, Any] = {}
        lambdas = (self.cfg.spo.lambda_w, self.cfg.spo.lambda_l)
        reported = float(loss.detach())
        for s, value in degree_parts.items():
            value += (carried or {}).get(s, 0.0)
            reported += lambdas[s] * (carried or {}).get(s, 0.0)
            parts[f"loss_degree_{'wl'[s]}"] = value
        parts["loss_align"] = float(loss_align.detach())
        parts["loss"] = reported
        if z0 is not None:
            parts["kl"] = float(z0)
        if metrics is not None:
            self._record(metrics, parts, batch, out, chosen_rewards, rejected_rewards, counts)
        parts.update({"chosen_logps": policy[:b].detach().cpu(), "rejected_logps": policy[b:].detach().cpu(),
                      "reference_chosen_logps": reference[:b].detach().cpu(),
                      "reference_rejected_logps": reference[b:].detach().cpu()})
        return StepOutput(loss, parts)

    @staticmethod
    def _record(metrics: Accumulator, parts: dict[str, Any], batch: PackedBatch, out: dict[str, Any],
                chosen_rewards: Tensor, rejected_rewards: Tensor, counts: Tensor) -> None:
        b = batch.n_pairs
        for name, value in parts.items():
            metrics.add(name, value)
        logps, logits = out["logps"].detach().float(), out["logits_sum"].float()
        metrics.add("micro_batches", 1)
        metrics.add("pairs", b)
        metrics.add("reward_chosen", chosen_rewards.float().sum())
        metrics.add("reward_rejected", rejected_rewards.float().sum())
        metrics.add("reward_margin", (chosen_rewards - rejected_rewards).float().sum())
        metrics.add("reward_accuracy", (chosen_rewards > rejected_rewards).float().sum())
        metrics.add("logps_chosen", logps[:b].sum())
        metrics.add("logps_rejected", logps[b:].sum())
        metrics.add("logits_chosen", logits[:b].sum())
        metrics.add("logits_rejected", logits[b:].sum())
        metrics.add("tokens_chosen", counts[:b].sum())
        metrics.add("tokens_rejected", counts[b:].sum())
        metrics.add("excluded_w", batch.excluded[0])
        metrics.add("excluded_l", batch.excluded[1])
        metrics.add("tokens", batch.n_tokens)

    def batch_loss(self, indices: Sequence[int] | None = None, split: str = "train", train_mode: bool = False) -> dict[str, Any]:
        """Loss parts on the given pairs (default: the first global batch of epoch 0), without grad.

        ``train_mode=False`` runs in eval mode (no dropout): the number a parity test compares.
        Returns floats (loss, loss_align, loss_degree_w/l, kl) and per-pair log-prob tensors.
        KTO's z0 is estimated on the same pairs (each with the next one's response).
        """
        examples = self._examples(split)
        if indices is None:
            indices = self._epoch_batches(0)[0]
        indices = list(indices)
        was = self.model.training
        self.model.train(train_mode)
        try:
            with torch.no_grad():
                z0 = None
                if self.is_kto:  # a precomputed reference knows the run's own mismatched rows (epoch 0) only
                    precomputed = self.reference.kind == "precomputed"
                    partners = self._kl_plan()[split][0] if precomputed else kl_partners(indices)
                    if any(i not in partners for i in indices):
                        raise InputError(f"pairs {indices} have no precomputed KTO mismatched row in split {split!r}")
                    z0 = self.kl_estimate(split, indices, partners, 0)
                chosen = [examples[i] for i in indices]
                batch = self.collator(chosen, indices, step=0).to(self.accelerator.device)
                totals, carried = None, None
                if self.collator.separate_variants:
                    passes, totals = self._variant_passes(chosen, indices, 0, batch)
                    carried = {}
                    for vb in passes:
                        for s, value in self.variant_pass(vb, totals, None)[1].items():
                            carried[s] = carried.get(s, 0.0) + value
                return self._forward_loss(batch, split, False, None, z0, totals, carried).parts
        finally:
            self.model.train(was)

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
        """``checkpoints/step-N``: accelerate's state, then trainer_state.json, written last (a folder
        without it is an interrupted save and is never resumed). A failed save removes its folder;
        a full disk is an :class:`~spo.io.OutputError` naming the folder and ENOSPC."""
        root = self._checkpoint_dir()
        if root is None:
            return None
        acc = self.accelerator
        target = root / f"step-{self.state.step}"
        try:
            acc.save_state(str(target))
            if acc.is_main_process:
                write_json(target / STATE_FILE, {"step": self.state.step, "config_hash": self.state.config_hash})
        except Exception as err:
            code = disk_full(err, target)
            if acc.is_main_process:
                shutil.rmtree(target, ignore_errors=True)  # never half a checkpoint (nor its space) left behind
            if code is None:
                raise
            kept = [p.name for p in self._checkpoints()]
            raise output_error(target, code, "cannot write the checkpoint",
                               f" with train.resume=true (it resumes from {kept[-1]})" if kept else "") from None
        if acc.is_main_process:
            for old in self._checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return target

    # what a finished run leaves beside its checkpoints: the model (full weights or an adapter), the
    # degree heads, the confusion matrix, and the stage's summary and provenance
    FINAL_OUTPUTS = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                     "adapter_config.json", "degree_heads.json", "degree_confusion.*", "train_summary.json",
                     "provenance.json")

    def _clear_final_outputs(self) -> None:
        """A fresh start removes the previous run's final model first: the folder is kept between
        runs for its checkpoints (DVC ``persist``), and a run killed before its own final save must
        not leave the old weights for a hand-run ``spo generate`` to take as this run's."""
        for pattern in self.FINAL_OUTPUTS:
            for old in self.out_dir.glob(pattern):
                if old.is_file():
                    old.unlink()

    def _unusable(self, checkpoint: Path) -> str | None:
        """Why a checkpoint cannot be resumed (naming the file), or None: its trainer_state.json
        must parse and name its step, its model weights and optimizer state must be there, and a
        safetensors file must have a readable header covering the whole file (a truncated copy does not)."""
        state_file = checkpoint / STATE_FILE
        try:
            saved = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            return f"{state_file}: unreadable ({type(err).__name__}: {err})"
        if not isinstance(saved, dict) or not isinstance(saved.get("step"), int):
            return f"{state_file}: no step recorded"
        names = {p.name for p in checkpoint.iterdir()}
        # files, or folders of a sharded (FSDP) state: pytorch_model_fsdp_0/, optimizer_0/
        if not any(n.startswith(("model", "pytorch_model")) for n in names):
            return f"{checkpoint / 'model.safetensors'}: missing (no model weights in the checkpoint)"
        if not any(n.startswith("optimizer") for n in names):
            return f"{checkpoint / 'optimizer.bin'}: missing (no optimizer state in the checkpoint)"
        for name in sorted(names):
            if (checkpoint / name).is_file() and (problem := _file_problem(checkpoint / name)):
                return f"{checkpoint / name}: {problem}"
        return None

    def _maybe_resume(self) -> int:
        checkpoints = self._checkpoints()
        if not self.cfg.resume or not checkpoints:
            if self.accelerator.is_main_process and self.out_dir is not None:
                shutil.rmtree(self.out_dir / CHECKPOINTS, ignore_errors=True)
                (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
                shutil.rmtree(self.out_dir / "tensorboard", ignore_errors=True)
                self._clear_final_outputs()
            self.accelerator.wait_for_everyone()
            return 0
        problems: list[str] = []
        # newest first; a damaged one is passed over for the one before (the files are the same for every process)
        for last in reversed(checkpoints):
            problem = self._unusable(last)
            if problem is None:
                saved = json.loads((last / STATE_FILE).read_text())
                if saved.get("config_hash") != self.state.config_hash:
                    log.warning("%s was written with another config or data (hash %s, now %s): starting afresh",
                                last, saved.get("config_hash"), self.state.config_hash)
                    self.cfg.resume = False
                    try:
                        return self._maybe_resume()
                    finally:
                        self.cfg.resume = True
                try:
                    self.accelerator.load_state(str(last))
                except Exception as err:  # damage the checks above cannot see (torch.load's own words)
                    problem = f"{last}: cannot be loaded ({type(err).__name__}: {str(err).strip().splitlines()[0][:300]})"
            if problem is not None:
                problems.append(problem)
                log.warning("checkpoint %s is not usable, passing over it: %s", last.name, problem)
                continue
            if problems and self.accelerator.is_main_process:
                # set the damaged newer ones aside (kept for a look; removed by the next fresh start), so
                # that the pruning of old checkpoints never keeps them in place of the good ones
                for damaged in checkpoints[checkpoints.index(last) + 1:]:
                    aside = damaged.with_name(f"damaged-{damaged.name}")
                    shutil.rmtree(aside, ignore_errors=True)
                    damaged.rename(aside)
                    log.warning("moved %s aside to %s", damaged, aside.name)
            self.accelerator.wait_for_everyone()
            self.writer.truncate_after(self.state.step)
            log.info("resuming from %s (step %d of %d)", last, self.state.step, self.total_steps)
            return self.state.step
        raise CheckpointError(
            f"no usable checkpoint to resume in {self._checkpoint_dir()}: {'; '.join(problems)}; delete the folder or "
            "rerun with -S train.resume=false to start afresh"
        )

    # ---------------------------------------------------------------- eval

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Eval metrics over the eval pairs (all levels, no grad, eval mode), reduced across processes.

        Every process runs the same number of forwards (padding rounds are computed and not
        counted), as a sharded model's forward is a collective.
        """
        acc = self.accelerator
        metrics = Accumulator(self.n_levels, len(self.eval_examples))
        if not self.eval_examples:
            return {}
        n = len(self.eval_examples)
        mb = self.cfg.optim.micro_batch_size
        chunks = [list(range(i, min(i + mb, n))) for i in range(0, n, mb)]
        was = self.model.training
        self.model.eval()
        try:
            z0 = None
            if self.is_kto:
                mine = [i for c in even_shards(len(chunks), acc.process_index, acc.num_processes) if c is not None
                        for i in chunks[c]]
                z0 = self.kl_estimate("eval", mine, kl_partners(list(range(n))), 0)
            for c in even_shards(len(chunks), acc.process_index, acc.num_processes):
                idx = chunks[c if c is not None else 0]
                batch = self.collator([self.eval_examples[i] for i in idx], idx, step=0, all_levels=True).to(acc.device)
                self._forward_loss(batch, "eval", False, metrics if c is not None else None, z0)
        finally:
            self.model.train(was)
        values, confusion, responses = metrics.summarise(acc, self.sides)
        self.last_eval_confusion, self.last_eval_responses = confusion, responses
        return values

    # ---------------------------------------------------------------- the loop

    def _log(self, values: dict[str, float], split: str) -> None:
        if self.accelerator.is_main_process:
            self.writer.write(self.state.step, split, values)

    def _train_step(self, step: int, batches: list[list[int]]) -> float:
        """One optimizer step on this process's micro-batches of the step's global batch; the grad norm."""
        acc, cfg, oc = self.accelerator, self.cfg, self.cfg.optim
        epoch, pos = divmod(step, self.steps_per_epoch)
        global_batch = batches[pos]
        mb = oc.micro_batch_size
        micro = [global_batch[i: i + mb] for i in range(0, len(global_batch), mb)]
        mine = micro[acc.process_index * self.accum: (acc.process_index + 1) * self.accum]
        z0 = None
        if self.is_kto:
            z0 = self.kl_estimate("train", [i for idx in mine for i in idx], kl_partners(global_batch), epoch)
        nonfinite = 0.0
        parts_seen: dict[str, float] = {}
        for j, idx in enumerate(mine):
            examples = [self.train_examples[i] for i in idx]
            batch = self.collator(examples, idx, step=step).to(acc.device)
            totals, carried = None, None
            if self.collator.separate_variants:  # variants first, in passes no larger than the alignment pass
                passes, totals = self._variant_passes(examples, idx, step, batch)
                carried = {}
                for vb in passes:
                    with acc.no_sync(self.model):
                        loss, parts = self.variant_pass(vb, totals, self.state.window)
                        if not all(math.isfinite(v) for v in parts.values()):
                            nonfinite = 1.0
                        acc.backward(loss / self.accum)
                    for s, value in parts.items():
                        carried[s] = carried.get(s, 0.0) + value
            sync = j == len(mine) - 1
            # the alignment pass last: it uses every parameter, as DDP's synchronised backward needs
            with nullcontext() if sync else acc.no_sync(self.model):
                out = self._forward_loss(batch, "train", True, self.state.window, z0, totals, carried)
                if not torch.isfinite(out.loss.detach()) or nonfinite:
                    nonfinite = 1.0
                    parts_seen = {k: v for k, v in out.parts.items() if isinstance(v, float)}
                acc.backward(out.loss / self.accum)
        flag = torch.tensor(nonfinite, device=acc.device)
        if acc.num_processes > 1:
            flag = acc.reduce(flag, reduction="sum")
        # the prepared model's own parameters: FSDP computes the norm of its shards only for exactly those
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), oc.max_grad_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else 0.0
        if float(flag) > 0 or not math.isfinite(grad_norm):
            what = f"loss parts {parts_seen}" if parts_seen else f"gradient norm {grad_norm}"
            if cfg.nan_policy == "raise":
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

    def train(self, stop_after: int | None = None) -> dict[str, Any]:
        """Run to ``total_steps`` (resuming from the last checkpoint when ``cfg.resume``).

        ``stop_after``: return after this many optimizer steps (absolute step count) without the
        final save — what a killed run leaves behind (tests and timing).
        """
        from tqdm import tqdm

        acc, cfg = self.accelerator, self.cfg
        # a later call (after stop_after) continues in memory; only the first looks at checkpoints
        start = self.state.step if getattr(self, "_started", False) else self._maybe_resume()
        self._started = True
        end = min(self.total_steps, stop_after) if stop_after is not None else self.total_steps
        self.model.train()
        cache: dict[int, list[list[int]]] = {}
        bar = tqdm(total=end, initial=start, desc=f"train {cfg.loss}", unit="step",
                   disable=not (self.progress and acc.is_local_main_process))
        started = time.perf_counter()
        window_seconds, grad_norms = 0.0, []
        try:
            while self.state.step < end:
                epoch = self.state.step // self.steps_per_epoch
                if epoch not in cache:
                    cache = {epoch: self._epoch_batches(epoch)}
                step_started = time.perf_counter()
                grad_norms.append(self._train_step(self.state.step, cache[epoch]))
                window_seconds += time.perf_counter() - step_started  # train steps only: no eval, no checkpoint
                bar.update(1)
                s = self.state.step
                if s % cfg.logging_steps == 0 or s == self.total_steps:
                    values = self._window_values(window_seconds, grad_norms)
                    self._log(values, "train")
                    bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['rewards/accuracies']:.2f}")
                    window_seconds, grad_norms = 0.0, []
                if self.eval_examples and s % cfg.eval_steps == 0 and s < self.total_steps:
                    self._log(self.evaluate(), "eval")
                if s % cfg.save_steps == 0 and s < self.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
        seconds = time.perf_counter() - started
        summary: dict[str, Any] = {
            "steps": self.state.step, "start_step": start, "total_steps": self.total_steps,
            "train_seconds": round(seconds, 3), "skipped_steps": self.state.skipped_steps,
            "reference": self.reference.kind, "reference_forwards": self.reference.forwards,
            "reference_reused": getattr(self, "reference_reused", False),
            "accumulation_steps": self.accum, "num_processes": acc.num_processes,
            "tokens_total": self.state.tokens_total,
            "pair_order_sha256": hashlib.sha256(json.dumps(self.pair_order()).encode()).hexdigest(),
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

    def _window_values(self, seconds: float, grad_norms: list[float]) -> dict[str, float]:
        values, _, _ = self.state.window.summarise(self.accelerator, self.sides)
        values["tokens_per_s"] = values["tokens"] / seconds if seconds > 0 else 0.0
        values["peak_memory_mb"] = self._peak_memory()
        values["learning_rate"] = self.scheduler.get_last_lr()[0]
        values["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        values["epoch"] = self.state.step / self.steps_per_epoch
        values["skipped_steps"] = float(self.state.skipped_steps)
        self.state.tokens_total += values["tokens"]
        self.state.window.reset()
        return values

    def _peak_memory(self) -> float:
        value = torch.tensor(peak_memory_mb(self.accelerator.device), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            value = self.accelerator.reduce(value, reduction="sum") / self.accelerator.num_processes
        return float(value)

    def _final_save(self, final_eval: dict[str, float]) -> dict[str, Any]:
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.out_dir is None:
            return {}
        from spo.models.loading import save_model

        # under FSDP the full weights exist only once gathered (a collective: every process calls it)
        state = acc.get_state_dict(self.model) if self._sharded else None
        if not acc.is_main_process:
            return {}
        lm = acc.unwrap_model(self.model).lm
        lm_state = None
        if state is not None:  # gathered copies: a tied weight comes back twice, saved once (as save_pretrained would)
            tied = set(getattr(lm, "all_tied_weights_keys", {}) or {})
            lm_state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.") and k[len("lm."):] not in tied}
        save_model(lm, self.tokenizer, self.out_dir, state_dict=lm_state)
        out: dict[str, Any] = {"out_dir": str(self.out_dir)}
        if self.heads is not None:
            from spo.training.heads import DegreeClassifier, save_classifier

            heads = self.heads
            if state is not None and self.degree_active:  # sharded: rebuild from the gathered tensors
                heads = DegreeClassifier(**{**self.heads.init_kwargs(), "cfg": self.cfg.spo})
                heads.load_state_dict({k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")})
            save_classifier(heads, self.out_dir)
        if self.degree_active and final_eval and hasattr(self, "last_eval_confusion"):
            save_confusion(self.last_eval_confusion, self.sides, self.out_dir)
            save_responses(self.last_eval_responses, [e.id for e in self.eval_examples], self.sides, self.n_levels,
                           self.out_dir)
            out["confusion"] = str(self.out_dir / "degree_confusion.png")
        if not self.cfg.keep_checkpoints_at_end:  # only a crash needs them; the final model is saved
            shutil.rmtree(self.out_dir / CHECKPOINTS, ignore_errors=True)
        return out

    def unwrapped_lm(self) -> nn.Module:
        return self.module.lm
