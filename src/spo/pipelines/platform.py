"""Where each step runs: one platform file, read by the compiler (and, later, the Helm chart).

A platform file names the image, the run's workspace volume, and *pools* — a kind of node each
with its accelerator, node selector, tolerations, CPU/memory requests and limits and retry
count — and maps each step to a pool. The compiler applies a step's pool to its task through
kfp and kfp-kubernetes, so GPUs go only where the file puts them; a file that names no
accelerator gives a pipeline with none. The judge's API key comes from a Kubernetes Secret as an
environment variable, never as a value. ``configs/platform/local.yaml`` (CPU, what ``kfp.local``
and CI use) and ``configs/platform/gpu.yaml`` (a GPU cluster) are the examples; unknown keys,
steps and pools are errors naming them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spo.io import InputError

STEP_NAMES = ("configure", "prepare", "validate", "keywords", "degrees", "base_model", "sft", "train", "generate",
              "reward_model", "judge", "report")


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


class Pool(_Strict):
    """A kind of node a step can run on."""

    accelerator: Accelerator | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    requests: Resources = Field(default_factory=Resources)
    limits: Resources = Field(default_factory=Resources)
    retries: int = Field(default=0, ge=0, description="Retries of a failed (e.g. pre-empted) task.")
    retry_backoff: str = Field(default="60s", description="Wait before the first retry; doubles each time.")


class Workspace(_Strict):
    """The run's shared volume: model folders and checkpoints (a PVC per run on a cluster)."""

    size: str = "20Gi"
    storage_class: str | None = None
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany", "ReadWriteOncePod"]] = Field(
        default_factory=lambda: ["ReadWriteOnce"])


class SecretRef(_Strict):
    name: str = Field(description="The Kubernetes Secret.")
    key: str = Field(description="Its key holding the value.")


class Platform(_Strict):
    image: str = Field(description="The project image every step runs on (a tag or digest the cluster can pull).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    workspace: Workspace = Field(default_factory=Workspace)
    pools: dict[str, Pool] = Field(default_factory=lambda: {"cpu": Pool()})
    default_pool: str = "cpu"
    steps: dict[str, str] = Field(default_factory=dict, description="Step -> pool; unlisted steps use default_pool.")
    caching: bool = Field(default=True, description="KFP's cache for the steps whose results are artifacts.")
    judge_api_key: SecretRef | None = Field(
        default=None, description="Secret holding the OpenAI-compatible judge's key (judge.backend: openai).")

    @field_validator("steps")
    @classmethod
    def _known_steps(cls, steps: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(steps) - set(STEP_NAMES))
        if unknown:
            raise ValueError(f"unknown step(s) {unknown}; the steps are {list(STEP_NAMES)}")
        return steps

    @model_validator(mode="after")
    def _known_pools(self) -> Platform:
        used = {self.default_pool, *self.steps.values()}
        missing = sorted(used - set(self.pools))
        if missing:
            raise ValueError(f"pool(s) {missing} are used but not defined under pools ({sorted(self.pools)})")
        return self

    def pool(self, step: str) -> Pool:
        return self.pools[self.steps.get(step, self.default_pool)]


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


def place(task: Any, step: str, platform: Platform, judge_key_env: str | None = None) -> None:
    """Apply the step's pool, the image policy, the cache policy and (judge) the key Secret to ``task``."""
    from kfp import kubernetes

    from spo.pipelines.components import WORKSPACE_PRODUCERS

    pool = platform.pool(step)
    if pool.requests.cpu:
        task.set_cpu_request(pool.requests.cpu)
    if pool.requests.memory:
        task.set_memory_request(pool.requests.memory)
    if pool.limits.cpu:
        task.set_cpu_limit(pool.limits.cpu)
    if pool.limits.memory:
        task.set_memory_limit(pool.limits.memory)
    if pool.accelerator is not None:
        task.set_accelerator_type(pool.accelerator.type)
        task.set_accelerator_limit(pool.accelerator.count)
    for key, value in pool.node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    for t in pool.tolerations:
        kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect,
                                  toleration_seconds=t.toleration_seconds)
    if pool.retries:
        task.set_retry(num_retries=pool.retries, backoff_duration=pool.retry_backoff, backoff_factor=2.0)
    kubernetes.set_image_pull_policy(task, platform.image_pull_policy)
    if platform.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, platform.image_pull_secrets)
    task.set_caching_options(platform.caching and step not in WORKSPACE_PRODUCERS)
    if step == "judge" and platform.judge_api_key is not None and judge_key_env:
        kubernetes.use_secret_as_env(task, platform.judge_api_key.name, {platform.judge_api_key.key: judge_key_env})
