"""`dvc repro` when things go wrong: a run killed during training, and two runs at once.

* A run killed (SIGKILL of its whole process group) while ``train@dpo_spo-0`` trains leaves the
  policy folder's checkpoints behind (the output is ``persist: true``); the next ``dvc repro``
  resumes from the last checkpoint, not from step 0, and ends with ``max_steps`` steps.
* A second ``dvc repro`` started while a first one runs fails at once with DVC's lock error
  and leaves the first run (and its outputs) alone.

SIGKILL is the honest crash: an OOM kill, a preempted VM, a closed laptop lid. Nothing in the
trainer or in DVC gets to run on the way out, so the resume can only use what was already on
disk.

Both tests act on the running `dvc repro` at exact points, not after a poll that might come
too late on a loaded machine: a ``sitecustomize`` hook (pipeline_helpers.Hold) stops the process
there (at a chosen write, or once DVC holds its lock) until the test kills or releases it.
(Ctrl-C sends SIGINT to the foreground process group; DVC ignores it while the stage runs
and the stage process dies with a KeyboardInterrupt, which also leaves only the periodic
checkpoints behind: the same state, reached more gently.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from pipeline_helpers import (
    DVC,
    HANG_GUARD_S,
    Hold,
    _env,
    _project_copy,
    held_env,
    read_params,
    small_project,
    write_params,
)

from spo.io import read_jsonl

pytestmark = pytest.mark.slow

MAX_STEPS = 8
SAVE_STEPS = 2
POLICY = Path("models/policy/dpo_spo_s0")  # the grid cell dpo_spo_s0
# the kill point: the write that would complete the checkpoint of step 4 (step 2's is complete)
KILLED_AT = rf"/{POLICY}/checkpoints/step-4/trainer_state\.json$"
TRAIN = "train@dpo_spo-0"  # its stage of dvc.yaml's train matrix
DATA_STAGES = ("prepare", "validate", "keywords", "degrees")
# dvc/lock.py FAILED_TO_LOCK_MESSAGE (the repository lock) and dvc/rwlock.py (a stage's paths)
REPO_LOCK_MESSAGE = "Unable to acquire lock. Most likely another DVC process is running"
RWLOCK_MESSAGE = "is busy, it is being blocked by:"


def _popen(work: Path, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    """`dvc <args>` in the background, in its own session (so its whole process tree can be signalled)."""
    handle = log.open("w")
    try:
        return subprocess.Popen([*DVC, *args], cwd=work, env={**env, "PYTHONUNBUFFERED": "1"},
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        handle.close()  # the child has its own copy of the descriptor


def _tail(log: Path, chars: int = 6000) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return f"--- last {chars} characters of {log.name} ---\n{text[-chars:]}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=300)  # SIGKILL cannot be caught: only a process that never dies (a hang) reaches this


def _checkpoint_steps(policy: Path) -> list[int]:
    """Steps of the complete checkpoints (the trainer writes trainer_state.json last) in policy/checkpoints."""
    steps = []
    try:
        entries = list((policy / "checkpoints").iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        match = re.fullmatch(r"step-(\d+)", entry.name)
        if match and (entry / "trainer_state.json").is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def test_a_killed_dvc_repro_resumes_training_from_the_last_checkpoint(tmp_path: Path, hh_slice: Path) -> None:
    work = small_project(tmp_path)
    params = read_params(work)
    params["train"].update(save_steps=SAVE_STEPS, keep_checkpoints=2, resume=True)
    params["train"]["optim"]["max_steps"] = MAX_STEPS
    write_params(work, params)
    env, policy, log = _env(hh_slice), work / POLICY, tmp_path / "killed_run.log"
    hold = Hold(tmp_path / "hold", KILLED_AT)  # `spo train` waits there, mid-checkpoint, until killed

    proc = _popen(work, held_env(env, tmp_path / "hold", hold), log, "repro", TRAIN)
    try:
        hold.wait(proc, log, f"the write completing {POLICY}/checkpoints/step-4")
    finally:
        _kill_group(proc)  # the crash: dvc, the shell and `spo train` all at once
    assert proc.returncode == -signal.SIGKILL, (f"the run had already ended (rc {proc.returncode}): "
                                                "not an interruption\n" + _tail(log))

    left = _checkpoint_steps(policy)
    assert left == [2], left  # step 4's checkpoint is half written: not complete, not resumed
    last = left[-1]
    assert not (work / f"metrics/train_{POLICY.name}.json").exists(), "the killed run must not have finished training"
    assert not (policy / "train_summary.json").exists()
    lock = (work / "dvc.lock").read_text()
    assert "sft:" in lock and f"{TRAIN}:" not in lock, "upstream stages are committed, the killed one is not"

    rerun = subprocess.run([*DVC, "repro", TRAIN], cwd=work, env=env, capture_output=True, text=True,
                           timeout=HANG_GUARD_S)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-6000:]
    assert re.findall(r"Running stage '([^']+)'", rerun.stdout) == [TRAIN], "only the interrupted stage reruns"
    resumed = re.findall(r"resuming from \S*checkpoints/step-(\d+) \(step (\d+) of (\d+)\)", rerun.stderr)
    assert resumed == [(str(last), str(last), str(MAX_STEPS))], f"expected a resume from step {last}\n" + output[-6000:]

    summary = json.loads((policy / "train_summary.json").read_text())
    assert (summary["start_step"], summary["steps"], summary["total_steps"]) == (last, MAX_STEPS, MAX_STEPS)
    metrics = json.loads((work / f"metrics/train_{POLICY.name}.json").read_text())
    assert metrics["steps"] == MAX_STEPS
    # logging_steps is 1: one train record per step, those the killed run wrote after its last
    # checkpoint dropped and written again by the resumed run
    logged = [r["step"] for r in read_jsonl(policy / "metrics.jsonl") if r["split"] == "train"]
    assert logged == list(range(1, MAX_STEPS + 1))
    assert (policy / "model.safetensors").is_file()

    third = subprocess.run([*DVC, "repro", TRAIN], cwd=work, env=env, capture_output=True, text=True)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "Running stage" not in third.stdout
    assert f"Stage '{TRAIN}' didn't change, skipping" in third.stdout


# ------------------------------------------------------------------------------ two at once


def _holds_repo_lock(work: Path, pid: int) -> bool:
    """Whether process pid holds the flock on .dvc/tmp/lock (DVC's repository lock), per /proc/locks."""
    try:
        inode = (work / ".dvc/tmp/lock").stat().st_ino
    except FileNotFoundError:
        return False
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 12345 fd:01:678 0 EOF"
        if (len(fields) >= 6 and fields[1] == "FLOCK" and fields[4] == str(pid)
                and fields[5].rsplit(":", 1)[-1] == str(inode)):
            return True
    return False


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="needs Linux /proc/locks to see who holds DVC's lock")
def test_a_second_dvc_repro_fails_on_the_lock_and_the_first_finishes(tmp_path: Path, hh_slice: Path) -> None:
    """Made deterministic by holding the first run exactly where the second must meet it.

    DVC 3 has two locks: the repository lock (.dvc/tmp/lock) is held while DVC itself works
    (collecting stages, hashing, committing) but released while a stage's command runs; the
    stage's deps and outs are then guarded by .dvc/tmp/rwlock.  A second `dvc repro` meets the
    first, with a different message, in each case:
    1. the first holds the repository lock: "Unable to acquire lock ...";
    2. the first runs a stage command: "'<out>' is busy, it is being blocked by: (PID <first>)".
    The first run is held (pipeline_helpers.Hold) once it has taken the repository lock, then in
    its first stage command, `spo prepare`, at the write of data/prepared/train.jsonl; each hold
    lasts until the second run has met it, so no poll races the first run's progress.
    """
    work = _project_copy(tmp_path)
    env, log = _env(hh_slice), tmp_path / "first.log"
    locked = Hold(tmp_path / "hold", releasable=True)
    in_stage = Hold(tmp_path / "hold", r"/data/prepared/train\.jsonl$", releasable=True)
    first = _popen(work, held_env(env, tmp_path / "hold", locked, in_stage), log, "repro", "degrees")
    try:
        # 1. the first run holds the repository lock (collecting the stages) and waits there
        pid, _ = locked.wait(first, log, "the first dvc repro holding .dvc/tmp/lock")
        assert pid == first.pid and _holds_repo_lock(work, first.pid)
        second = subprocess.run([*DVC, "repro", "degrees"], cwd=work, env=env, capture_output=True, text=True,
                                timeout=HANG_GUARD_S)
        locked.release()
        assert second.returncode != 0, second.stdout + second.stderr
        assert REPO_LOCK_MESSAGE in second.stderr, second.stdout + second.stderr
        assert "Running stage" not in second.stdout

        # 2. the first run executes `spo prepare` (the first dvc waits on it), held at its first write
        _, held = in_stage.wait(first, log, "`spo prepare` of the first dvc repro writing data/prepared/train.jsonl")
        assert held.endswith(str(work / "data/prepared/train.jsonl")), held
        assert not _holds_repo_lock(work, first.pid)  # released while the stage's command runs
        second = subprocess.run([*DVC, "repro", "degrees"], cwd=work, env=env, capture_output=True, text=True,
                                timeout=HANG_GUARD_S)
        in_stage.release()
        assert second.returncode != 0, second.stdout + second.stderr
        assert RWLOCK_MESSAGE in second.stderr and f"(PID {first.pid})" in second.stderr, second.stdout + second.stderr
        assert "Running stage 'prepare'" not in second.stdout

        assert first.wait(timeout=HANG_GUARD_S) == 0, _tail(log)  # a hang guard: the rest takes seconds
    finally:
        if first.poll() is None:
            _kill_group(first)
    out = log.read_text()
    for stage in DATA_STAGES:
        assert f"Running stage '{stage}'" in out, stage

    # nothing corrupted: the outputs match what dvc.lock recorded, and no lock entry is left over
    status = subprocess.run([*DVC, "status", "--with-deps", "degrees"], cwd=work, env=env, capture_output=True,
                            text=True)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    again = subprocess.run([*DVC, "repro", "degrees"], cwd=work, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Running stage" not in again.stdout
    for stage in DATA_STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in again.stdout
    rwlock = json.loads((work / ".dvc/tmp/rwlock").read_text())
    assert not rwlock.get("read") and not rwlock.get("write"), rwlock
