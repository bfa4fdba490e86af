"""`spo train` on two "nodes" as Kubeflow Trainer v2's torch-distributed runtime starts it.

That runtime runs the trainer container's command, ``torchrun --module spo train -p <params> -S ...``
(src/spo/cluster/trainjob.py), unchanged on every node and injects only ``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``, which
torchrun reads as the defaults of its flags. Here two such torchrun processes (no flags) meet on
loopback (CPU, gloo) and must follow the loss trajectory of one plain ``spo train`` process with
the same params and global batch (4 pairs: 2 nodes x micro-batch 2, against accumulation 2), and
only global rank 0 — not the local rank 0 of node 1 — may write the model, metrics and summary.

The inputs (rows, degrees, SFT model) are shared by absolute path, as on the run's RWX workspace;
the outputs are relative to each node's working directory, so that anything node 1 wrote would
show up in a folder of its own instead of being overwritten in the shared one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_train_support import write_train_inputs

STEPS = 4
# Both nodes together, counted once this process's own run is done. Only a guard against a hang
# (a node stuck in the rendezvous or a collective); the nodes take under a minute even on a
# loaded 2-core machine, and their outcome never depends on how fast they are.
HANG_GUARD_S = 1800
_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "ACCELERATE_USE_FSDP", "ACCELERATE_TORCH_DEVICE")


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _node_env(node_rank: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("PET_")}
    env.update(
        OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        # what the Trainer's torch plugin injects, and nothing else of torchrun's
        PET_NNODES="2", PET_NPROC_PER_NODE="1", PET_NODE_RANK=str(node_rank),
        PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port),
        # the test host's side: gloo's sockets on loopback only (it would otherwise bind to the
        # address the host name resolves to)
        GLOO_SOCKET_IFNAME="lo",
    )
    return env


def _stop(proc: subprocess.Popen) -> None:
    """End a torchrun agent and its workers (which torchrun starts in sessions of their own)."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers
    _, alive = psutil.wait_procs(family, timeout=10)  # a grace period, then SIGKILL: no assertion on it
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    # SIGKILL cannot be caught: these bounds only stop a cleanup whose processes never die (a hang)
    psutil.wait_procs(alive, timeout=300)
    proc.wait(timeout=300)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared inputs (validated rows, degrees, a saved tiny SFT model) and the params file."""
    root = write_train_inputs(tmp_path_factory.mktemp("multinode"), slice(0, 32), slice(64, 72))
    params = {"seed": 0, "train": {
        "rows_dir": str(root / "data/validated"), "degrees_dir": str(root / "data/degrees"),
        "sft_dir": str(root / "models/sft"),
        "out_dir": "models/policy/dpo_spo_s0", "metrics_file": "metrics/train.json",  # relative: per node
        # one cell of the grid, dpo_spo_s0: its settings as a TrainJob gets them (SpoConfig.cell_settings)
        "loss": "dpo", "seed": 0,
        "max_length": 96, "max_prompt_length": 48, "eval_rows": 8, "eval_steps": 2, "logging_steps": 1,
        "save_steps": 2, "precompute_reference": False,
        "spo": {"enabled": True, "hidden_size": 16, "dropout": 0.0, "levels_per_step": 3},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 1, "batch_size": 4, "micro_batch_size": 2,
                  "max_steps": STEPS},
    }}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _records(node: Path) -> list[dict]:
    path = node / "models/policy/dpo_spo_s0/metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_two_torchrun_nodes_from_pet_env_match_one_process(workspace: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from spo.cli import main

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    command = [torchrun, "--module", "spo", "train", "-p", str(workspace / "params.yaml"), "-S", "train.eval_rows=8"]
    port = _free_loopback_port()
    nodes = [tmp_path / f"node{rank}" for rank in (0, 1)]
    procs: list[subprocess.Popen] = []
    try:
        for rank, cwd in enumerate(nodes):
            cwd.mkdir()
            with open(cwd / "torchrun.log", "wb") as log:
                procs.append(subprocess.Popen(command, cwd=cwd, env=_node_env(rank, port), stdout=log,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

        # meanwhile, the same stage in one plain process (this one), with the same params file
        one = tmp_path / "one"
        one.mkdir()
        monkeypatch.chdir(one)
        for var in _DIST_VARS:
            monkeypatch.delenv(var, raising=False)
        assert main(["train", "-q", "-p", str(workspace / "params.yaml"), "-S", "train.eval_rows=8"]) == 0
        monkeypatch.chdir(tmp_path)

        deadline = time.monotonic() + HANG_GUARD_S
        for rank, proc in enumerate(procs):
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = None
            log_tail = (nodes[rank] / "torchrun.log").read_text(errors="replace")[-4000:]
            outcome = f"hung ({HANG_GUARD_S} s)" if code is None else f"exit {code}"
            assert code == 0, f"node {rank}: {outcome}\n{log_tail}"
    finally:
        for proc in procs:
            _stop(proc)

    single, multi = _records(one), _records(nodes[0])
    train_one = [r for r in single if r["split"] == "train"]
    train_two = [r for r in multi if r["split"] == "train"]
    assert [r["step"] for r in train_one] == [r["step"] for r in train_two] == list(range(1, STEPS + 1))
    assert [r["pairs"] for r in train_two] == [4.0] * STEPS  # counted over both nodes, logged once
    for a, b in zip(train_one, train_two):
        for key in ("loss", "loss_align", "loss_degree_w", "loss_degree_l", "logps/chosen", "rewards/margins",
                    "grad_norm", "learning_rate", "tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    eval_one = [r for r in single if r["split"] == "eval"]
    eval_two = [r for r in multi if r["split"] == "eval"]
    assert [r["step"] for r in eval_one] == [r["step"] for r in eval_two] == [2, STEPS]
    for a, b in zip(eval_one, eval_two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["pairs"] == a["pairs"] == 8.0

    import torch
    from safetensors.torch import load_file

    w_one = load_file(str(one / "models/policy/dpo_spo_s0/model.safetensors"))
    w_two = load_file(str(nodes[0] / "models/policy/dpo_spo_s0/model.safetensors"))
    assert w_one.keys() == w_two.keys()
    assert all(torch.allclose(w_one[k], w_two[k], rtol=1e-4, atol=1e-6) for k in w_one)
    summary = json.loads((nodes[0] / "models/policy/dpo_spo_s0/train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["accumulation_steps"] == 1
    assert json.loads((nodes[0] / "metrics/train.json").read_text())["steps"] == STEPS

    # node 1 (global rank 1, yet the local main process of its node) wrote none of the outputs
    written = _files(nodes[1]) - {"torchrun.log"}
    assert not (nodes[1] / "metrics").exists()
    assert all(name.startswith("models/policy/dpo_spo_s0/checkpoints/") for name in written), sorted(written)
    assert not any(name.endswith((".safetensors", ".jsonl", ".json")) for name in written), sorted(written)
