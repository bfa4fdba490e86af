"""Where each step runs: one platform file, read by the compiler and rendered by the Helm chart from its values.

A platform file names the image, the run's workspace volume, and *pools* — a kind of node each
with its accelerator, node selector, tolerations, CPU/memory requests and limits and retry
count — and maps each step to a pool. The compiler applies a step's pool to its task through
kfp and kfp-kubernetes, so GPUs go only where the file puts them; a file that names no
accelerator gives a pipeline with none. The judge's API key comes from a Kubernetes Secret as an
environment variable, never as a value. ``configs/platform/local.yaml`` (CPU, what ``kfp.local``
and CI use) and ``configs/platform/gpu.yaml`` (a GPU cluster) are the examples; unknown keys,
steps and pools are errors naming them.

A train pool asking for more than one node or process (``nodes``, ``processes_per_node``)
turns each train task into a launcher: a small pod on ``launcher_pool`` that creates a Kubeflow
Trainer ``TrainJob`` (spo.cluster) with the pool's resources, follows it and hands back the
same artifacts. ``configs/platform/multinode.yaml`` is that example (2 nodes x 8 GPUs).

``dvc_remote`` names the project's DVC remote (an S3-compatible bucket: URL, endpoint, and the
Secret holding its keys): the final ``publish`` step pushes the run's outputs there with the
dvc.lock entries they make (spo.lineage.dvc_sync), so that ``dvc pull`` on a laptop restores them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spo.errors import InputError
from spo.stages.table import STEP_NAMES

# what Kubeflow Trainer's torch runtime sets for torchrun; its webhook refuses a TrainJob that sets them
TORCHRUN_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
WORKSPACE_MOUNT_PATH = "/kfp-workspace"  # backend/src/v2/component/constants.go, WorkspaceMountPath
# the pod label Argo Workflows puts on every pod of a workflow (workflow/common/common.go,
# LabelKeyWorkflow): the workflow's name, KFP's run name, the same for each retry of a task
WORKFLOW_LABEL = "workflows.argoproj.io/workflow"
RUN_NAME_ENV = "SPO_RUN_NAME"
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(_Strict):
    cpu: str | None = Field(default=None, description="Kubernetes CPU quantity, e.g. '4' or '500m'.")
    memory: str | None = Field(default=None, description="Kubernetes memory quantity, e.g. '32Gi'.")


class Accelerator(_Strict):
    type: str = Field(description="The extended resource, e.g. nvidia.com/gpu.")
    count: int = Field(ge=1, description="Accelerators per task.")


class Toleration(_Strict):
    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)


class MatchExpression(_Strict):
    key: str = Field(min_length=1)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[str] = Field(default_factory=list)


class NodeAffinityTerm(_Strict):
    """A node affinity term: required (no ``weight``) or preferred with ``weight`` 1-100."""

    match_expressions: list[MatchExpression] = Field(min_length=1)
    weight: int | None = Field(default=None, ge=1, le=100)


class DataVolume(_Strict):
    """An existing PersistentVolumeClaim holding the input data sets, mounted into ``prepare``
    (the pipeline's ``data_dir`` then points under ``mount_path``)."""

    claim: str = Field(min_length=1, description="The PersistentVolumeClaim's name.")
    mount_path: str = Field(default="/data", pattern=r"^/", description="Where prepare sees it.")


class CheckpointVolume(_Strict):
    """An existing PersistentVolumeClaim the train steps checkpoint on, mounted at ``mount_path``.

    KFP's cache key of a task holds the names of the PVCs it mounts, the run's own workspace PVC
    included (``<workflow name>-kfp-workspace``, new in every run; kubeflow/pipelines#12220, KFP >=
    2.15), so a train step on the workspace is never taken from the cache. This claim's name is
    the same in every run: the train steps stay cacheable and a retried (pre-empted) one still
    resumes, from ``<mount_path>/<run>/<policy>``, which it removes once its model is stored.
    """

    claim: str = Field(min_length=1, description="The PersistentVolumeClaim's name (ReadWriteMany to train both "
                       "policies at once on different nodes, and for a multi-node TrainJob).")
    mount_path: str = Field(default="/spo-checkpoints", pattern=r"^/",
                            description="Where the train steps see it (not under /kfp-workspace).")

    @field_validator("mount_path")
    @classmethod
    def _not_in_workspace(cls, path: str) -> str:
        # backend/src/v2/driver/driver.go (2.17.0): "user volume mount at ... conflicts with workspace mount"
        if path.rstrip("/") == WORKSPACE_MOUNT_PATH or path.startswith(WORKSPACE_MOUNT_PATH + "/"):
            raise ValueError(f"{path} lies under KFP's workspace mount {WORKSPACE_MOUNT_PATH}, which KFP refuses")
        return path


class SecretRef(_Strict):
    name: str = Field(description="The Kubernetes Secret.")
    key: str = Field(description="Its key holding the value.")


class DvcCredentials(_Strict):
    """The Secret holding the S3 keys of the DVC remote: set as the ``publish`` step's
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (secretKeyRef), never as values."""

    name: str = Field(description="The Kubernetes Secret.")
    access_key_id_key: str = Field(default="AWS_ACCESS_KEY_ID", description="Its key holding the access key id.")
    secret_access_key_key: str = Field(default="AWS_SECRET_ACCESS_KEY",
                                       description="Its key holding the secret access key.")
    session_token_key: str | None = Field(default=None, description="Its key holding a session token, if any.")


class DvcRemote(_Strict):
    """The project's DVC remote, where the ``publish`` step pushes the run's outputs."""

    url: str = Field(min_length=1, description="s3://bucket/prefix (what `dvc remote add` takes; no credentials "
                     "in it); a folder only for kfp.local.")
    name: str = Field(default="cluster", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="The remote's name in the run's .dvc/config (`dvc pull -r <name>` on a laptop).")
    endpoint_url: str | None = Field(default=None, description="An S3-compatible endpoint (MinIO, Ceph, R2, ...); "
                                     "unset: AWS.")
    region: str | None = None
    credentials_secret: DvcCredentials | None = Field(
        default=None, description="Secret with the S3 keys; unset: the pod's own identity (IRSA, workload identity).")

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, url: str) -> str:
        from spo.lineage.dvc_sync import check_remote_url

        return check_remote_url(url)


class Pool(_Strict):
    """A kind of node a step can run on."""

    accelerator: Accelerator | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    node_affinity: list[NodeAffinityTerm] = Field(default_factory=list, description="Node affinity terms: "
                                                  "required, or preferred with a weight.")
    requests: Resources = Field(default_factory=Resources)
    limits: Resources = Field(default_factory=Resources)
    retries: int = Field(default=0, ge=0, description="Retries of a failed (e.g. pre-empted) task.")
    retry_backoff: str = Field(default="60s", description="Wait before the first retry; doubles each time.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment of every task on the pool, e.g. "
                                "NCCL_DEBUG: INFO (values are compiled in: never a secret).")
    secret_env: dict[str, SecretRef] = Field(default_factory=dict, description="Environment variable -> Secret key, "
                                             "e.g. HF_TOKEN for a gated model: set from the Secret, never as a value.")
    nodes: int = Field(default=1, ge=1, description="Nodes (pods) the train step spans; >1 runs it as a TrainJob.")
    processes_per_node: int | None = Field(default=None, ge=1, description="Training processes per node (torchrun "
                                           "--nproc-per-node); >1 runs train as a TrainJob. Unset: one per "
                                           "accelerator on a TrainJob (nodes > 1), one process in a single pod.")
    active_deadline: int | None = Field(default=None, ge=1, description="Seconds, or '48h' / '90m' / '1h30m', a "
                                        "TrainJob may run before Kubeflow Trainer fails it (DeadlineExceeded).")
    trainer_runtime: str = Field(default="torch-distributed", min_length=1,
                                 description="The Kubeflow Trainer ClusterTrainingRuntime of a TrainJob.")

    @field_validator("active_deadline", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        """``48h``/``90m``/``30s``/``1h30m`` as seconds, the units a 16-GPU run's deadline is thought in."""
        if isinstance(value, str) and not value.isdigit():
            match = _DURATION.fullmatch(value.strip())
            if not match or not any(match.groups()):
                raise ValueError(f"{value!r} is not a duration: seconds, or e.g. '48h', '90m', '1h30m'")
            hours, minutes, seconds = (int(g or 0) for g in match.groups())
            return hours * 3600 + minutes * 60 + seconds
        return value

    @field_validator("env", "secret_env")
    @classmethod
    def _not_torchrun_env(cls, env: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(set(env) & set(TORCHRUN_ENV))
        if reserved:
            raise ValueError(f"{reserved} are set by Kubeflow Trainer's torch runtime for torchrun; remove them")
        return env

    @property
    def distributed(self) -> bool:
        """More than one node or process: the train step on this pool runs as a TrainJob."""
        return self.nodes > 1 or (self.processes_per_node or 1) > 1

    @property
    def procs_per_node(self) -> int:
        """torchrun's processes per node on a TrainJob: as asked, else one per accelerator."""
        return self.processes_per_node or (self.accelerator.count if self.accelerator else 1)


AccessMode = Literal["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany", "ReadWriteOncePod"]


def _read_write_once() -> list[AccessMode]:  # a named factory: mypy infers a lambda's list as list[str]
    return ["ReadWriteOnce"]


class Workspace(_Strict):
    """The run's shared volume: model folders and checkpoints (a PVC per run on a cluster)."""

    size: str = "20Gi"
    storage_class: str | None = None
    access_modes: list[AccessMode] = Field(default_factory=_read_write_once)


class Platform(_Strict):
    image: str = Field(description="The project image every step runs on (a tag or digest the cluster can pull).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    workspace: Workspace = Field(default_factory=Workspace)
    pools: dict[str, Pool] = Field(default_factory=lambda: {"cpu": Pool()})
    default_pool: str = "cpu"
    steps: dict[str, str] = Field(default_factory=dict, description="Step -> pool; unlisted steps use default_pool.")
    caching: bool = Field(default=True, description="KFP's cache for every step but publish.")
    judge_api_key: SecretRef | None = Field(
        default=None, description="Secret holding the OpenAI-compatible judge's key (judge.backend: openai).")
    dvc_remote: DvcRemote | None = Field(
        default=None, description="The DVC remote the publish step pushes the run's outputs and dvc.lock to; "
        "unset: publish only hands dvc.lock and params.yaml back as artifacts.")
    data_volume: DataVolume | None = Field(
        default=None, description="A PVC with the input data sets, mounted into the prepare step.")
    launcher_pool: str | None = Field(
        default=None, description="Pool of the pod that launches and follows a TrainJob; default: default_pool.")
    checkpoints: CheckpointVolume | None = Field(
        default=None, description="A PVC the train steps checkpoint on (cacheable, and a retried train resumes); "
        "unset: a single-pod train works in its pod's scratch (a retry starts over) and a TrainJob on the "
        "run's workspace (never cached).")

    @field_validator("steps")
    @classmethod
    def _known_steps(cls, steps: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(steps) - set(STEP_NAMES))
        if unknown:
            raise ValueError(f"unknown step(s) {unknown}; the steps are {list(STEP_NAMES)}")
        return steps

    @model_validator(mode="after")
    def _known_pools(self) -> Platform:
        used = {self.default_pool, *self.steps.values(), *([self.launcher_pool] if self.launcher_pool else [])}
        missing = sorted(used - set(self.pools))
        if missing:
            raise ValueError(f"pool(s) {missing} are used but not defined under pools ({sorted(self.pools)})")
        self._check_train_job()
        return self

    def _check_train_job(self) -> None:
        """Refuse what a TrainJob cannot honour, before anything is compiled or launched."""
        for name, pool in self.pools.items():
            others = [step for step in STEP_NAMES
                      if step != "train" and self.steps.get(step, self.default_pool) == name]
            if pool.distributed and others:
                raise ValueError(f"pools.{name}: nodes/processes_per_node apply to the train step only (it runs as a "
                                 f"TrainJob), but {others} also run on this pool; give train a pool of its own")
        if not self.train_job:
            return
        train = self.pool("train")
        if self.checkpoints is None and "ReadWriteMany" not in self.workspace.access_modes:
            raise ValueError(f"workspace.access_modes: train runs as a TrainJob ({train.nodes} node(s) x "
                             f"{train.procs_per_node} process(es)) whose pods and launcher pod mount the workspace at "
                             f"the same time from different nodes, which needs ReadWriteMany (got "
                             f"{list(self.workspace.access_modes)}); set access_modes: [ReadWriteMany] and a "
                             "storage_class that provides it")
        if self.launcher().accelerator is not None:
            raise ValueError(f"launcher_pool: pool {self.launcher_pool or self.default_pool!r} has an accelerator, "
                             "which the TrainJob launcher would hold idle for the whole training; name a CPU pool")

    def pool(self, step: str) -> Pool:
        return self.pools[self.steps.get(step, self.default_pool)]

    @property
    def train_job(self) -> bool:
        """The train step runs as a Kubeflow Trainer TrainJob, launched from a CPU pod."""
        return self.pool("train").distributed

    def launcher(self) -> Pool:
        """The pool of the TrainJob launcher pod."""
        return self.pools[self.launcher_pool or self.default_pool]


def load_platform(path: str | Path, image: str | None = None) -> Platform:
    """Read a platform file (``image``, when given, replaces the file's)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: platform file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {err}") from None
    if image:
        data["image"] = image
    try:
        return Platform.model_validate(data)
    except ValidationError as err:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise InputError(f"{path}: invalid platform file:\n  " + "\n  ".join(lines)) from None
