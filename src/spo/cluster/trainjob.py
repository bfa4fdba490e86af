"""The train stage as a Kubeflow Trainer v2 ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``, Trainer v2.3.0).

The job references the ``torch-distributed`` ClusterTrainingRuntime, whose trainer container
(``node``) runs ``torchrun --module spo train -p <params> -S ...``: the same stage ``dvc repro``
and the single-pod pipeline task run. That runtime does not wrap the command in torchrun — its
Torch plugin only sets ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``,
``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``, which torchrun reads as its defaults — so the
command starts torchrun itself, and the trainer picks the process group up from torchrun's
``WORLD_SIZE``/``RANK`` (DDP through Accelerate, spo.training.trainer).

Everything else comes from the platform file's train pool: nodes, processes per node, the
accelerators and CPU/memory per node, environment (Secrets by reference only), node selector,
tolerations, pull secrets and the active deadline. The pods see the files only through the
run's workspace volume, mounted at the same path as in every pipeline pod
(``runtimePatches``: what a TrainJob may change in its runtime's pods), so every path the stage
reads or writes must lie on it. Each job is validated strictly against the vendored CRD
(spo.kube.manifests) before it is rendered or created.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from spo.accelerator import GPUS_ENV
from spo.kube.platform import Platform, Pool

__all__ = ["API_VERSION", "WorkspaceMount", "build_trainjob", "render_trainjob", "validate_trainjob"]

API_VERSION = "trainer.kubeflow.org/v1alpha1"
# the torch-distributed runtime's trainer: replicated job and container both named "node"
# (manifests/base/runtimes/torch_distributed.yaml and pkg/constants at Trainer v2.3.0)
TRAINER_NODE = "node"
PATCH_MANAGER = "spo-pipeline/launcher"
WORKSPACE_PATH = "/kfp-workspace"  # where KFP mounts a run's workspace (kfp.dsl.constants.WORKSPACE_MOUNT_PATH)
WORKSPACE_VOLUME = "kfp-workspace"
BASE_LABELS = {"app.kubernetes.io/name": "spo-pipeline", "app.kubernetes.io/component": "train",
               "app.kubernetes.io/managed-by": "spo-launcher"}
# Istio's per-pod opt-out: the pod label, preferred to the annotation, is an explicit "no" that the
# namespace's enabled policy does not override (istio/istio pkg/kube/inject/inject.go, injectRequired).
# In a Kubeflow profile namespace a sidecar would sit under the mesh-wide deny-all between torchrun's
# ranks; KFP opts its own pods out the same way, and Trainer's docs tell users to.
ISTIO_INJECT = {"sidecar.istio.io/inject": "false"}
# the train settings holding paths: each must be on the volume the pods mount
_PATH_KEYS = ("rows_dir", "degrees_dir", "sft_dir", "out_dir", "metrics_file")


@dataclass(frozen=True)
class WorkspaceMount:
    """The run's workspace PVC and where the pods mount it (the paths in the params point there)."""

    claim: str
    path: str = WORKSPACE_PATH
    volume: str = WORKSPACE_VOLUME


def build_trainjob(platform: Platform, *, name: str, params_file: str, overrides: Sequence[str],
                   workspace: WorkspaceMount, namespace: str | None = None,
                   labels: Mapping[str, str] | None = None,
                   owner_pod: tuple[str, str] | None = None) -> dict[str, Any]:
    """The TrainJob running ``spo train -p params_file -S overrides...`` on the platform's train pool.

    ``labels`` (e.g. the KFP run id) go on the TrainJob and, through ``runtimePatches``, on its
    JobSet, Jobs and pods, so ``kubectl get pods -l`` finds the trainer pods of a run; the pods also
    opt out of Istio's sidecar (:data:`ISTIO_INJECT`). ``owner_pod`` (name, UID: the launcher's own
    pod) becomes the TrainJob's owner, so Kubernetes' garbage collector deletes the job with that pod
    whether or not the launcher ever saw a SIGTERM (a run deleted, a node lost, a SIGKILL).
    """
    pool = platform.pool("train")
    labels = {**BASE_LABELS, **(labels or {})}
    trainer: dict[str, Any] = {
        "image": platform.image,
        "command": ["torchrun", "--module", "spo", "train"],
        "args": ["-p", params_file, *(arg for override in overrides for arg in ("-S", override))],
        "env": _env(pool),
        "numNodes": pool.nodes,
        "numProcPerNode": pool.procs_per_node,
    }
    resources = _resources(pool)
    if resources:
        trainer["resourcesPerNode"] = resources
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                       "name": pool.trainer_runtime},
        "trainer": trainer,
        "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {
            "metadata": {"labels": dict(labels)},
            "spec": {"replicatedJobs": [{"name": TRAINER_NODE, "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {"template": {"metadata": {"labels": {**labels, **ISTIO_INJECT}},
                                      "spec": _pod_patch(platform, pool, workspace)}},
            }}]},
        }}}],
    }
    if pool.active_deadline:
        spec["activeDeadlineSeconds"] = pool.active_deadline
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if owner_pod is not None:
        # not a controller and not blocking the pod's deletion (which would need update on pods/finalizers)
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": owner_pod[0], "uid": owner_pod[1],
                                        "controller": False, "blockOwnerDeletion": False}]
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": API_VERSION, "kind": "TrainJob", "metadata": metadata, "spec": spec}


def validate_trainjob(manifest: Mapping[str, Any]) -> None:
    """Raise :class:`~spo.errors.ManifestValidationError` unless ``manifest`` is a
    TrainJob the pinned Trainer's CRD accepts, with no field it would prune."""
    from spo.kube.manifests import validate_manifests

    validate_manifests([manifest], crd_set="trainer")


def render_trainjob(params_path: str, platform_path: str, *, name: str, workspace_claim: str,
                    workspace_path: str = WORKSPACE_PATH, namespace: str | None = None, overrides: Sequence[str] = (),
                    image: str | None = None, params_in_pod: str | None = None) -> str:
    """The validated TrainJob YAML of ``spo train -p params -S overrides`` on the platform's train pool.

    ``params_path`` and the overrides are checked here, as the stage will read them, and every
    train path they give must lie under ``workspace_path`` (a model written anywhere else is
    lost with the pod). The pods read the params at ``params_in_pod`` (default: ``params_path``,
    which must then itself be on the volume). Raises ``InputError`` (or ``ConfigError`` for the
    params) naming what to fix.
    """
    import yaml

    from spo.config import load_config
    from spo.errors import InputError, ManifestValidationError
    from spo.kube.platform import load_platform

    platform = load_platform(platform_path, image)
    cfg = load_config(params_path, list(overrides))
    in_pod = params_in_pod or str(params_path)
    off = {"params file": in_pod} if not _on_volume(in_pod, workspace_path) else {}
    keys = [key for key in _PATH_KEYS if key != "degrees_dir" or cfg.train.spo.enabled]  # degrees: SPO only
    off.update({f"train.{key}": getattr(cfg.train, key) for key in keys
                if not _on_volume(getattr(cfg.train, key), workspace_path)})
    if off:
        listed = ", ".join(f"{key} = {value!r}" for key, value in off.items())
        raise InputError(f"{params_path}: the TrainJob's pods see only the workspace volume at {workspace_path}, but "
                         f"{listed} lie elsewhere; set them with -S train.<key>=<path under {workspace_path}>")
    job = build_trainjob(platform, name=name, params_file=in_pod, overrides=overrides, namespace=namespace,
                         workspace=WorkspaceMount(claim=workspace_claim, path=workspace_path))
    try:
        validate_trainjob(job)
    except ManifestValidationError as err:  # e.g. a memory of '64GB' (Kubernetes wants 64G or 64Gi), a bad --name
        raise InputError(f"{platform_path} + --name {name!r}: Kubernetes would reject this TrainJob: {err}") from None
    return yaml.safe_dump(job, sort_keys=False)


def _on_volume(path: str, mount: str) -> bool:
    return PurePosixPath(mount) in PurePosixPath(path).parents


def _env(pool: Pool) -> list[dict[str, Any]]:
    """Unbuffered Python (logs reach ``kubectl logs`` as they are written), the pool's variables,
    the GPUs each pod was given (checked before any work), and its Secrets as ``secretKeyRef``: the
    value never appears in the TrainJob."""
    plain = {"PYTHONUNBUFFERED": "1", **pool.env}
    if pool.accelerator is not None:  # each process refuses to start when it cannot use them (spo.accelerator)
        plain[GPUS_ENV] = str(pool.accelerator.count)
    env: list[dict[str, Any]] = [{"name": key, "value": value} for key, value in plain.items()]
    env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
            for key, ref in pool.secret_env.items()]
    return env


def _resources(pool: Pool) -> dict[str, Any]:
    """Requests and limits per node; the accelerators as a limit (Kubernetes sets the request equal)."""
    requests = {k: v for k, v in (("cpu", pool.requests.cpu), ("memory", pool.requests.memory)) if v}
    limits = {k: v for k, v in (("cpu", pool.limits.cpu), ("memory", pool.limits.memory)) if v}
    if pool.accelerator is not None:
        limits[pool.accelerator.type] = str(pool.accelerator.count)
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


# The image's own user (docker/Dockerfile: USER 1000:1000), non-root, no privilege escalation, no
# capabilities, the runtime's seccomp profile: the restricted Pod Security Standard, as the chart's pods.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pod_patch(platform: Platform, pool: Pool, workspace: WorkspaceMount) -> dict[str, Any]:
    """The trainer pods' additions: the workspace, a RAM-backed /dev/shm (NCCL and DataLoader
    workers need more than the container runtime's 64 MiB), the restricted security context,
    placement and pull secrets."""
    spec: dict[str, Any] = {
        "securityContext": POD_SECURITY,
        "volumes": [{"name": workspace.volume, "persistentVolumeClaim": {"claimName": workspace.claim}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
        "containers": [{"name": TRAINER_NODE, "securityContext": CONTAINER_SECURITY,
                        "volumeMounts": [{"name": workspace.volume, "mountPath": workspace.path},
                                         {"name": "dshm", "mountPath": "/dev/shm"}]}],
    }
    if pool.node_selector:
        spec["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        spec["tolerations"] = [_toleration(t.model_dump()) for t in pool.tolerations]
    if pool.node_affinity:
        spec["affinity"] = {"nodeAffinity": node_affinity(pool)}
    if platform.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": secret} for secret in platform.image_pull_secrets]
    return spec


def node_affinity(pool: Pool) -> dict[str, Any]:
    """The pool's node affinity terms as a Kubernetes ``nodeAffinity``: required terms are ORed
    node selector terms, weighted ones preferences (what kfp-kubernetes gives a task's pod)."""
    def term(t: Any) -> dict[str, Any]:
        return {"matchExpressions": [{k: v for k, v in e.model_dump().items() if v or k != "values"}
                                     for e in t.match_expressions]}

    required = [term(t) for t in pool.node_affinity if t.weight is None]
    preferred = [{"weight": t.weight, "preference": term(t)} for t in pool.node_affinity if t.weight is not None]
    out: dict[str, Any] = {}
    if required:
        out["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": required}
    if preferred:
        out["preferredDuringSchedulingIgnoredDuringExecution"] = preferred
    return out


def _toleration(fields: Mapping[str, Any]) -> dict[str, Any]:
    names = {"toleration_seconds": "tolerationSeconds"}
    return {names.get(key, key): value for key, value in fields.items() if value is not None}
