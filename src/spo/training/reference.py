"""Reference-model log-probs: LoRA with adapters disabled, a frozen copy, or a precomputed table.

* LoRA: the reference is the policy module itself with its adapters disabled (no copy).
* Full fine-tuning: a frozen copy made once before training (eval mode, no grad; under FSDP it
  is sharded like the policy).
* ``precompute_reference``: log-probs of every train and eval pair — and, for KTO, of every
  mismatched (prompt, response) row the run will use — computed once before training, saved,
  and reused by later runs whose tokenised pairs and reference weights are the same (any other
  β, λ, loss or seed); no reference model is then kept in memory. The work is sharded across
  processes (each computes every world-th micro-batch of the alignment rows only — never the
  degree variants) and summed into one table that every process holds.

The cache key is the sha256 of the tokenised alignment inputs (prompt, chosen, rejected of
every pair, so every tokenisation setting is covered), the KTO partner plan, the reference
weights' fingerprint and the dtype.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from spo.config import TrainConfig
from spo.errors import InputError

if TYPE_CHECKING:
    from spo.training.plan import DataPlan, KlPlan

log = logging.getLogger("spo.train")

CACHE_VERSION = 3  # 3: KTO rows hold both responses of the partner



def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the reference weights (LoRA tensors excluded: disabled adapters are the base)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        digest.update(name.encode())
        t = tensor.detach().to("cpu").contiguous()
        digest.update(str(t.dtype).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _update_ints(digest: Any, values: Sequence[int]) -> None:
    digest.update(len(values).to_bytes(4, "little"))
    digest.update(b"".join(int(i).to_bytes(4, "little", signed=True) for i in values))


def examples_fingerprint(splits: Mapping[str, Sequence[Any]], with_degrees: bool = False) -> str:
    """sha256 over the token ids of tokenised pairs; ``with_degrees`` adds every degree variant
    (ids, positions, kept tokens) — what identifies a training run's data for resumption."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        digest.update(split.encode())
        for ex in splits[split]:
            for ids in (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids):
                _update_ints(digest, ids)
            if not with_degrees:
                continue
            for side in sorted(ex.degrees):
                degrees = ex.degrees[side]
                digest.update(f"{side}:{degrees.n_levels}:{degrees.distinct}".encode())
                for rows in (degrees.variant_ids, degrees.variant_pos, degrees.keep):
                    for row in rows:
                        _update_ints(digest, [int(v) for v in row])
    return digest.hexdigest()


def cache_key(splits: Mapping[str, Sequence[Any]], fingerprint: str, dtype: str, kl_plan: KlPlan | None) -> str:
    plan = hashlib.sha256(repr(sorted((s, sorted((e, sorted(p.items())) for e, p in by_epoch.items()))
                                      for s, by_epoch in (kl_plan or {}).items())).encode()).hexdigest()
    payload = f"v{CACHE_VERSION}|{examples_fingerprint(splits)}|{fingerprint}|{dtype}|kl={plan}"
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class Reference:
    """Reference log-probs of packed batches; ``model`` is called as ``model(batch, adapters=False)``.

    kinds: "adapter" (the policy module, adapters off), "copy" (a frozen copy), "precomputed".
    """

    def __init__(self, kind: str, model: nn.Module | None = None, table: dict[str, dict[str, Any]] | None = None,
                 autocast: Callable[[], AbstractContextManager[Any]] = nullcontext, reused: bool = False) -> None:
        """``autocast``: the policy's mixed-precision context.  The policy is prepared by Accelerate,
        which wraps its forward in autocast; a frozen copy is not, and must run under the same
        context, or its log-probs differ from the policy's own at step 0 (and from a table
        precomputed by the prepared policy) by the bf16 rounding of the whole forward.
        ``reused``: the table was read from an earlier run's cache (the summary reports it)."""
        self.kind = kind
        self.model = model
        self.table = table
        self.autocast = autocast
        self.reused = reused
        self.forwards = 0  # reference forward passes run during training/eval

    @torch.no_grad()
    def logps(self, split: str, batch: Any, kl_epoch: int | None = None) -> Tensor:
        """[chosen..., rejected...] of an alignment batch, or (``kl_epoch`` given) the KL rows' [b]."""
        if self.kind == "precomputed":
            assert self.table is not None
            idx = torch.as_tensor(batch.indices, dtype=torch.long)
            part = self.table[split]
            if kl_epoch is not None:  # [partners' chosen..., partners' rejected...], as the KL batch scores them
                return part["kl"][kl_epoch][:, idx].flatten()
            return torch.cat((part["chosen"][idx], part["rejected"][idx]))
        assert self.model is not None
        self.forwards += 1
        with self.autocast():
            return forward_logps(self.model, batch)


@torch.no_grad()
def forward_logps(model: nn.Module, batch: Any) -> Tensor:
    """The scored sequences' log-probs with adapters off, in eval mode (no dropout anywhere)."""
    was_training = model.training
    model.eval()
    try:
        return model(batch, adapters=False)["logps"]
    finally:
        model.train(was_training)


def even_shards(n_chunks: int, rank: int, world: int) -> list[int | None]:
    """Chunk indices of process ``rank``: every world-th chunk, padded with None so every process
    runs the same number of forwards (a sharded model's forward is a collective)."""
    mine: list[int | None] = list(range(rank, n_chunks, world))
    rounds = -(-n_chunks // world) if n_chunks else 0
    return mine + [None] * (rounds - len(mine))


@torch.no_grad()
def precompute(model: nn.Module, splits: Mapping[str, Sequence[Any]], kl_plan: KlPlan | None,
               alignment_batch: Callable[[Sequence[int], str], Any],
               kl_batch: Callable[[Sequence[int], dict[int, int], str], Any],
               micro_batch_size: int, accelerator: Any, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Reference log-probs of every pair (and KTO row of ``kl_plan``) of every split, sharded.

    ``alignment_batch(indices, split)`` / ``kl_batch(indices, partners, split)`` build the packed
    batches on the device. Each process computes its shard into zero tensors; one all-reduce
    (sum) gives every process the whole table (each entry is computed by exactly one process).
    """
    from tqdm import tqdm

    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    jobs: list[tuple[str, int | None, list[int]]] = []  # (split, kl epoch or None, indices)
    for split, examples in splits.items():
        n = len(examples)
        jobs += [(split, None, list(range(s, min(s + micro_batch_size, n)))) for s in range(0, n, micro_batch_size)]
        for kl_epoch, partners in sorted((kl_plan or {}).get(split, {}).items()):
            keys = sorted(partners)
            jobs += [(split, kl_epoch, keys[s: s + micro_batch_size]) for s in range(0, len(keys), micro_batch_size)]
    sums = {split: {"chosen": torch.zeros(len(ex), device=device), "rejected": torch.zeros(len(ex), device=device)}
            for split, ex in splits.items()}
    kl = {split: {epoch: torch.zeros(2, len(splits[split]), device=device) for epoch in by_epoch}
          for split, by_epoch in (kl_plan or {}).items()}
    shard = even_shards(len(jobs), rank, world)
    for job in tqdm(shard, desc="reference log-probs", disable=not progress, leave=False):
        split, epoch, idx = jobs[job if job is not None else 0]
        if epoch is None:
            out = forward_logps(model, alignment_batch(idx, split)).float()
        else:
            out = forward_logps(model, kl_batch(idx, kl_plan[split][epoch], split)).float()  # type: ignore[index]
        if job is None:
            continue  # a padding round: the forward kept the collectives in step, its result is not used
        at = torch.as_tensor(idx, device=device)
        if epoch is None:
            b = len(idx)
            sums[split]["chosen"][at] = out[:b]
            sums[split]["rejected"][at] = out[b:]
        else:
            kl[split][epoch][:, at] = out.view(2, len(idx))
    flat = [t for parts in sums.values() for t in parts.values()] + [t for parts in kl.values() for t in parts.values()]
    if world > 1:
        packed = accelerator.reduce(torch.cat(flat), reduction="sum")
        flat = list(torch.split(packed, [t.numel() for t in flat]))
    it = iter(flat)
    table: dict[str, dict[str, Any]] = {}
    for split, examples in splits.items():
        table[split] = {"chosen": next(it).cpu(), "rejected": next(it).cpu(), "ids": [ex.id for ex in examples]}
    for split, by_epoch in kl.items():
        table[split]["kl"] = {epoch: next(it).cpu() for epoch in by_epoch}
    return table


def save_table(path: Path, key: str, table: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"version": CACHE_VERSION, "key": key, "table": table}, tmp)
    tmp.replace(path)


def load_table(path: Path, key: str, splits: Mapping[str, Sequence[Any]],
               explicit: bool) -> dict[str, dict[str, Any]] | None:
    """The cached table, or None when missing. A file the user named that does not match is an error."""
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("key") != key:
        if explicit:
            raise InputError(
                f"{path}: reference log-probs were computed for other pairs, tokenisation or weights "
                f"(key {payload.get('key')!r}, expected {key!r}); remove train.reference_logps_file to recompute"
            )
        return None
    table = payload["table"]
    for split, examples in splits.items():
        if table.get(split, {}).get("ids") != [ex.id for ex in examples]:
            raise InputError(f"{path}: split {split!r} does not list the same pair ids as this run")
    return table


def build_reference(cfg: TrainConfig, policy: nn.Module, frozen_copy: nn.Module | None, data: DataPlan,
                    accelerator: Any, *, dtype: str, fingerprint: str, cache: Path | None, progress: bool,
                    shared: Path | None = None) -> Reference:
    """The run's reference: the prepared ``policy`` with its adapters off (LoRA), ``frozen_copy``
    (full fine-tuning), or with ``train.precompute_reference`` a table of log-probs computed once
    by the prepared policy before any update.

    The table is looked up by its key in ``shared`` first (the reference stage's folder, read
    only: every cell of the grid reads the one table), then in ``cache`` (a folder of tables by
    key, or one file), where a table computed here is saved for a later run with the same pairs
    and weights. A table read from elsewhere is checked against a fresh forward on its first
    rows (:func:`check_sample`): a table that does not match this model stops the run.

    ``fingerprint`` identifies the reference weights and ``dtype`` their precision: both are in
    the cache key. Every process must call it (the precompute is sharded and all-reduced).
    """
    if not cfg.precompute_reference:
        if frozen_copy is not None:  # not prepared by Accelerate: the policy's autocast made explicit
            return Reference("copy", model=frozen_copy, autocast=accelerator.autocast)
        return Reference("adapter", model=policy)
    splits = data.splits()
    plan = data.kl_plan() if cfg.loss == "kto" else None
    key = cache_key(splits, fingerprint, dtype, plan)
    explicit = cfg.reference_logps_file is not None
    path: Path | None
    if cfg.reference_logps_file is not None:
        path = Path(cfg.reference_logps_file)
    else:
        path = (cache / f"{key}.pt") if cache is not None and cache.suffix != ".pt" else cache
    for found in ([] if explicit or shared is None else [shared / f"{key}.pt"]) + ([path] if path else []):
        table = load_table(found, key, splits, explicit)
        if table is not None:
            check_sample(policy, table, data, accelerator, cfg.mixed_precision, found)
            log.info("reference log-probs: reusing %s (%d train pairs)", found, len(data.train_examples))
            return Reference("precomputed", table=table, reused=True)
    if shared is not None and not explicit:
        log.info("reference log-probs: %s holds no table for these pairs and weights (key %s%s): computing this "
                 "run's own", shared, key, ", KTO's mismatched rows depend on the seed" if plan else "")
    started = time.perf_counter()
    table = precompute(policy, splits, plan, data.alignment_batch, data.kl_batch, cfg.optim.micro_batch_size,
                       accelerator, progress and accelerator.is_local_main_process)
    if path is not None and accelerator.is_main_process:
        save_table(path, key, table)
    accelerator.wait_for_everyone()
    log.info("reference log-probs: computed for %s pairs on %d process(es) in %.1f s, saved to %s",
             " + ".join(f"{len(v)} {k}" for k, v in splits.items()), accelerator.num_processes,
             time.perf_counter() - started, path)
    return Reference("precomputed", table=table)


SAMPLE_PAIRS = 4  # the first train pairs of a reused table that are computed again and compared
# how far a sum of log-probs may move between two packings of the same rows: float32 reductions in
# another order; under bf16/fp16 autocast the whole forward is rounded to 8 (11) mantissa bits
TOLERANCE = {"no": (1e-3, 1e-4), "bf16": (0.5, 2e-2), "fp16": (0.25, 1e-2)}  # (absolute, relative)


@torch.no_grad()
def check_sample(model: nn.Module, table: dict[str, dict[str, Any]], data: DataPlan, accelerator: Any,
                 mixed_precision: str, where: Path) -> None:
    """Compute the first train pairs' log-probs again with ``model`` and compare them with the
    table: a table computed from other weights or another tokenisation under the same key (a
    stale or tampered file) stops the run before it trains on a wrong reference."""
    n = min(SAMPLE_PAIRS, len(data.train_examples))
    if n == 0:
        return
    idx = list(range(n))
    fresh = forward_logps(model, data.alignment_batch(idx, "train")).float().cpu()
    stored = torch.cat([table["train"]["chosen"][:n], table["train"]["rejected"][:n]]).float()
    atol, rtol = TOLERANCE.get(mixed_precision, TOLERANCE["no"])
    if str(next(model.parameters()).dtype) != "torch.float32":
        atol, rtol = TOLERANCE["bf16"]
    worst = (fresh - stored).abs().max().item()
    if not torch.allclose(fresh, stored, atol=atol, rtol=rtol):
        raise InputError(f"{where}: the reference log-probs of the first {n} train pairs differ from a fresh "
                         f"computation by up to {worst:.4g} (allowed {atol} + {rtol} x |value|): the table was not "
                         "computed from these weights and pairs; delete it to recompute")
    log.info("reference log-probs: %d pairs checked against a fresh forward (max difference %.2g)", 2 * n, worst)
