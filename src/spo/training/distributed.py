"""Distributed setup: the Accelerator (one process, DDP or FSDP2), and what it cannot run.

Everything here runs before any model work, so that a launch or precision setting the device
cannot honour fails in seconds with the option to change, not after the model is loaded and
the reference log-probs are computed.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from spo.config import OptimConfig, TrainConfig
from spo.errors import InputError, StageFailed

log = logging.getLogger("spo.train")


def is_peft(model: nn.Module) -> bool:
    """A peft (LoRA) model: its reference is itself with the adapters off, and FSDP shards it as it is."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def check_precision(cfg: TrainConfig, device_type: str) -> None:
    """Refuse precision settings the device cannot run, before any expensive work."""
    if cfg.mixed_precision == "fp16" and device_type != "cuda":
        raise InputError(f"train.mixed_precision fp16 needs a GPU (loss scaling runs on CUDA); this run is on "
                         f"{device_type}: use bf16 or no")
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


def setup_accelerator(cfg: TrainConfig, peft: bool, accelerator: Any = None) -> Any:
    """The run's Accelerator: ``accelerator`` when given (tests, benchmarks), else one built from
    the launch environment; the precision settings are checked against its device either way."""
    if accelerator is not None:
        check_precision(cfg, accelerator.device.type)
        return accelerator
    check_precision(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    return _build_accelerator(cfg, peft)


def _build_accelerator(cfg: TrainConfig, peft: bool) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    sides = cfg.spo.sides
    # two heads with one side's λ at 0: that head takes no part in the loss, which DDP must be told
    find_unused = cfg.spo.heads == "two" and any(sides) and not all(sides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # several processes on a machine without GPU: Accelerate only goes multi-process (gloo) with cpu=True
    cpu = world > 1 and not torch.cuda.is_available()
    if cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        fsdp_on_cpu()
    acc = Accelerator(
        cpu=cpu,
        mixed_precision=None if cfg.mixed_precision == "no" else cfg.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
    )
    if world != acc.num_processes:
        raise StageFailed(f"WORLD_SIZE is {world} but Accelerate runs {acc.num_processes} process(es): launch "
                          "with `accelerate launch --config_file configs/accelerate/<ddp|fsdp>.yaml` or torchrun")
    check_sharding(acc, cfg, peft)
    return acc


def fsdp_on_cpu() -> None:
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


def check_sharding(acc: Any, cfg: TrainConfig, peft: bool) -> None:
    """What FSDP cannot honour, refused before any model work (each names the option)."""
    if not is_sharded(acc):
        return
    version = getattr(acc.state.fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise InputError(
            f"fsdp_version {version}: the trainer supports FSDP version 2 (configs/accelerate/fsdp.yaml). "
            "Version 1 flattens each unit into one parameter (LoRA's frozen and trainable tensors cannot share "
            "one unless fsdp_use_orig_params), and peft then saves an empty adapter"
        )
    if not peft and not cfg.precompute_reference:
        raise InputError(
            "FSDP with full fine-tuning needs train.precompute_reference: true (the reference log-probs are "
            "computed once, sharded, and no reference model is kept) or LoRA (train.lora.enabled: the reference "
            "is the sharded policy with its adapters off); a second, unsharded frozen copy is not supported"
        )


def is_sharded(acc: Any) -> bool:
    """FSDP: a parameter exists whole only inside the prepared module's forward, or once gathered."""
    from accelerate.utils import DistributedType

    return bool(acc.distributed_type == DistributedType.FSDP)


def accumulation_steps(optim: OptimConfig, num_processes: int) -> int:
    """Micro-batches per process per optimizer step: ``optim.batch_size`` pairs are consumed per
    step over all processes, ``optim.micro_batch_size`` at a time by each."""
    per_round = optim.micro_batch_size * num_processes
    if optim.batch_size % per_round:
        raise InputError(
            f"optim.batch_size {optim.batch_size} is not a multiple of micro_batch_size {optim.micro_batch_size} "
            f"x {num_processes} processes"
        )
    return optim.batch_size // per_round
