"""Reference-model log-probs: LoRA with adapters disabled, a frozen copy, or a precomputed file.

* LoRA: the reference is the same network under ``with model.disable_adapter():`` (no copy).
* Full fine-tuning: a frozen deep copy made once before training (eval mode, no grad).
* ``precompute_reference``: log-probs for every train and eval pair computed once before
  training, saved, and reused by later runs whose tokenised pairs and reference weights are the
  same (any other β, λ, loss or seed); no reference model is then kept in memory.

The cache key is the sha256 of the tokenised alignment inputs (prompt, chosen, rejected and
KTO mismatched-pair ids of every pair, so every tokenisation setting is covered), the
reference weights' fingerprint and the dtype.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spo.io import InputError

log = logging.getLogger("spo.train")

CACHE_VERSION = 1


def sequence_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed log-probs of the label tokens (labels -100 ignored): logits [R, T, V], labels [R, T] -> [R].

    Token t is predicted by position t-1. Computed in float32 with gather − logsumexp (no full
    log-softmax tensor is kept).
    """
    logits = logits[:, :-1, :]
    target = labels[:, 1:]
    mask = target != -100
    safe = target.masked_fill(~mask, 0)
    logits32 = logits.float()
    picked = torch.gather(logits32, 2, safe.unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(logits32, dim=-1)
    return (token_logps * mask).sum(-1)


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


def examples_fingerprint(splits: dict[str, Sequence[Any]], with_degrees: bool = False) -> str:
    """sha256 over the token ids of tokenised pairs; ``with_degrees`` adds every degree variant
    (ids, positions, kept tokens) — what identifies a training run's data for resumption."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        digest.update(split.encode())
        for ex in splits[split]:
            for ids in (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids, ex.kl_ids):
                _update_ints(digest, ids)
            if not with_degrees:
                continue
            for side in sorted(ex.degrees):
                degrees = ex.degrees[side]
                digest.update(f"{side}:{degrees.n_levels}".encode())
                for rows in (degrees.variant_ids, degrees.variant_pos, degrees.keep):
                    for row in rows:
                        _update_ints(digest, [int(v) for v in row])
    return digest.hexdigest()


def cache_key(splits: dict[str, Sequence[Any]], fingerprint: str, dtype: str, with_kl: bool) -> str:
    payload = f"v{CACHE_VERSION}|{examples_fingerprint(splits)}|{fingerprint}|{dtype}|kl={with_kl}"
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class Reference:
    """Reference log-probs for (split, example indices) batches."""

    def __init__(self, kind: str, lm: nn.Module | None = None, table: dict[str, dict[str, Tensor]] | None = None) -> None:
        self.kind = kind  # "adapter" | "copy" | "precomputed"
        self.lm = lm
        self.table = table
        self.forwards = 0  # reference forward passes run during training/eval

    @classmethod
    def build(cls, lm: nn.Module, is_peft: bool) -> Reference:
        if is_peft:
            return cls("adapter", lm=lm)
        ref = copy.deepcopy(lm)
        ref.eval()
        ref.requires_grad_(False)
        return cls("copy", lm=ref)

    def _context(self, lm: nn.Module) -> AbstractContextManager[Any]:
        return lm.disable_adapter() if self.kind == "adapter" else nullcontext()

    @torch.no_grad()
    def logps(self, split: str, indices: Sequence[int], rows: Callable[[], tuple[Tensor, Tensor, Tensor]],
              key: str = "pair", lm: nn.Module | None = None) -> Tensor:
        """Reference log-probs; ``rows()`` gives (input_ids, attention_mask, labels) when a forward is needed.

        ``key``: "pair" -> [chosen..., rejected...] (2b); "kl" -> [b].
        """
        if self.kind == "precomputed":
            assert self.table is not None
            idx = torch.as_tensor(list(indices), dtype=torch.long)
            part = self.table[split]
            if key == "kl":
                return part["kl"][idx]
            return torch.cat((part["chosen"][idx], part["rejected"][idx]))
        model = self.lm if lm is None or self.kind == "copy" else lm
        assert model is not None
        input_ids, attention_mask, labels = rows()
        self.forwards += 1
        was_training = model.training
        model.eval()
        try:
            with self._context(model):
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        finally:
            model.train(was_training)
        return sequence_logps(logits, labels)


@torch.no_grad()
def precompute(lm: nn.Module, is_peft: bool, splits: dict[str, Sequence[Any]], collate: Callable[..., Any],
               micro_batch_size: int, device: torch.device, with_kl: bool, progress: bool = True) -> dict[str, dict[str, Tensor]]:
    """Reference log-probs of every pair of every split (eval mode, adapters disabled)."""
    from tqdm import tqdm

    ref = Reference("adapter" if is_peft else "copy", lm=lm)
    table: dict[str, dict[str, Tensor]] = {}
    for split, examples in splits.items():
        chosen, rejected, kl = [], [], []
        starts = range(0, len(examples), micro_batch_size)
        for start in tqdm(starts, desc=f"reference log-probs ({split})", disable=not progress, leave=False):
            idx = list(range(start, min(start + micro_batch_size, len(examples))))
            batch = collate([examples[i] for i in idx], idx, with_kl=with_kl).to(device)
            b = len(idx)
            out = ref.logps(split, idx, lambda: (batch.input_ids, batch.attention_mask, batch.labels))
            chosen.append(out[:b].float().cpu())
            rejected.append(out[b:2 * b].float().cpu())
            if with_kl:
                kl_out = ref.logps(split, idx, lambda: (batch.kl_input_ids, batch.kl_attention_mask, batch.kl_labels))
                kl.append(kl_out.float().cpu())
        table[split] = {
            "chosen": torch.cat(chosen),
            "rejected": torch.cat(rejected),
            "kl": torch.cat(kl) if kl else torch.zeros(len(examples)),
            "ids": [ex.id for ex in examples],  # type: ignore[dict-item]
        }
    return table


def save_table(path: Path, key: str, table: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"version": CACHE_VERSION, "key": key, "table": table}, tmp)
    tmp.replace(path)


def load_table(path: Path, key: str, splits: dict[str, Sequence[Any]], explicit: bool) -> dict[str, dict[str, Tensor]] | None:
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
