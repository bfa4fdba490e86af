"""The kill matrix: every long stage SIGKILLed mid-way, then run again.

For each stage (keywords, degrees, sft, train on one process, train on two torchrun processes,
generate, reward_model, judge with the local reward backend) the real ``spo <stage>`` CLI runs
as a subprocess in its own session inside a small project copy whose upstream outputs the
module fixture made once; its whole process tree is SIGKILLed once a progress marker shows it
is mid-way, and it is started again. Each case asserts:

1. the rerun exits 0: the stages without checkpoints start over; ``train`` resumes from its
   last *complete* checkpoint (the one with ``trainer_state.json``, written last);
2. between the kill and the rerun no half-written output is there for DVC or a later stage to
   take as finished: a stage that writes its folder whole (``spo.io.atomic_dir``) still has the
   previous run's folder, untouched file for file (same bytes, same inode, same mtime), and its
   metrics file is untouched too; its temporary sibling may be left over, and the rerun removes
   it. ``train`` (its folder is ``persist: true`` so that checkpoints survive) has checkpoints
   but no final weights and no ``train_summary.json``;
3. the rerun's output is byte-identical (sha256 of every file) to the uninterrupted run's,
   ``train``'s weights and heads included. What is not compared: the timing fields of
   ``metrics.jsonl`` and ``train_summary.json``, and the TensorBoard event files (named after
   the wall clock).

Kill points. The tiny models make most stages finish within a second, which a poll would race,
so every case stops the stage at a chosen write: a ``sitecustomize`` put on the subprocess's
``PYTHONPATH`` (pipeline_helpers.Hold) wraps ``os.replace``, and when the destination matches the
case's pattern it writes a marker file and waits there, the temporary file complete but not yet
renamed, until it is killed. The test waits for the marker and SIGKILLs: the kill point is the
same on any machine, however fast or loaded. The patterns name the output folder as
``\\.?name[^/]*`` so they match a write into the final folder as well as into its temporary
sibling: a stage that wrote in place would be caught by assertion 2, not hang. ``train`` is held
at the write that would complete its checkpoint of step 3 (``trainer_state.json``): steps 1 and 2
are complete checkpoints, step 3's folder is half written, and the rerun must resume from step 2.

The DVC side of a killed train (``dvc repro`` killed, the lock, ``dvc repro`` resuming) is
tests/test_pipeline_reliability.py's; its helpers are reused here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_helpers import (
    Hold,
    _env,
    held_env,
    read_params,
    small_project,
    write_params,
)
from test_pipeline_reliability import _checkpoint_steps, _tail

pytestmark = pytest.mark.slow

TRAIN_STEPS = 4
# the grid cell dpo_spo_s0 (variant dpo_spo, seed 0), as dvc.yaml's stage train@dpo_spo-0 runs it
POLICY = "models/policy/dpo_spo_s0"
METRICS = "metrics/train_dpo_spo_s0.json"
TRAIN_ARGS = ("--variant", "dpo_spo", "--seed", "0")
# the same recipe (DPO + SPO) on two processes, in a folder of its own outside the grid
DDP_POLICY = "models/policy/ddp"
DDP_ARGS = ("-S", "train.loss=dpo", "-S", "train.spo.enabled=true",
            "-S", f"train.out_dir={DDP_POLICY}", "-S", "train.metrics_file=metrics/train_ddp.json")
# what `dvc repro judge` runs, in order, in one process (one import of torch for all of them)
CHAIN = [["prepare"], ["validate"], ["keywords"], ["degrees"], ["base_model"], ["sft"], ["reference"],
         ["train", "--variant", "dpo", "--seed", "0"], ["train", *TRAIN_ARGS], ["generate"], ["reward_model"],
         ["judge"]]
TIMING_KEYS = re.compile(r"per_s|seconds|memory")  # metrics.jsonl / train_summary.json fields that measure time
# a generous bound on a stage's rerun, which takes seconds: only a guard against a hang
RUN_HANG_GUARD_S = 1800
# where train is held and killed: the write that would complete the checkpoint of step 3
TRAIN_HELD_AT = r"/checkpoints/step-3/trainer_state\.json$"


# ------------------------------------------------------------------------------ helpers


def _spo(*args: str) -> list[str]:
    return [sys.executable, "-m", "spo", *args]


def _start(cmd: list[str], work: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``cmd`` in the background in its own session, stdout and stderr to ``log``."""
    with log.open("w") as handle:
        return subprocess.Popen(cmd, cwd=work, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process, its session's group and every descendant (torchrun starts its workers
    in sessions of their own, which a group kill would miss), then wait for all of them."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    # SIGKILL cannot be caught: these bounds only stop a test whose processes never die (a hang)
    proc.wait(timeout=300)
    _, alive = psutil.wait_procs(family, timeout=300)
    assert not alive, f"still running after SIGKILL: {alive}"


def _run(cmd: list[str], work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=RUN_HANG_GUARD_S)
    assert result.returncode == 0, f"{' '.join(cmd)} failed (rc {result.returncode}):\n{result.stderr[-6000:]}"
    return result


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hashes(path: Path, skip: re.Pattern | None = None) -> dict[str, str]:
    """sha256 of every file under ``path`` (provenance.json included), by relative path."""
    if path.is_file():
        return {"": _sha(path)}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and not (skip is not None and skip.search(rel)):
            out[rel] = _sha(p)
    return out


def _snapshot(*paths: Path) -> dict[str, tuple[str, int, int]]:
    """(sha256, inode, mtime) of every file under ``paths``: equal snapshots mean nothing was
    written, replaced or removed there, even with the same bytes."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            out[str(p)] = (_sha(p), st.st_ino, st.st_mtime_ns)
    return out


def _siblings(final: Path) -> list[Path]:
    """``atomic_dir``'s temporary folders beside ``final``."""
    return sorted(final.parent.glob(f".{final.name}.tmp-*"))


def _records(policy: Path) -> list[dict]:
    rows = [json.loads(line) for line in (policy / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not TIMING_KEYS.search(k)} for r in rows]


# ------------------------------------------------------------------------------ the upstream run


def _upstream_run(root: Path, data_dir: Path) -> Path:
    work = small_project(root)
    params = read_params(work)
    params["train"].update(save_steps=1, eval_steps=2, keep_checkpoints=2, resume=True)
    params["train"]["optim"]["max_steps"] = TRAIN_STEPS
    write_params(work, params)
    chain = f"from spo.cli import main\nfor argv in {CHAIN!r}:\n    assert main(argv) == 0, argv\n"
    _run([sys.executable, "-c", chain], work, _env(data_dir))
    return work


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, hh_slice: Path) -> Path:
    """A small project in which every stage up to ``judge`` ran once, uninterrupted: the inputs of
    each case and the outputs each rerun must reproduce. Training runs TRAIN_STEPS steps with a
    checkpoint after each (kept: the last 2). The cases only read it (each works on a copy).
    The stages run one after another in one process (``spo.cli.main``, as `dvc repro judge` would
    run them, in half the time); their outputs are the same bytes as separate ``spo`` processes'
    (the cases compare them with a separate process's output, so they would fail otherwise).

    Under pytest-xdist the workers share one such run (made by the first, under a file lock in
    the session's temporary folder) instead of making one each."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _upstream_run(tmp_path_factory.mktemp("kill_matrix"), hh_slice)
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "kill_matrix"
    with FileLock(f"{shared}.lock"):
        if not (shared / "done").is_file():
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
            _upstream_run(shared, hh_slice)
            (shared / "done").touch()
    return shared / "project"


@pytest.fixture
def project(pipeline: Path, tmp_path: Path) -> Path:
    """A copy of the upstream run for one case (the cases change outputs)."""
    return Path(shutil.copytree(pipeline, tmp_path / "project", symlinks=True))


# ------------------------------------------------------------------------------ stages written whole

# stage -> (its output folder, its metrics file, the write at which it is held and killed: a
# regex on os.replace's destination, and what that point is)
WHOLE = {
    "keywords": ("data/keywords", "metrics/keywords.json", r"/\.?keywords[^/]*/eval\.jsonl$",
                 "train.jsonl written, eval.jsonl complete in its temporary file, test.jsonl not started"),
    "degrees": ("data/degrees", "metrics/degrees.json", r"/\.?degrees[^/]*/eval\.jsonl$",
                "train.jsonl written, eval.jsonl complete in its temporary file, test.jsonl not started"),
    "sft": ("models/sft", "metrics/sft.json", r"/\.?sft[^/]*/provenance\.json$",
            "trained, weights and tokenizer saved, provenance.json not yet renamed"),
    "generate": ("outputs/generations", "metrics/generate.json", r"/\.?generations[^/]*/dpo_s0\.jsonl$",
                 "sft.jsonl written, dpo_s0.jsonl complete in its temporary file, dpo_spo_s0 not generated"),
    "reward_model": ("models/reward", "metrics/reward_model.json", r"/\.?reward[^/]*/provenance\.json$",
                     "trained, weights, value head and tokenizer saved, provenance.json not yet renamed"),
    "judge": ("outputs/judgments", "metrics/judge.json", r"/\.?judgments[^/]*/dpo_spo_s0_vs_chosen\.jsonl$",
              "dpo_s0_vs_chosen judged and written, dpo_spo_s0_vs_chosen in its temporary file, 2 comparisons left"),
}


@pytest.mark.parametrize("stage", list(WHOLE))
def test_killed_stage_leaves_its_previous_output_and_reruns_identically(
    stage: str, pipeline: Path, project: Path, tmp_path: Path, hh_slice: Path
) -> None:
    out_rel, metrics_rel, pattern, _ = WHOLE[stage]
    final, metrics = project / out_rel, project / metrics_rel
    expected = _hashes(pipeline / out_rel)
    assert expected and _hashes(final) == expected
    before = _snapshot(final, metrics)
    env, log, hold = _env(hh_slice), tmp_path / "killed.log", Hold(tmp_path / "hold", pattern)

    proc = _start(_spo(stage), project, held_env(env, tmp_path / "hold", hold), log)
    try:
        _, held = hold.wait(proc, log, f"the write matching {pattern!r}")
    finally:
        _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL, _tail(log)
    src = Path(held.split(" -> ")[0])
    assert src.is_file(), f"the held write's temporary file {src} must be there"

    # 2. the previous output and metrics, untouched; this run's work only in a temporary sibling
    after = _snapshot(final, metrics)
    changed = sorted(str(Path(k).relative_to(project))
                     for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the killed {stage} wrote, replaced or removed in place: {changed}"
    leftovers = _siblings(final)
    assert any(src.is_relative_to(p) for p in leftovers), (leftovers, src)
    print(f"{stage} killed at {src.relative_to(project)}; left beside {out_rel}:",
          sorted(str(f.relative_to(project)) for p in leftovers for f in p.rglob("*")))

    # 1. + 3. the rerun (no hook) ends well, removes the leftovers, and writes the same bytes
    _run(_spo(stage), project, env)
    assert not _siblings(final), _siblings(final)
    assert _hashes(final) == expected


# ------------------------------------------------------------------------------ train

# files of a policy folder that measure time: compared without their timing fields, or not at all
POLICY_SKIP = re.compile(r"^(metrics\.jsonl|train_summary\.json|tensorboard/.*)$")


def _assert_killed_policy(policy: Path, metrics_file: Path) -> int:
    """What a training run killed at TRAIN_HELD_AT leaves (2.): the complete checkpoints of steps 1
    and 2, step 3's half written (no trainer_state.json), no final output. The last complete step."""
    steps = _checkpoint_steps(policy)
    assert steps == [1, 2], steps
    assert (policy / "checkpoints" / "step-3").is_dir()
    assert not (policy / "checkpoints" / "step-3" / "trainer_state.json").exists()
    for name in ("model.safetensors", "degree_heads.safetensors", "train_summary.json", "provenance.json"):
        assert not (policy / name).exists(), f"the killed run left {name}: it would look finished"
    assert not metrics_file.exists()
    print(f"killed with checkpoints {steps} complete; in {policy.name}/checkpoints:",
          sorted(p.name for p in (policy / "checkpoints").iterdir()), "; beside them:",
          sorted(p.name for p in policy.iterdir() if p.name != "checkpoints"))
    return steps[-1]


def _assert_resumed(result: subprocess.CompletedProcess, policy: Path, last: int, reference: Path) -> None:
    """1. resumed at ``last`` and trained to the end; 3. the same bytes as the uninterrupted run."""
    resumed = re.findall(r"resuming from \S*checkpoints/step-(\d+) \(step (\d+) of (\d+)\)", result.stderr)
    assert resumed and all(r == (str(last), str(last), str(TRAIN_STEPS)) for r in resumed), \
        f"expected a resume from step {last}\n" + result.stderr[-6000:]
    summary = json.loads((policy / "train_summary.json").read_text())
    assert (summary["start_step"], summary["steps"]) == (last, TRAIN_STEPS)
    assert not (policy / "checkpoints").exists()  # keep_checkpoints_at_end: false
    expected = _hashes(reference, POLICY_SKIP)
    assert "model.safetensors" in expected and "degree_heads.safetensors" in expected
    assert _hashes(policy, POLICY_SKIP) == expected
    # every step logged once (the records after the checkpoint dropped and written again), the same values
    assert _records(policy) == _records(reference)
    ref_summary = json.loads((reference / "train_summary.json").read_text())
    assert summary["eval"] == ref_summary["eval"] and summary["tokens_total"] == ref_summary["tokens_total"]


def test_killed_train_resumes_from_its_last_checkpoint_bit_identically(
    pipeline: Path, project: Path, tmp_path: Path, hh_slice: Path
) -> None:
    policy, metrics_file = project / POLICY, project / METRICS
    shutil.rmtree(policy)
    metrics_file.unlink()
    env, log, hold = _env(hh_slice), tmp_path / "killed.log", Hold(tmp_path / "hold", TRAIN_HELD_AT)

    proc = _start(_spo("train", *TRAIN_ARGS), project, held_env(env, tmp_path / "hold", hold), log)
    try:
        hold.wait(proc, log, "the write completing the checkpoint of step 3")
    finally:
        _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL, _tail(log)
    last = _assert_killed_policy(policy, metrics_file)

    rerun = _run(_spo("train", *TRAIN_ARGS), project, env)
    _assert_resumed(rerun, policy, last, pipeline / POLICY)


def _torchrun(*args: str) -> list[str]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return [torchrun, "--standalone", "--nproc_per_node", "2", "--module", "spo", *args]


def test_killed_two_process_train_resumes_from_its_last_checkpoint_bit_identically(
    project: Path, tmp_path: Path, hh_slice: Path
) -> None:
    """Data parallel on two gloo processes (torchrun); the uninterrupted reference is a two-process
    run too (one process sums the gradients in another order)."""
    env = {**_env(hh_slice), "OMP_NUM_THREADS": "1"}
    policy, metrics_file = project / DDP_POLICY, project / "metrics/train_ddp.json"
    cmd = _torchrun("train", *DDP_ARGS)
    _run(cmd, project, env)
    assert json.loads((policy / "train_summary.json").read_text())["num_processes"] == 2
    reference = Path(shutil.move(policy, tmp_path / "reference"))
    metrics_file.unlink()

    log, hold = tmp_path / "killed.log", Hold(tmp_path / "hold", TRAIN_HELD_AT)
    proc = _start(cmd, project, held_env(env, tmp_path / "hold", hold), log)
    try:
        hold.wait(proc, log, "the write completing the checkpoint of step 3 (on rank 0)")
    finally:
        _kill_tree(proc)  # torchrun and both workers
    assert proc.returncode == -signal.SIGKILL, _tail(log)
    last = _assert_killed_policy(policy, metrics_file)

    rerun = _run(cmd, project, env)
    _assert_resumed(rerun, policy, last, reference)
