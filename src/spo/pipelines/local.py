"""``spo pipeline run-local``: the compiled pipeline run by ``kfp.local``, in real containers.

With ``runner="docker"`` every step runs in the project image through ``kfp.local.DockerRunner``
with no network (``network_mode="none"``) and the offline switches on; with ``"subprocess"``
the steps run in this Python environment (fast: unit tests). The input data is copied under
the pipeline root, which the runner mounts into every container at the same path.

Two things the local runner gets wrong are handled here:

* kubeflow/pipelines#13332: the runner starts containers with ``auto_remove=True``, so when a
  container exits fast, ``container.wait()`` can find it gone and the runner then reports exit
  code 0 — a failed task counted as a success. :func:`_checked_container` (patched in for the
  run) keeps the container until its exit code is read, then removes it.
* kfp.local 2.17's loop iterations (``kfp/local/orchestrator/task_spec_utils.py``,
  ``create_parameter_loop_iteration_task_spec``) replace *every* input of a ``ParallelFor`` that
  comes from another task's output parameter with the loop item, not only the list iterated
  over: the grid's loop, which iterates over compiled-in cells and also takes ``configure``'s
  train params text, would hand each cell a dict for its params. The KFP backend resolves the two
  apart (its driver reads ``parameterIterator.items`` alone). :func:`_loop_inputs_kept` (patched
  in for the run) restores the inputs that are not the iterated list after the call.
* file ownership: a non-root image user cannot write a pipeline root the host's root user made,
  so when the host user is root the roots are handed to the image's user and the containers run
  as that user (never as root); any other host user runs the containers as itself.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from spo.errors import InputError, StageFailed

log = logging.getLogger("spo.pipeline")

IMAGE_UID = 1000  # the project image's user (docker/Dockerfile)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "HOME": "/tmp"}


@dataclass
class LocalRun:
    """Where a local run left its artifacts: ``tasks[task][output]`` is a path under the run's root; a task
    of the grid's loop is ``<task>@<cell>`` (``train@dpo_spo_s0``)."""

    root: Path
    seconds: float
    tasks: dict[str, dict[str, Path]] = field(default_factory=dict)
    step_seconds: dict[str, float] = field(default_factory=dict)  # container wall time per task (DockerRunner)

    def output(self, task: str, name: str) -> Path:
        try:
            return self.tasks[task][name]
        except KeyError:
            raise KeyError(f"no output {name!r} of task {task!r} in {self.root} "
                           f"(tasks: {sorted(self.tasks)})") from None


def _task_of(command: list[str]) -> str:
    """The task a kfp.local container runs: its executor input's output file is <root>/<run>/<task>/..."""
    try:
        executor_input = json.loads(command[command.index("--executor_input") + 1])
        task = Path(executor_input["outputs"]["outputFile"]).parent
        # a task in a loop iteration (the grid's cells): <run>/for-loop-<n>-iteration-<i>/<task>/...
        return f"{task.parent.name}/{task.name}" if task.parent.name.startswith("for-loop") else task.name
    except (ValueError, IndexError, KeyError, TypeError):
        return "?"


def _checked_container(client: Any, image: str, command: list[str], volumes: dict[str, Any],
                       step_seconds: dict[str, float] | None = None, **run_args: Any) -> int:
    """``kfp.local``'s container run, with the exit code read before the container is removed;
    the container's wall time (start to exit) is recorded in ``step_seconds`` under its task."""
    # the submodule by name: a bare `import docker` resolves, for mypy and ruff's isort, to this
    # repository's docker/ folder (a namespace package), which has no `errors`
    import docker.errors
    from kfp.local import docker_task_handler

    run_args.pop("auto_remove", None)
    run_args.setdefault("network_mode", "none")  # never a bridge: no runner of ours asks for one
    image = docker_task_handler.add_latest_tag_if_not_present(image)
    if not any(image in (i.tags + i.attrs.get("RepoDigests", [])) for i in client.images.list()):
        raise StageFailed(f"image {image!r} is not on this Docker host and nothing is pulled here: build it "
                          "(`make image`) and pass its tag (--image, or the platform file's image)")
    started = time.perf_counter()
    container = client.containers.run(image=image, command=command, detach=True, stdout=True, stderr=True,
                                      volumes=volumes, auto_remove=False, **run_args)
    try:
        for line in container.logs(stream=True, follow=True):
            print(line.decode(errors="replace"), end="")
        return int(container.wait()["StatusCode"])
    finally:
        if step_seconds is not None:
            step_seconds[_task_of(command)] = time.perf_counter() - started
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass


@contextmanager
def _exit_codes_checked(step_seconds: dict[str, float]) -> Iterator[None]:
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = functools.partial(_checked_container, step_seconds=step_seconds)
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


def _loop_inputs_kept(original: Any) -> Any:
    """kfp.local's loop-iteration builder with the loop's other task-output inputs left alone (see
    the module docstring): only the list a loop iterates over (``items.input_parameter``; none for
    compiled-in items) becomes the item."""
    def build(task_spec: Any, loop_item: Any, loop_task_name: str) -> Any:
        iterated = task_spec.parameter_iterator.items.input_parameter
        kept = {name: spec for name, spec in task_spec.inputs.parameters.items()
                if spec.HasField("task_output_parameter") and name != iterated}
        built = original(task_spec, loop_item, loop_task_name)
        for name, spec in kept.items():
            built.inputs.parameters[name].CopyFrom(spec)
        return built

    return build


@contextmanager
def _kfp_local_fixed(step_seconds: dict[str, float]) -> Iterator[None]:
    """The run with both kfp.local fixes of the module docstring patched in, and taken out after."""
    from kfp.local.orchestrator import task_spec_utils

    original = task_spec_utils.create_parameter_loop_iteration_task_spec
    task_spec_utils.create_parameter_loop_iteration_task_spec = _loop_inputs_kept(original)
    try:
        with _exit_codes_checked(step_seconds):
            yield
    finally:
        task_spec_utils.create_parameter_loop_iteration_task_spec = original


def _runner(kind: str, root: Path, workspace: Path) -> Any:
    from kfp import local

    if kind == "subprocess":
        return local.SubprocessRunner(use_venv=False)
    user = None
    if os.getuid() == 0:  # root made the folders: hand them to the image's user, run as that user
        for folder in (root, workspace):
            for path in [folder, *folder.rglob("*")]:
                os.chown(path, IMAGE_UID, IMAGE_UID)
    else:
        user = f"{os.getuid()}:{os.getgid()}"
    # no network, no capabilities (not even in the bounding set), no privilege escalation
    kwargs: dict[str, Any] = {"network_mode": "none", "environment": dict(OFFLINE_ENV), "cap_drop": ["ALL"],
                              "security_opt": ["no-new-privileges"]}
    if user:
        kwargs["user"] = user
    return local.DockerRunner(**kwargs)


def run_local(pipeline_yaml: str | Path, work_dir: str | Path, *, data_dir: str | Path | None = None,
              runner: Literal["docker", "subprocess"] = "docker",
              arguments: Mapping[str, Any] | None = None) -> LocalRun:
    """Run the compiled pipeline under ``kfp.local``; raise :class:`StageFailed` when a task fails.

    ``work_dir`` receives the pipeline root (artifacts), the workspace and the copied input data;
    ``arguments`` are pipeline parameters (the knobs, ``overrides``).
    """
    from kfp import components, local

    pipeline_yaml = Path(pipeline_yaml)
    if not pipeline_yaml.is_file():
        raise InputError(f"{pipeline_yaml}: compiled pipeline not found (run `spo pipeline compile` first)")
    work = Path(work_dir).resolve()
    root, workspace = work / "root", work / "workspace"
    for folder in (root, workspace):
        folder.mkdir(parents=True, exist_ok=True)
    args = dict(arguments or {})
    if data_dir is not None:
        inputs = root / "input-data"
        shutil.copytree(data_dir, inputs, dirs_exist_ok=True)  # under the root: mounted in every container
        args["data_dir"] = str(inputs)
    local.init(runner=_runner(runner, root, workspace), pipeline_root=str(root), workspace_root=str(workspace),
               raise_on_error=True)
    pipeline = components.load_component_from_file(str(pipeline_yaml))
    started = time.perf_counter()
    before = set(root.iterdir())
    step_seconds: dict[str, float] = {}
    try:
        with _kfp_local_fixed(step_seconds):
            pipeline(**args)
    except RuntimeError as err:  # kfp.local's "Task ... finished with status FAILURE"
        raise StageFailed(f"local pipeline run failed: {err}") from None
    seconds = time.perf_counter() - started
    run_roots = [p for p in root.iterdir() if p not in before and p.is_dir() and p.name != "input-data"]
    if len(run_roots) != 1:
        raise StageFailed(f"{root}: expected one new run folder, found {[p.name for p in run_roots]}")
    run = LocalRun(run_roots[0], seconds, step_seconds=step_seconds)
    for task in sorted(p for p in run.root.iterdir() if p.is_dir()):
        if not task.name.startswith("for-loop"):
            run.tasks[task.name] = _outputs(task)
            continue
        for inner in sorted(p for p in task.iterdir() if p.is_dir()):  # a cell of the grid: <task>@<cell>
            name = f"{inner.name}@{_cell(inner)}"
            run.tasks[name] = _outputs(inner)
            if f"{task.name}/{inner.name}" in step_seconds:
                step_seconds[name] = step_seconds.pop(f"{task.name}/{inner.name}")
    log.info("pipeline run-local (%s): %d tasks in %.1f s -> %s", runner, len(run.tasks), seconds, run.root)
    return run


def _outputs(task: Path) -> dict[str, Path]:
    return {out.name: out for out in task.iterdir() if out.name != "executor_output.json"}


def _cell(task: Path) -> str:
    """The cell a loop iteration's task trained: the metadata its outputs carry (runtime.mark_cell)."""
    from spo.pipelines.runtime import CELL

    written = json.loads((task / "executor_output.json").read_text(encoding="utf-8"))
    for output in written.get("artifacts", {}).values():
        for artifact in output.get("artifacts", []):
            if (artifact.get("metadata") or {}).get(CELL):
                return str(artifact["metadata"][CELL])
    raise StageFailed(f"{task}: a loop iteration's task whose outputs name no cell")


def summary(run: LocalRun) -> dict[str, Any]:
    """The run's headline numbers (what `spo pipeline run-local` prints as JSON)."""
    out: dict[str, Any] = {"root": str(run.root), "seconds": round(run.seconds, 1), "tasks": sorted(run.tasks)}
    if run.step_seconds:
        out["step_seconds"] = {task: round(s, 2) for task, s in sorted(run.step_seconds.items())}
    judge = run.tasks.get("judge", {}).get("metrics")
    if judge is not None and judge.is_file():
        judged = json.loads(judge.read_text())
        out["win_rates"] = {k: v.get("win_rate") for k, v in judged.items()
                            if isinstance(v, dict) and "win_rate" in v}  # not the paired differences
        out["grid"] = {k: v.get("win_rate") for k, v in (judged.get("grid") or {}).items()}  # pooled over seeds
    return out
