"""The pipeline's train step as a TrainJob: what the launcher task runs in its (CPU) pod.

The trainer pods see only one volume — the platform's checkpoint volume (in this run's folder
on it), else the run's workspace — so the task first puts there what they read: the stage's
params text and copies of the input datasets and of the SFT model (artifacts KFP downloaded
into this pod). It resolves the stage config here — a bad value fails in seconds, not after 16
GPUs were scheduled — builds and validates the TrainJob, launches it in this pod's namespace and
follows it; once it completes it copies the metrics file the job wrote onto the task's
``Metrics`` output, and the component copies the model folder onto its ``Model`` output. The
model folder (``<volume>/[<run>/]models/policy/<cell>``) is the same for every attempt, so a
retried task resumes from its checkpoints. The job is labelled with the KFP run it belongs
to (read from this pod's labels: see :func:`~spo.cluster.launcher.launcher_pod`).

The checkpoint volume's claim comes from the platform file; the workspace's from the task config
KFP hands the task (``TaskConfig``, ``KUBERNETES_VOLUMES`` passthrough; KFP >= 2.15). Only the
first keeps the step cacheable (spo.kube.platform.CheckpointVolume).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from spo.cluster import launcher
from spo.cluster.trainjob import WorkspaceMount, build_trainjob, validate_trainjob
from spo.errors import TrainJobError
from spo.kube.platform import Platform
from spo.pipelines.runtime import check_writable, copy_file, discard_run_files, run_folder, stage_config

__all__ = ["DEADLINE_GRACE_SECONDS", "run_train_job", "trainjob_name", "workspace_claim"]

# past the TrainJob's own active deadline: Trainer's DeadlineExceeded (with its reason) comes first
DEADLINE_GRACE_SECONDS = 600


def trainjob_name(cell: str, run_id: str | None) -> str:
    """``spo-<cell>-<run>-<random>``: an RFC 1035 label, new for each attempt, so a retry never
    collides with the failed job an earlier attempt kept for its logs."""
    run = re.sub(r"[^a-z0-9]", "", (run_id or "").lower())[:8] or "run"
    stem = re.sub(r"[^a-z0-9-]+", "-", f"spo-{cell.lower()}-{run}").strip("-")
    return f"{stem[:57]}-{secrets.token_hex(2)}"


def workspace_claim(task_config: Any, workspace: str) -> str:
    """The PersistentVolumeClaim mounted at ``workspace`` in this task's pod, from KFP's task config."""
    mounts = {m.get("name") for m in task_config.volume_mounts or [] if m.get("mountPath") == workspace}
    for volume in task_config.volumes or []:
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if volume.get("name") in mounts and claim:
            return str(claim)
    raise TrainJobError(f"the task config names no PersistentVolumeClaim mounted at {workspace}: the KFP backend must "
                        "pass the run's workspace through (TaskConfig KUBERNETES_VOLUMES passthrough, KFP >= 2.15)")


def run_train_job(*, params: str, cell: str, settings: dict[str, Any], rows_dir: str, degrees_dir: str,
                  sft_dir: str, reference_dir: str, workspace: str, platform_json: str, task_config: Any,
                  metrics_file: str, run_id: str | None = None, namespace: str | None = None, api: Any | None = None,
                  poll_seconds: float = 15.0) -> tuple[str, Path | None]:
    """Train one cell of the grid (``settings``: its train settings) as a TrainJob; returns its model folder and,
    when that lies on the
    platform's checkpoint volume, the run's folder there (the model folder is to be removed from it
    once stored; see the module doc)."""
    platform = Platform.model_validate_json(platform_json)
    volume = platform.checkpoints if platform.checkpoints and workspace == platform.checkpoints.mount_path else None
    staged = {"rows": rows_dir, "degrees": degrees_dir, "sft": sft_dir, "reference": reference_dir}
    paths: dict[str, Any] = dict(settings)
    # the job's config, checked before anything is staged or scheduled
    stage_config(params, [], {**paths, "train.out_dir": str(Path(workspace, "models")),
                              **{f"train.{key}_dir": path for key, path in staged.items()}})
    if volume is not None:  # a fixed claim, this run's folder on it (the same for a retried task)
        claim, base = volume.claim, run_folder(workspace)
    else:
        check_writable(workspace)  # the staging below and every trainer pod write there
        claim, base = workspace_claim(task_config, workspace), Path(workspace)
    folder = str(base / "models" / "policy" / cell)
    paths["train.out_dir"] = folder
    namespace = namespace or launcher.current_namespace()
    api = api if api is not None else launcher.custom_objects_api()
    pod = launcher.launcher_pod(api, namespace)
    run_id = run_id or (pod.run_id if pod else None)
    name = trainjob_name(cell, run_id)
    job_dir = base / "trainjobs" / name
    written = job_dir / "metrics.json"
    paths.update({f"train.{key}_dir": str(job_dir / key) for key in staged})
    paths["train.metrics_file"] = str(written)
    Path(folder).mkdir(parents=True, exist_ok=True)
    for key, source in staged.items():  # the trainer pods see this volume only
        shutil.copytree(source, job_dir / key)
    (job_dir / "params.yaml").write_text(params, encoding="utf-8")
    manifest = build_trainjob(
        platform, name=name, params_file=str(job_dir / "params.yaml"),
        overrides=[f"{key}={json.dumps(value)}" for key, value in paths.items()],
        workspace=WorkspaceMount(claim=claim, path=workspace),
        labels={**({"pipeline/runid": run_id} if run_id else {}), "spo-pipeline/cell": cell.replace("_", "-")},
        owner_pod=(pod.name, pod.uid) if pod and pod.uid else None)
    validate_trainjob(manifest)
    deadline = platform.pool("train").active_deadline
    launcher.launch(manifest, namespace=namespace, api=api, poll_seconds=poll_seconds,
           deadline_seconds=deadline + DEADLINE_GRACE_SECONDS if deadline else None)
    if not written.is_file():
        raise TrainJobError(f"TrainJob {name} completed but wrote no metrics file {written}")
    copy_file(written, metrics_file)
    discard_run_files(job_dir, base)  # its staged inputs (an SFT model among them) served their turn
    return folder, base if volume is not None else None
