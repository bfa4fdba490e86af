"""Checkpoints and resume: what a checkpoint holds, how it is written, and which one a rerun continues.

``out_dir/checkpoints/step-N`` holds Accelerate's state (model, optimizer, RNG, and the objects
registered for checkpointing: the scheduler, then :class:`TrainerState`) and
``trainer_state.json``, written last: a folder without it is an interrupted save and is never
resumed. A rerun continues from the newest checkpoint that is complete, readable and written by
the same config, seed, weights and data (:func:`config_hash`); a damaged one is passed over for
the one before, and one of another config starts the run afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spo.config import TrainConfig
from spo.errors import CheckpointError
from spo.io import disk_full, output_error, write_json
from spo.training.data import PairExample
from spo.training.metrics import Accumulator
from spo.training.reference import examples_fingerprint

log = logging.getLogger("spo.train")

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
# what a finished run leaves beside its checkpoints: the model (full weights or an adapter), the
# degree heads, the confusion matrix, and the stage's summary and provenance
FINAL_OUTPUTS = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                 "adapter_config.json", "degree_heads.json", "degree_confusion.*", "train_summary.json",
                 "provenance.json")
# settings that change neither the numbers nor the data: a checkpoint written with others is resumed
NOT_HASHED = {"resume", "logging_steps", "eval_steps", "save_steps", "keep_checkpoints", "keep_checkpoints_at_end",
              "out_dir", "metrics_file"}


class TrainerState:
    """Step counter + the metric window, saved by ``accelerator.save_state`` (register_for_checkpointing)."""

    def __init__(self, n_levels: int, config_hash: str) -> None:
        self.step = 0
        self.skipped_steps = 0
        self.tokens_total = 0.0
        self.window = Accumulator(n_levels)
        self.config_hash = config_hash

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


def config_hash(cfg: TrainConfig, seed: int, weights: str, dtype: str, train_examples: Sequence[PairExample]) -> str:
    """What a checkpoint must share with this run to be resumed: the training config, the
    seed, the starting weights and every token of the training data, degree variants
    included (a rerun after `keywords` or `sft` changed must not resume the old run)."""
    dumped = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NOT_HASHED}
    payload = json.dumps({
        "cfg": dumped, "seed": seed, "weights": weights, "dtype": dtype,
        "ids": [e.id for e in train_examples],
        "data": examples_fingerprint({"train": train_examples}, with_degrees=True),
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_problem(path: Path) -> str | None:
    """A cheap completeness check of one checkpoint file (reads headers and tails, not the tensors):
    a safetensors header must parse and cover the whole file; a torch.save zip archive must have
    its central directory (a truncated copy has lost it)."""
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


def unusable(checkpoint: Path) -> str | None:
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
        if (checkpoint / name).is_file() and (problem := file_problem(checkpoint / name)):
            return f"{checkpoint / name}: {problem}"
    return None


class Checkpoints:
    """The run's checkpoints in ``out_dir/checkpoints`` (none when ``out_dir`` is None).

    Registers ``scheduler`` and ``state`` with the accelerator, in that order (the order names
    their files in a checkpoint), so that saving and loading the accelerator's state covers them.
    """

    def __init__(self, out_dir: Path | None, accelerator: Any, scheduler: Any, state: TrainerState, keep: int) -> None:
        self.out_dir = out_dir
        self.root = out_dir / CHECKPOINTS if out_dir is not None else None
        self.accelerator = accelerator
        self.state = state
        self.keep = keep
        accelerator.register_for_checkpointing(scheduler, state)

    def listed(self) -> list[Path]:
        """The complete checkpoints (trainer_state.json written), oldest first."""
        if self.root is None or not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))

    def save(self) -> Path | None:
        """``checkpoints/step-N``: accelerate's state, then trainer_state.json, written last; the
        oldest beyond ``keep`` are removed. A failed save removes its folder; a full disk is an
        :class:`~spo.errors.OutputError` naming the folder and ENOSPC."""
        if self.root is None:
            return None
        acc = self.accelerator
        target = self.root / f"step-{self.state.step}"
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
            kept = [p.name for p in self.listed()]
            raise output_error(target, code, "cannot write the checkpoint",
                               f" with train.resume=true (it resumes from {kept[-1]})" if kept else "") from None
        if acc.is_main_process:
            for old in self.listed()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return target

    def resume(self) -> Path | None:
        """Load the newest usable checkpoint into the registered state and return it; None after
        :meth:`start_afresh` when there is none, or when it was written with another config or data.

        Newest first, a damaged checkpoint is passed over for the one before (the files are the
        same for every process); checkpoints that are all damaged are a :class:`CheckpointError`.
        """
        checkpoints = self.listed()
        problems: list[str] = []
        for last in reversed(checkpoints):
            problem = unusable(last)
            if problem is None:
                saved = json.loads((last / STATE_FILE).read_text())
                if saved.get("config_hash") != self.state.config_hash:
                    log.warning("%s was written with another config or data (hash %s, now %s): starting afresh",
                                last, saved.get("config_hash"), self.state.config_hash)
                    self.start_afresh()
                    return None
                problem = self._load(last)
            if problem is not None:
                problems.append(problem)
                log.warning("checkpoint %s is not usable, passing over it: %s", last.name, problem)
                continue
            if problems and self.accelerator.is_main_process:
                self._set_aside(checkpoints[checkpoints.index(last) + 1:])
            self.accelerator.wait_for_everyone()
            return last
        if not checkpoints:
            self.start_afresh()
            return None
        raise CheckpointError(
            f"no usable checkpoint to resume in {self.root}: {'; '.join(problems)}; delete the folder or "
            "rerun with -S train.resume=false to start afresh"
        )

    def start_afresh(self) -> None:
        """Remove what a previous run left in ``out_dir``: its checkpoints, metrics log, TensorBoard
        events and final model. The folder is kept between runs for its checkpoints (DVC
        ``persist``), and a run killed before its own final save must not leave the old weights for
        a hand-run ``spo generate`` to take as this run's."""
        if self.accelerator.is_main_process and self.out_dir is not None:
            shutil.rmtree(self.out_dir / CHECKPOINTS, ignore_errors=True)
            (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(self.out_dir / "tensorboard", ignore_errors=True)
            for pattern in FINAL_OUTPUTS:
                for old in self.out_dir.glob(pattern):
                    if old.is_file():
                        old.unlink()
        self.accelerator.wait_for_everyone()

    def remove(self) -> None:
        """Delete every checkpoint (main process): once the final model is saved only a crash needs them."""
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def _load(self, checkpoint: Path) -> str | None:
        """Load ``checkpoint`` into the accelerator's state; what went wrong when it cannot be."""
        try:
            self.accelerator.load_state(str(checkpoint))
        except Exception as err:  # noqa: BLE001 - damage unusable() cannot see, in torch.load's own words
            return f"{checkpoint}: cannot be loaded ({type(err).__name__}: {str(err).strip().splitlines()[0][:300]})"
        return None

    @staticmethod
    def _set_aside(damaged: list[Path]) -> None:
        """Rename damaged checkpoints newer than the one resumed (kept for a look; removed by the next
        fresh start), so that the pruning of old checkpoints never keeps them in place of the good ones."""
        for path in damaged:
            aside = path.with_name(f"damaged-{path.name}")
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            log.warning("moved %s aside to %s", path, aside.name)
