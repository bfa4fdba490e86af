"""Several CPU processes (gloo) follow the loss trajectory of one process with the same global batch.

Data parallel (torchrun) and sharded (FSDP version 2, through `accelerate launch` with the
repository's own configs/accelerate/fsdp.yaml). Catches unsynchronised gradients (each process
would drift on its own data), metrics that are not reduced across processes, a sharded model
that is not really sharded, and a sharded run that does not resume where it was killed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = str(HERE / "test_train_ddp_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE)}


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).with_name(name))


def _run(cmd: list[str]) -> str:
    # a run takes 10-40 s: the bound only stops a hang (a collective that never completes)
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def _fsdp(out: Path, *extra: str) -> str:
    return _run([_tool("accelerate"), "launch", "--config_file", str(REPO / "configs/accelerate/fsdp.yaml"),
                 "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0", WORKER, str(out),
                 "--fsdp", *extra])


def _losses(out: Path) -> list[tuple[float, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["loss"], r["pairs"]) for r in records if r["split"] == "train"]


def _same_trajectory(a: Path, b: Path, rel: float) -> None:
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == 4
    assert [p for _, p in lb] == [4.0] * 4  # pairs summed over both processes
    for (x, _), (y, _) in zip(la, lb):
        assert y == pytest.approx(x, rel=rel)
    wa, wb = torch.load(a / "weights.pt"), torch.load(b / "weights.pt")
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    two = tmp_path / "two"
    _run([_tool("torchrun"), "--standalone", "--nproc_per_node", "2", WORKER, str(two)])

    from test_train_ddp_worker import main

    one = tmp_path / "one"
    main(str(one))  # in this process: one process, accumulation 2 (same global batch of 4 pairs)
    _same_trajectory(one, two, rel=1e-4)
    assert (two / "metrics.jsonl").read_text().count('"step": 1,') == 1  # one writer


@pytest.mark.slow
def test_fsdp_matches_one_process_and_a_killed_sharded_run_resumes_exactly(tmp_path: Path) -> None:
    """Train under FSDP2 on 2 gloo processes: the loss trajectory and the final weights match one
    process, the heads and the LM are saved whole, and a run killed after its step-2 checkpoint
    and started again ends with the same weights as the uninterrupted sharded run."""
    from test_train_ddp_worker import main

    one = tmp_path / "one"
    main(str(one), fsdp=True)
    sharded = tmp_path / "fsdp"
    log = _fsdp(sharded)
    assert "FSDP" in log or (sharded / "model.safetensors").is_file()
    _same_trajectory(one, sharded, rel=1e-4)
    for name in ("degree_heads.safetensors", "config.json", "tokenizer.json"):
        assert (sharded / name).is_file(), name
    from safetensors.torch import load_file

    heads_one = load_file(str(one / "degree_heads.safetensors"))
    heads_two = load_file(str(sharded / "degree_heads.safetensors"))
    assert all(torch.allclose(heads_one[k], heads_two[k], rtol=1e-4, atol=1e-6) for k in heads_one)

    killed = tmp_path / "killed"
    _fsdp(killed, "--stop-after", "3")  # checkpoint at step 2, killed during step 3's aftermath
    assert (killed / "checkpoints" / "step-2").is_dir() and not (killed / "model.safetensors").exists()
    _fsdp(killed)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3, 4]
    wa, wb = torch.load(sharded / "weights.pt"), torch.load(killed / "weights.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_fsdp_with_lora_uses_the_sharded_policy_without_adapters_as_reference(tmp_path: Path) -> None:
    from test_train_ddp_worker import main

    one = tmp_path / "one"
    main(str(one), fsdp=True, lora=True)
    sharded = tmp_path / "fsdp"
    _fsdp(sharded, "--lora")
    _same_trajectory(one, sharded, rel=1e-4)  # adapter weights, saved whole from the shards
    assert json.loads((sharded / "adapter_config.json").read_text())["r"] == 4
