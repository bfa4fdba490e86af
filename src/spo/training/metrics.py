"""Training metrics: sums reduced across processes, written to metrics.jsonl and TensorBoard.

Every process accumulates the same fixed set of named sums (so one all-reduce of one tensor
reduces them all); ratios are taken after the reduction, so they are global, not averages of
per-process ratios.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("spo.train")

SIDE_KEYS = ("w", "l")  # w: chosen (preferred) variants, l: rejected
RESPONSE_BOOTSTRAP = 2000  # resamples of the eval responses for the degree accuracy's interval


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class Accumulator:
    """Named float sums + per-side N x N degree confusion counts, and (eval) per response and side
    the degree predictions made and those right: a response's N levels are not N independent
    trials, so its interval resamples responses (spo.results)."""

    def __init__(self, n_levels: int, n_responses: int = 0) -> None:
        self.n_levels = max(n_levels, 1)
        self.n_responses = n_responses
        self.names = [
            "loss", "loss_align", "loss_degree_w", "loss_degree_l", "kl", "micro_batches",
            "pairs", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy",
            "logps_chosen", "logps_rejected", "logits_chosen", "logits_rejected", "tokens_chosen", "tokens_rejected",
            "excluded_w", "excluded_l", "tokens", "nonfinite_steps",
        ]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.names), dtype=torch.float64)
        self.confusion = torch.zeros((2, self.n_levels, self.n_levels), dtype=torch.float64)
        self.responses = torch.zeros((2, 2, self.n_responses), dtype=torch.float64)  # side, (right, seen), response

    def add(self, name: str, value: float | torch.Tensor) -> None:
        self.sums[self.index[name]] += float(value)

    def add_confusion(self, side: int, labels: torch.Tensor, preds: torch.Tensor) -> None:
        if labels.numel():
            flat = (labels.cpu() * self.n_levels + preds.cpu()).long()
            counts = torch.bincount(flat, minlength=self.n_levels**2).double()
            self.confusion[side] += counts.view(self.n_levels, self.n_levels)

    def add_responses(self, side: int, responses: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor) -> None:
        """Count each prediction under its response (an index into the eval examples)."""
        if self.n_responses and labels.numel():
            responses = responses.cpu().long()
            self.responses[side, 0].index_add_(0, responses, (labels.cpu() == preds.cpu()).double())
            self.responses[side, 1].index_add_(0, responses, torch.ones(len(responses), dtype=torch.float64))

    def reduced(self, accelerator: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        packed = torch.cat((self.sums, self.confusion.flatten(), self.responses.flatten())).to(accelerator.device)
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        packed = packed.cpu()
        n, c = len(self.names), 2 * self.n_levels**2
        return (packed[:n], packed[n:n + c].view(2, self.n_levels, self.n_levels),
                packed[n + c:].view(2, 2, self.n_responses))

    def summarise(self, accelerator: Any, degree_sides: tuple[bool, bool],
                  ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """The logged values, the reduced confusion and the reduced per-response counts.

        ``degree/accuracy_*`` is balanced: the mean of the per-level accuracies.  With
        ``levels_per_step`` every sample has level 0 and each other level only some, so the plain
        share of right answers would give a head that always says 0 half marks (with m = 2);
        balanced, it gets chance.  Over all levels (eval) the two are the same.
        """
        sums, confusion, responses = self.reduced(accelerator)
        s = {name: float(sums[i]) for i, name in enumerate(self.names)}
        mb = max(s["micro_batches"], 1.0)
        pairs = max(s["pairs"], 1.0)
        # TRL's names (DPOTrainer/KTOTrainer), so dashboards built for TRL read these logs as they are
        out: dict[str, float] = {
            "loss": s["loss"] / mb,
            "loss_align": s["loss_align"] / mb,
            "loss_degree_w": s["loss_degree_w"] / mb,
            "loss_degree_l": s["loss_degree_l"] / mb,
            "rewards/chosen": s["reward_chosen"] / pairs,
            "rewards/rejected": s["reward_rejected"] / pairs,
            "rewards/margins": s["reward_margin"] / pairs,
            "rewards/accuracies": s["reward_accuracy"] / pairs,
            "logps/chosen": s["logps_chosen"] / pairs,
            "logps/rejected": s["logps_rejected"] / pairs,
            "logits/chosen": s["logits_chosen"] / max(s["tokens_chosen"], 1.0),
            "logits/rejected": s["logits_rejected"] / max(s["tokens_rejected"], 1.0),
            "excluded_w": s["excluded_w"],
            "excluded_l": s["excluded_l"],
            "pairs": s["pairs"],
            "tokens": s["tokens"],
            "nonfinite_steps": s["nonfinite_steps"],
        }
        if s["kl"]:
            out["kl"] = s["kl"] / mb
        for side, key in enumerate(SIDE_KEYS):
            if not degree_sides[side]:
                continue
            conf = confusion[side]
            per_level = []
            for k in range(self.n_levels):
                row = float(conf[k].sum())
                out[f"degree/accuracy_{key}/level_{k}"] = float(conf[k, k]) / row if row else float("nan")
                if row:
                    per_level.append(float(conf[k, k]) / row)
            out[f"degree/accuracy_{key}"] = math.fsum(per_level) / len(per_level) if per_level else float("nan")
            seen = responses[side, 1] > 0
            if seen.any():  # eval: a bootstrap over responses, all levels of one together
                from spo.judging.statistics import bootstrap_ci

                right = (responses[side, 0][seen] / responses[side, 1][seen]).numpy()
                low, high = bootstrap_ci(right, RESPONSE_BOOTSTRAP, seed=0)
                out[f"degree/accuracy_{key}/ci_low"] = float("nan") if low is None else low
                out[f"degree/accuracy_{key}/ci_high"] = float("nan") if high is None else high
        return out, confusion, responses


def _clean(value: float) -> float | None:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsWriter:
    """metrics.jsonl (one object per logged step, with "step" and "split") + TensorBoard."""

    def __init__(self, out_dir: Path | None, enabled: bool) -> None:
        self.enabled = enabled and out_dir is not None
        self.path = out_dir / "metrics.jsonl" if out_dir is not None else None
        self.out_dir = out_dir
        self.tb: Any = None  # opened on the first write (after a fresh start cleared old logs)

    def _open_tb(self) -> None:
        if self.tb is not None or self.out_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")
            self.tb = False

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines a killed run logged after its last checkpoint."""
        if not self.enabled or self.path is None or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut off by the kill itself
                continue
        from spo.io import atomic_open

        with atomic_open(self.path) as handle:  # a kill during the rewrite loses nothing
            handle.write("".join(line + "\n" for line in kept))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: _clean(v) for k, v in values.items()}}
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open_tb()
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{split}/{key}", value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        self.tb = None


def save_responses(responses: torch.Tensor, ids: list[str], degree_sides: tuple[bool, bool], n_levels: int,
                   out_dir: Path) -> None:
    """degree_responses.json: per head, ``[id, right, seen]`` of every eval response the heads saw
    (responses excluded from the degree loss are left out), for a bootstrap over responses."""
    from spo.io import write_json

    payload: dict[str, Any] = {"n_levels": n_levels}
    for i, key in enumerate(SIDE_KEYS):
        if degree_sides[i]:
            payload[key] = [[ids[r], int(responses[i, 0, r]), int(responses[i, 1, r])]
                            for r in range(len(ids)) if responses[i, 1, r] > 0]
    write_json(out_dir / "degree_responses.json", payload)


def save_confusion(confusion: torch.Tensor, degree_sides: tuple[bool, bool], out_dir: Path) -> dict[str, Any]:
    """degree_confusion.json + degree_confusion.png (rows: true level, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spo.io import write_json

    names = {"w": "chosen (head_w)", "l": "rejected (head_l)"}
    payload = {key: confusion[i].long().tolist() for i, key in enumerate(SIDE_KEYS) if degree_sides[i]}
    write_json(out_dir / "degree_confusion.json", payload)
    sides = [i for i in range(2) if degree_sides[i]]
    if not sides:
        return payload
    fig, axes = plt.subplots(1, len(sides), figsize=(4.2 * len(sides), 3.8), squeeze=False)
    try:
        for ax, i in zip(axes[0], sides):
            conf = confusion[i].numpy()
            n = conf.shape[0]
            ax.imshow(conf, cmap="Blues")
            for r in range(n):
                for c in range(n):
                    ax.text(c, r, f"{int(conf[r, c])}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(n))
            ax.set_yticks(range(n))
            ax.set_xlabel("predicted level")
            ax.set_ylabel("true level")
            ax.set_title(names[SIDE_KEYS[i]])
        fig.tight_layout()
        tmp = out_dir / ".degree_confusion.tmp.png"
        fig.savefig(tmp, dpi=100)
        tmp.replace(out_dir / "degree_confusion.png")
    finally:
        plt.close(fig)
    return payload
