"""Worker for test_train_distributed, launched as one process or several:

    torchrun --nproc_per_node N tests/test_train_ddp_worker.py OUT [--fsdp] [--stop-after K]
    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes N \\
        tests/test_train_ddp_worker.py OUT --fsdp

Not collected as tests (no test functions). ``--fsdp`` trains what a sharded run can (precomputed
reference: no frozen copy); ``--stop-after K`` returns after K steps without the final save — a
killed run, which the next call with the same OUT resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS = 4


def main(out_dir: str, loss: str = "dpo", fsdp: bool = False, stop_after: int | None = None,
         lora: bool = False) -> None:
    import torch
    from test_train_support import hh_pairs, tiny_model, train_cfg

    from spo.training.trainer import PreferenceTrainer

    rows, degs = hh_pairs()
    tok, model = tiny_model()
    if lora:  # the reference is then the sharded policy itself, adapters off
        from spo.config import LoraConfig
        from spo.models.loading import apply_lora

        model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0), seed=0)
    cfg = train_cfg(loss=loss, optim={"max_steps": STEPS, "batch_size": 4, "micro_batch_size": 2}, logging_steps=1,
                    spo={"levels_per_step": 3}, precompute_reference=fsdp and not lora, save_steps=2, resume=True)
    tr = PreferenceTrainer.from_rows(model, tok, cfg, rows[:32], degs[:32], seed=0, out_dir=out_dir, progress=False,
                                     reference_cache=Path(out_dir) / "reference")
    tr.train(stop_after=stop_after)
    if stop_after is None and tr.accelerator.is_main_process:
        from safetensors.torch import load_file

        saved = "adapter_model.safetensors" if lora else "model.safetensors"
        torch.save(load_file(str(Path(out_dir) / saved)), Path(out_dir) / "weights.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--loss", default="dpo")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()
    main(args.out, args.loss, args.fsdp, args.stop_after, args.lora)
