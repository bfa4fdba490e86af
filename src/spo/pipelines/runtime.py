"""What a pipeline component runs inside its container: config in, stage out, artifacts back.

A component (spo.pipelines.components) is a few lines: it hands its task's artifacts to
:func:`run_step`, which places each at the config key the stage table (spo.stages.table) names,
builds the stage's :class:`~spo.config.SpoConfig` from the pipeline's ``params.yaml`` text and
those paths (:func:`run_stage`), and calls the same ``spo.stages.<stage>.run(cfg)`` that
``dvc repro`` calls. Nothing about a stage lives here.

A ``Model`` artifact holds the model folder itself, as ``dvc repro`` writes it, and KFP uploads
it to the artifact store like any other artifact (:func:`write_model` / :func:`model_dir`). So
every step's result lives in storage that outlives its run, and every step but ``publish`` can be
taken from KFP's cache: a rerun whose data and params are unchanged reuses the earlier run's
weights, as ``dvc repro`` reuses its cache. ``train`` checkpoints on the platform's checkpoint
volume when it names one (a retried, pre-empted task resumes; :func:`train_folder`); only
a TrainJob with no checkpoint volume uses the run's own workspace volume, whose per-run name
keeps it out of KFP's cache.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spo.errors import WorkspaceNotWritable

# the pipeline's knobs: parameter -> the params keys it sets (the grid itself is compiled in: spo.pipelines.dag)
KNOBS: dict[str, tuple[str, ...]] = {
    "data_dir": ("data.local_dir",),
    "dataset": ("data.dataset",),
    "model": ("model.name_or_path",),
    "n_levels": ("degrees.n_levels",),
    "spo_lambda": ("train.spo.lambda_w", "train.spo.lambda_l"),
    "train_steps": ("train.optim.max_steps",),
    "judge_backend": ("judge.backend",),
    "judge_model": ("judge.openai.model",),
}


def resolve(params: str, overrides: Sequence[str], knobs: Mapping[str, Any]) -> Any:
    """The run's whole config: params text, then overrides, then the knobs (which win)."""
    sets = [f"{key}={json.dumps(knobs[name] if name != 'data_dir' else knobs[name] or None)}"
            for name, keys in KNOBS.items() if name in knobs for key in keys]
    return stage_config(params, [*overrides, *sets], {})


def grid_of(cfg: Any) -> dict[str, Any]:
    """What fixes the pipeline's train tasks: each cell's name and settings (the loop's items)."""
    return {cell.name: cfg.cell_settings(cell.variant, cell.seed) for cell in cfg.cells()}


def check_same_grid(resolved: Any, compiled_params: str) -> None:
    """Fail before any work when the run's grid is not the one compiled into the pipeline: the
    train tasks (one per cell, with that cell's settings) are fixed at compile time."""
    from spo.errors import ConfigError

    compiled, run = grid_of(stage_config(compiled_params, [], {})), grid_of(resolved)
    if compiled != run:
        changed = sorted(name for name in set(compiled) | set(run) if compiled.get(name) != run.get(name))
        raise ConfigError(f"the run's grid differs from the compiled pipeline's in {', '.join(changed)}: the train "
                          "tasks (one per cell of variants x grid.seeds) are fixed when the pipeline is compiled. "
                          "Change variants or grid.seeds in the params file and compile again (spo pipeline "
                          "compile/submit do it)")


def configure(params: str, overrides: Sequence[str], knobs: Mapping[str, Any],
              compiled_params: str | None = None) -> tuple[str, ...]:
    """One params text per stage (in the stage table's order, each with the sections
    :func:`spo.stages.table.sections` gives it), from the run's resolved config, then the run's
    whole params.yaml (:func:`params_all`). The run's grid must be the one compiled in
    (``compiled_params``; by default ``params``)."""
    import yaml

    from spo.stages.table import TABLE, sections

    resolved = resolve(params, overrides, knobs)
    check_same_grid(resolved, compiled_params or params)
    dumped = resolved.model_dump(mode="json", by_alias=True)
    stages = tuple(yaml.safe_dump({k: dumped[k] for k in sections(row)}, sort_keys=True) for row in TABLE)
    return (*stages, params_all(params, resolved))


def params_all(params: str, resolved: Any) -> str:
    """The run's params.yaml, as DVC reads it for dvc.lock: the given text itself (comments and
    all) when the overrides and knobs change nothing, else the whole resolved config."""
    import yaml

    dumped = resolved.model_dump(mode="json", by_alias=True)
    if stage_config(params, [], {}).model_dump(mode="json", by_alias=True) == dumped:
        return params
    return "# the run's resolved params (params.yaml + overrides + pipeline knobs)\n" + yaml.safe_dump(
        dumped, sort_keys=False, allow_unicode=True)


def stage_config(params: str, overrides: Sequence[str], paths: Mapping[str, Any]) -> Any:
    """``params`` (the text of a params.yaml) + ``overrides`` (``section.key=value``) + this
    task's paths, validated as one :class:`~spo.config.SpoConfig` (unknown keys are errors)."""
    from spo.config import load_config

    with tempfile.TemporaryDirectory(prefix="spo-params-") as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(params, encoding="utf-8")
        placed = [f"{key}={json.dumps(value)}" for key, value in paths.items()]
        return load_config(path, [*overrides, *placed])


def run_stage(stage: str, params: str, paths: Mapping[str, Any]) -> dict[str, Any]:
    """Run ``spo.stages.<stage>.run`` on the task's config (logging as ``spo <stage>`` does), after
    checking that a task placed on GPUs can use them (spo.accelerator)."""
    import logging

    from spo.accelerator import require_placed_gpus
    from spo.stages import load_stage

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    require_placed_gpus()  # a task placed on GPUs that cannot use them stops here, not after hours on the CPU
    return load_stage(stage).run(stage_config(params, [], paths))


def path_defaults() -> dict[str, str]:
    """Every config key that holds a path -> its default: where ``dvc repro`` puts each output in
    a checkout (the stage table's keys; dvc.yaml is checked against them)."""
    from spo.config import SpoConfig
    from spo.stages.table import TABLE

    dumped = SpoConfig().model_dump(mode="json", by_alias=True)
    keys = {i.key for row in TABLE for i in row.inputs} | {o.key for row in TABLE for o in row.outputs}
    found: dict[str, str] = {}
    for key in keys:
        value: Any = dumped
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, str):
            found[key] = value
    return found


def run_step(stage: str, params: str, artifacts: Mapping[str, Any], *,
             settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run ``stage`` on its task's artifacts, each placed at the config key the stage table names.

    ``artifacts`` maps the component's parameter names to its input and output artifacts (a list
    for an input collected from every cell of a per-cell stage); ``settings`` are further config
    values (they win over the paths). After the stage, ``Model`` outputs get their metadata,
    ``Metrics`` outputs their scalars, and a file the stage wrote inside or beside another output is
    copied onto its own artifact.
    """
    from spo.stages.table import checkout_path, producer
    from spo.stages.table import stage as row_of

    row = row_of(stage)
    defaults = path_defaults()
    with tempfile.TemporaryDirectory(prefix=f"spo-{stage}-") as scratch:
        paths: dict[str, Any] = {}
        for item in row.inputs:
            _, source = producer(item.source)
            given = artifacts[item.name]
            if not item.gather:
                paths[item.key] = _location(given, source.kind, source.file, item.file)
                continue
            folder = paths.setdefault(item.key, str(Path(scratch, item.key)))
            for artifact in given if isinstance(given, list) else [given]:
                cell = cell_of(artifact) if source.per_cell else ""
                name = checkout_path(item.source, defaults, cell).rsplit("/", 1)[-1]
                _place_input(_location(artifact, source.kind, source.file, item.file), Path(folder) / name,
                             link=source.kind == "Model")
        for out in row.outputs:
            if out.inside:
                paths[out.key] = str(Path(scratch, out.key))
            elif not out.beside:
                paths[out.key] = "/".join(part for part in (artifacts[out.name].path, out.file) if part)
        paths.update(settings or {})
        result = run_stage(stage, params, paths)
        for out in row.outputs:
            artifact = artifacts[out.name]
            if out.inside:
                copy_file(Path(paths[out.key], out.inside), artifact.path)
            elif out.beside:
                copy_file(Path(paths[out.key]).parent / out.beside, artifact.path)
            if out.kind == "Model":
                write_model(artifact, paths[out.key])
            elif out.kind == "Metrics":
                log_metrics(artifact, artifact.path)
    return result


CELL = "cell"  # the metadata key naming the cell a per-cell task's artifact belongs to


def mark_cell(cell: str, *artifacts: Any) -> None:
    """Name the cell on a per-cell task's outputs: the steps that collect them (generate, report,
    publish) place each where ``dvc repro`` would, whatever order the loop's list comes in."""
    for artifact in artifacts:
        artifact.metadata[CELL] = cell


def cell_of(artifact: Any) -> str:
    """The cell a collected artifact belongs to (:func:`mark_cell`)."""
    cell = (artifact.metadata or {}).get(CELL)
    if not isinstance(cell, str) or not cell:
        raise ValueError(f"{artifact.uri or artifact.path}: a per-cell artifact without its cell in the metadata "
                         "(written by a train task of an older pipeline? compile the pipeline again)")
    return cell


def published_outputs(artifacts: Mapping[str, Any]) -> dict[str, str]:
    """Checkout path -> artifact path for every output of the run, from ``publish``'s inputs
    (named ``<stage>_<output>``, :func:`spo.stages.table.published`; a per-cell one is a list)."""
    from spo.stages.table import checkout_path, producer, published

    defaults = path_defaults()
    outputs: dict[str, str] = {}
    for name, source in published():
        _, out = producer(source)
        given = artifacts[name]
        for artifact in given if isinstance(given, list) else [given]:
            cell = cell_of(artifact) if out.per_cell else ""
            outputs[checkout_path(source, defaults, cell)] = _location(artifact, out.kind, out.file)
    return outputs


def _location(artifact: Any, kind: str, *files: str) -> str:
    """Where a written artifact's content lies: a ``Model``'s folder, else its path; then the
    named file inside it, if any (a single-file output is kept inside its artifact's folder)."""
    folder = model_dir(artifact) if kind == "Model" else artifact.path
    return "/".join(part for part in (folder, *files) if part)


def _place_input(source: str, target: Path, *, link: bool) -> None:
    """One input in a gathered folder: a model folder as a symbolic link (no second copy of the
    weights), a file copied."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        target.symlink_to(Path(source).resolve(), target_is_directory=True)
    else:
        shutil.copyfile(source, target)


def data_version(params: str) -> str:
    """The content of the data files ``prepare`` will read, as ``{split: sha256}`` JSON.

    KFP's cache key of ``prepare`` holds its params and the *name* of the data volume it mounts
    (backend/src/v2/driver/container.go, 2.17.0), not what the volume holds: data copied anew
    onto the same PVC would be answered with the old run's prepared rows. This digest, computed
    by an uncached step that mounts the volume and handed to ``prepare`` as an input, puts the
    data's content into that key: new data reruns prepare and everything after it, the same bytes
    copied again do not. ``""`` when the data come from the hub (their revision is in the params).
    """
    import logging

    from spo.data.loading import read_raw

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _, source = read_raw(stage_config(params, [], {}).data)  # hashes the files it would read, reads no row
    if source["kind"] != "local":
        return ""
    digests = {split: file["sha256"] for split, file in sorted(source["files"].items())}
    logging.getLogger("spo.data_version").info("%s", ", ".join(
        f"{split} {source['files'][split]['path']} sha256 {sha[:12]}" for split, sha in digests.items()))
    return json.dumps(digests, sort_keys=True)


def log_metrics(artifact: Any, path: str | Path) -> None:
    """The numbers of a stage's metrics file as the ``Metrics`` artifact's scalars (the KFP UI's
    metrics table): top-level and one level of nesting, dotted (``train.loss``)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    for key, value in _scalars(data):
        artifact.log_metric(key, value)


def _scalars(data: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    if isinstance(data, Mapping) and depth < 2:
        for key, value in data.items():
            out += _scalars(value, f"{prefix}{key}.", depth + 1)
    elif isinstance(data, (int, float)) and not isinstance(data, bool) and data == data:
        out.append((prefix.rstrip("."), float(data)))
    return out


def check_writable(workspace: str | Path) -> None:
    """Fail at once, saying why and what to change, when this task cannot write on the workspace.

    A freshly provisioned block volume (EBS, PD, Azure Disk, Ceph RBD) has a root-owned 0755 root,
    and KFP sets no ``fsGroup`` on task pods (kubeflow/pipelines#3866) that would hand it to the
    image's uid 1000; without this check the first write would fail with a bare PermissionError,
    on every retry, after the step's GPUs were scheduled.
    """
    import os
    import uuid

    root = Path(workspace)
    probe = root / f".spo-write-check-{uuid.uuid4().hex}"
    try:
        root.mkdir(parents=True, exist_ok=True)  # KFP mounts it; a local run (kfp.local, tests) may not have it yet
        probe.write_bytes(b"")
        probe.unlink()
    except PermissionError:
        try:
            st = root.stat()
            found = f"owned by uid {st.st_uid} gid {st.st_gid}, mode {st.st_mode & 0o7777:04o}"
        except OSError as err:
            found = f"not readable ({err.strerror})"
        raise WorkspaceNotWritable(
            f"the volume {root} is not writable by this task (uid {os.getuid()}, gid {os.getgid()}, groups "
            f"{sorted(os.getgroups())}): it is {found}. KFP sets no fsGroup on task pods, and a new block volume's "
            "root belongs to root. Fix: for the checkpoint PVC the Helm chart creates, its volume-permissions hook "
            "makes the root group-writable (storage.checkpoints.taskGroup: the task's gid); for any other PVC, a "
            "StorageClass whose volumes are group- or world-writable (NFS, CephFS, EFS, Filestore), or a root "
            "handed to gid 1000 once (docs/operations.md, \"Before you install\")") from None


def run_folder(checkpoints: str | Path) -> Path:
    """This run's folder on the checkpoint volume (spo.kube.platform.CheckpointVolume):
    ``<checkpoints>/<run name>``, the same for every retry of a task of this run, checked writable."""
    import os

    from spo.kube.platform import RUN_NAME_ENV, WORKFLOW_LABEL

    run = os.environ.get(RUN_NAME_ENV, "").strip()
    if not run or "/" in run or run in (".", ".."):
        raise RuntimeError(f"{RUN_NAME_ENV} is {run!r}: a train step on the checkpoint volume {checkpoints} needs the "
                           f"run's name, which the compiled pipeline sets from the pod label {WORKFLOW_LABEL} (compile "
                           "the pipeline with this version of spo)")
    check_writable(checkpoints)
    return Path(checkpoints, run)


@contextmanager
def train_folder(checkpoints: str, name: str, artifact_path: str) -> Iterator[str]:
    """Where a single-pod train task trains ``name``.

    On the checkpoint volume (``checkpoints``: its mount path), ``<run>/<name>`` there: a retried
    task of this run resumes from the checkpoints it left, and the folder is removed once the
    block succeeds (the model is then in the artifact store). With no checkpoint volume
    (``""``), the ``Model`` artifact's own path, in the pod's scratch: nothing is copied, and a
    retried task starts over. Either way the task mounts no per-run volume, so KFP can take it
    from its cache (see :class:`~spo.kube.platform.CheckpointVolume`).
    """
    import logging

    if not checkpoints:
        logging.getLogger("spo.train").info("no checkpoint volume in the platform file: training in the task's "
                                            "scratch space; a retried task starts over")
        yield artifact_path
        return
    run = run_folder(checkpoints)
    folder = run / name
    folder.mkdir(parents=True, exist_ok=True)
    yield str(folder)
    discard_run_files(folder, run)


def discard_run_files(folder: str | Path, run: str | Path) -> None:
    """Remove a finished task's ``folder`` from the checkpoint volume, then each emptied folder
    above it up to the run's own (``run``): the volume keeps only unfinished work."""
    folder, run = Path(folder), Path(run)
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if parent != run and run not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty: another task of the run is still there
            break


def write_model(artifact: Any, folder: str | Path | None = None) -> None:
    """Make the ``Model`` artifact hold the model folder: ``folder`` copied onto its path (none:
    the stage wrote it there), with the count, size and a sha256 of its files as metadata (what
    the KFP UI shows; lineage then sees the weights' content, not only their size)."""
    import hashlib

    from spo.io import tree_sha256

    target = Path(artifact.path)
    if folder is not None and Path(folder).resolve() != target.resolve():
        if target.exists():  # a retried task: the artifact holds this attempt's folder only
            shutil.rmtree(target)
        shutil.copytree(folder, target)
    files = tree_sha256(target)
    if not files:
        raise FileNotFoundError(f"{folder or target}: the stage wrote no model files")
    digest = hashlib.sha256("".join(f"{name}\0{sha}\n" for name, sha in sorted(files.items())).encode()).hexdigest()
    artifact.metadata.update({"files": len(files),
                              "bytes": sum(p.stat().st_size for p in target.rglob("*") if p.is_file()),
                              "sha256": digest})


def model_dir(artifact: Any) -> str:
    """The model folder a ``Model`` artifact holds (see :func:`write_model`)."""
    folder = Path(artifact.path)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise FileNotFoundError(f"{artifact.path}: the Model artifact holds no model folder (written by "
                                "spo.pipelines.runtime.write_model)")
    return str(folder)


def copy_file(source: str | Path, target: str | Path) -> None:
    """Copy one stage output onto an artifact path (HTML/Markdown artifacts are single files)."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def html_image(png: str | Path, target: str | Path, title: str) -> None:
    """A PNG as a self-contained HTML page (an ``HTML`` artifact the KFP UI renders)."""
    import base64
    import html

    data = base64.b64encode(Path(png).read_bytes()).decode() if Path(png).is_file() else ""
    body = f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">' if data else "<p>no image</p>"
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text(f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>{body}\n",
                            encoding="utf-8")
