"""Worker for test_train_distributed: ``torchrun --nproc_per_node N tests/test_train_ddp_worker.py OUT``.

Not collected as tests (no test functions); run by the distributed test in 1- and 2-process form.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(out_dir: str, loss: str = "dpo") -> None:
    import torch
    from test_train_support import hh_pairs, tiny_model, train_cfg

    from spo.training.trainer import PreferenceTrainer

    rows, degs = hh_pairs()
    tok, model = tiny_model()
    cfg = train_cfg(loss=loss, optim={"max_steps": 3, "batch_size": 4, "micro_batch_size": 2}, logging_steps=1,
                    spo={"levels_per_step": 3})
    tr = PreferenceTrainer.from_rows(model, tok, cfg, rows[:32], degs[:32], seed=0, out_dir=out_dir, progress=False)
    tr.train()
    if tr.accelerator.is_main_process:
        torch.save({k: v.detach().cpu() for k, v in tr.unwrapped_lm().state_dict().items()}, Path(out_dir) / "weights.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
