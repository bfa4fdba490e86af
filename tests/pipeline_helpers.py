"""Helpers shared by the tests that run the DVC pipeline in a throwaway project copy.

Not a test module: imported as ``from pipeline_helpers import ...`` (pytest puts tests/ on
sys.path, as for ``conftest`` and ``judge_server``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import REPO

DVC = (sys.executable, "-m", "dvc")


def _env(data_dir: Path) -> dict[str, str]:
    """The environment of a stage / dvc subprocess: the data samples in data_dir, this venv first on PATH."""
    env = dict(os.environ)
    env["SPO_DATA_DIR"] = str(data_dir)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _project_copy(tmp_path: Path) -> Path:
    """A throwaway checkout: the pipeline definition, params and the code DVC hashes as deps."""
    work = tmp_path / "project"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (work / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", work / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "plots", work / ".dvc" / "plots")  # the custom plot templates
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    return work


def shrink_params(params: dict[str, Any]) -> dict[str, Any]:
    """Make every model stage tiny: a very small model, short sequences, a few optimizer steps.

    Edits (and returns) a params.yaml mapping; the whole 12-stage `dvc repro` then runs in
    about 1.5 minutes on two CPU cores.
    """
    params["model"]["tiny"].update(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
    )
    small = {"max_length": 96, "max_prompt_length": 64}
    params["sft"].update(small, eval_steps=2, eval_rows=8, sample_prompts=1)
    params["sft"]["optim"].update(max_steps=3, batch_size=4, micro_batch_size=4)
    params["train"].update(small, eval_steps=1, eval_rows=8, save_steps=1, logging_steps=1)
    params["train"]["optim"].update(max_steps=2, batch_size=4, micro_batch_size=2)
    params["train"]["spo"]["hidden_size"] = 16
    params["generate"].update(max_prompts=6, batch_size=4, max_prompt_length=64)
    params["generate"]["sampling"]["max_new_tokens"] = 8
    params["reward_model"].update(small)
    params["reward_model"]["optim"].update(max_steps=2, batch_size=4, micro_batch_size=4)
    params["judge"]["bootstrap_samples"] = 100
    return params


def read_params(work: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((work / "params.yaml").read_text())


def write_params(work: Path, params: dict[str, Any]) -> None:
    import yaml

    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def small_project(tmp_path: Path) -> Path:
    """A project copy whose params.yaml has the tiny settings of :func:`shrink_params`."""
    work = _project_copy(tmp_path)
    write_params(work, shrink_params(read_params(work)))
    return work


def _dvc_out(work: Path, *args: str, env: dict[str, str]) -> str:
    """``dvc ARGS`` in ``work``; its stdout (the test fails with dvc's output when dvc does)."""
    import pytest

    result = subprocess.run([*DVC, *args], cwd=work, env=env, capture_output=True, text=True)
    if result.returncode:
        pytest.fail(f"dvc {' '.join(args)} failed in {work}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def lock_outs(work: Path) -> dict[str, Path]:
    """Every output ``work``'s dvc.lock records (dvc path -> where it is in ``work``)."""
    import yaml

    lock = yaml.safe_load((work / "dvc.lock").read_text())
    return {out["path"]: work / out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def tree_bytes(path: Path) -> dict[str, bytes]:
    """A file's bytes, or a folder's files' bytes by relative path."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def fresh_clone(tmp: Path, remote: list[list[str]], env: dict[str, str]) -> Path:
    """A checkout of the project as a laptop has it: the definition and code, the repository's own
    params.yaml (a cluster run's bundle brings the run's), the committed .gitignore files, compiled
    ``__pycache__`` in code folders, the DVC remote set up by ``dvc remote ARGS`` for each of
    ``remote``; no outputs, no dvc.lock."""
    clone = tmp / "clone"
    clone.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, clone / name)
    shutil.copytree(REPO / "src", clone / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for code in ("src/spo/models", "src/spo/judging", "src/spo/stages"):  # what running spo leaves behind
        (clone / code / "__pycache__").mkdir()
        (clone / code / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\x00compiled")
    (clone / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", clone / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "plots", clone / ".dvc" / "plots")
    for ignore in ("models/.gitignore", "models/policy/.gitignore", "outputs/.gitignore"):
        if (REPO / ignore).is_file():
            (clone / ignore).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / ignore, clone / ignore)
    subprocess.run(["git", "init", "-q"], cwd=clone, check=True)
    for args in remote:
        _dvc_out(clone, "remote", *args, env=env)
    return clone


def pull_and_check(clone: Path, bundle: Path, outputs_from: Path | None, remote: str, env: dict[str, str]) -> None:
    """The laptop side of a cluster run: unpack its results.tar.gz, ``dvc pull``; then every output
    the lock records is byte-identical to the one in ``outputs_from`` (when given), ``dvc status``
    (which hashes every output afresh) is clean and ``dvc repro`` has nothing to run."""
    import json

    from spo.lineage.dvc_sync import unpack_run_bundle

    written = unpack_run_bundle(bundle, clone)
    assert {"dvc.lock", "params.yaml", "metrics/judge.json", "reports/report.md"} <= set(written)
    _dvc_out(clone, "pull", "-q", "-r", remote, env=env)
    outs = lock_outs(clone)
    assert len(outs) >= 20, sorted(outs)
    for path in outs if outputs_from is not None else ():
        assert tree_bytes(clone / path) == tree_bytes(outputs_from / path), path  # byte-identical, file for file
    assert json.loads(_dvc_out(clone, "status", "--json", env=env)) == {}
    dry = _dvc_out(clone, "repro", "--dry", env=env)
    assert "Running stage" not in dry and "didn't change" in dry, dry


# ------------------------------------------------------------------------------ holding a subprocess

# A generous bound on waiting for a subprocess (a stage, `dvc repro`) to reach a point it always
# reaches in seconds: only a guard against a genuine hang, never a measure of speed (a loaded
# 2-core machine may take minutes to import torch, yet never this long).
HANG_GUARD_S = 1800

HOLD_HOOK = '''
"""Test hook (tests/pipeline_helpers.py, Hold): stop this process at a chosen point.

SPO_TEST_HOLD_REPLACE=<regex>: at the first os.replace whose destination matches, the file
complete but not yet renamed. SPO_TEST_HOLD_DVC_LOCK_MARKER set: once DVC's repository lock
(.dvc/tmp/lock) has been taken the first time. Either writes <prefix>_MARKER ("<pid> <what>"),
then waits until <prefix>_RELEASE exists, or, without one, until the test kills it. Once per
marker, across processes (the first to claim it holds); an orphaned holder exits.
"""
import os, re, time

_real_replace = os.replace


def _hold(prefix, what):
    marker = os.environ[prefix + "_MARKER"]
    try:
        os.close(os.open(marker + ".claim", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    with open(marker + ".tmp", "w") as handle:
        handle.write(f"{os.getpid()} {what}\\n")
    _real_replace(marker + ".tmp", marker)  # the marker appears whole
    release, parent = os.environ.get(prefix + "_RELEASE"), os.getppid()
    while not (release and os.path.exists(release)):
        if os.getppid() != parent:
            os._exit(70)  # the test that held us is gone: never carry on unobserved
        time.sleep(0.05)


_pattern = os.environ.get("SPO_TEST_HOLD_REPLACE")
if _pattern:
    _rx = re.compile(_pattern)

    def _held_replace(src, dst, *args, **kwargs):
        target = os.path.abspath(os.fspath(dst))
        if _rx.search(target):
            _hold("SPO_TEST_HOLD_REPLACE", f"{os.path.abspath(os.fspath(src))} -> {target}")
        return _real_replace(src, dst, *args, **kwargs)

    os.replace = _held_replace

if os.environ.get("SPO_TEST_HOLD_DVC_LOCK_MARKER"):
    import dvc.lock as _dvc_lock

    _do_lock = _dvc_lock.Lock._do_lock

    def _held_do_lock(self):
        _do_lock(self)
        if os.path.basename(self.lockfile) == "lock":  # the repository lock, not rwlock.lock
            _hold("SPO_TEST_HOLD_DVC_LOCK", f"holds {self.lockfile}")

    _dvc_lock.Lock._do_lock = _held_do_lock
'''


@dataclass(frozen=True)
class Hold:
    """A point where a subprocess started with :func:`held_env` stops, so that a test acts on it
    there (kills it, or runs something against it) at that exact point instead of racing it with
    a poll: at the first ``os.replace`` onto a path matching ``pattern``, or (``pattern`` None)
    once it holds DVC's repository lock. ``releasable``: it carries on after :meth:`release`;
    otherwise it waits there until killed."""

    folder: Path
    pattern: str | None = None
    releasable: bool = False

    @property
    def prefix(self) -> str:
        return "SPO_TEST_HOLD_REPLACE" if self.pattern is not None else "SPO_TEST_HOLD_DVC_LOCK"

    @property
    def marker(self) -> Path:
        return self.folder / f"{self.prefix.lower()}.held"

    @property
    def release_file(self) -> Path:
        return self.folder / f"{self.prefix.lower()}.release"

    def env(self) -> dict[str, str]:
        env = {f"{self.prefix}_MARKER": str(self.marker)}
        if self.pattern is not None:
            env[self.prefix] = self.pattern
        if self.releasable:
            env[f"{self.prefix}_RELEASE"] = str(self.release_file)
        return env

    def wait(self, proc: subprocess.Popen, log: Path, what: str) -> tuple[int, str]:
        """Until the process is held here: (the held process's pid, what it holds). Fails if ``proc``
        ends first; HANG_GUARD_S only stops a run that hangs before getting there."""
        import time

        import pytest

        deadline = time.monotonic() + HANG_GUARD_S  # a hang guard, not a speed limit: see HANG_GUARD_S
        while not self.marker.is_file():
            if proc.poll() is not None:
                text = log.read_text(errors="replace")[-6000:] if log.exists() else ""
                pytest.fail(f"the process ended (rc {proc.returncode}) before {what}\n{text}")
            if time.monotonic() > deadline:
                pytest.fail(f"hung: no {what} after {HANG_GUARD_S} s")
            time.sleep(0.02)
        pid, held = self.marker.read_text().rstrip("\n").split(" ", 1)
        return int(pid), held

    def release(self) -> None:
        assert self.releasable, "this hold lasts until the process is killed"
        self.release_file.touch()


def held_env(env: dict[str, str], folder: Path, *holds: Hold) -> dict[str, str]:
    """``env`` with the hook of :data:`HOLD_HOOK` first on PYTHONPATH (every Python process started
    with it, and their children, imports it as ``sitecustomize``) and ``holds`` set up."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(HOLD_HOOK)
    held = {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)}
    for hold in holds:
        held.update(hold.env())
    return held
