"""Placing one KFP task where the platform file says: its pool's resources, node selection,
volumes, retries, image policy, cache policy and Secrets, through kfp and kfp-kubernetes.

The platform file's schema is :mod:`spo.kube.platform`; this is the KFP adapter's half of it.
"""

from __future__ import annotations

from typing import Any

from spo.accelerator import GPUS_ENV
from spo.kube.platform import RUN_NAME_ENV, WORKFLOW_LABEL, Platform


def place(task: Any, step: str, platform: Platform, judge_key_env: str | None = None) -> None:
    """Apply the step's pool, the image policy, the cache policy and (judge) the key Secret to ``task``.

    A train task that launches a TrainJob runs on the launcher pool (the TrainJob gets the train
    pool's accelerators, spo.cluster.trainjob) but keeps the train pool's retries: a failed
    TrainJob is retried as a new one, resuming from the checkpoints on the workspace.
    """
    from kfp import kubernetes

    pool = platform.pool(step)
    retry = pool
    if step == "train" and platform.train_job:
        pool = platform.launcher()
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
        # the step refuses to start when it cannot use them (spo.accelerator): no silent CPU fallback
        task.set_env_variable(GPUS_ENV, str(pool.accelerator.count))
    for key, value in pool.node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    for t in pool.tolerations:
        kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect,
                                  toleration_seconds=t.toleration_seconds)
    for term in pool.node_affinity:
        kubernetes.add_node_affinity(task, match_expressions=[e.model_dump() for e in term.match_expressions],
                                     weight=term.weight)
    if step in ("data_version", "prepare") and platform.data_volume is not None:
        kubernetes.mount_pvc(task, pvc_name=platform.data_volume.claim, mount_path=platform.data_volume.mount_path)
    if step == "train" and platform.checkpoints is not None:
        # a fixed claim name keeps the step's cache key (which holds it) the same from run to run;
        # the run's name, for the run's folder on it, comes as an environment variable, which is
        # not in the key (backend/src/v2/driver/cache.go, getFingerPrint, 2.17.0)
        kubernetes.mount_pvc(task, pvc_name=platform.checkpoints.claim, mount_path=platform.checkpoints.mount_path)
        kubernetes.use_field_path_as_env(task, RUN_NAME_ENV, f"metadata.labels['{WORKFLOW_LABEL}']")
    for name, value in pool.env.items():
        task.set_env_variable(name, value)
    for name, ref in pool.secret_env.items():
        kubernetes.use_secret_as_env(task, ref.name, {ref.key: name})
    if retry.retries:
        task.set_retry(num_retries=retry.retries, backoff_duration=retry.retry_backoff, backoff_factor=2.0)
    kubernetes.set_image_pull_policy(task, platform.image_pull_policy)
    if platform.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, platform.image_pull_secrets)
    # every result is an artifact in the store (models included), so every step can come from KFP's
    # cache, but publish: it pushes this run's outputs and records this run's dvc.lock
    # and data_version, which reads what the data volume holds now
    task.set_caching_options(platform.caching and step not in ("publish", "data_version"))
    if step == "publish" and platform.dvc_remote is not None and platform.dvc_remote.credentials_secret is not None:
        creds = platform.dvc_remote.credentials_secret
        keys = {creds.access_key_id_key: "AWS_ACCESS_KEY_ID", creds.secret_access_key_key: "AWS_SECRET_ACCESS_KEY"}
        if creds.session_token_key:
            keys[creds.session_token_key] = "AWS_SESSION_TOKEN"
        kubernetes.use_secret_as_env(task, creds.name, keys)
    if step == "judge" and platform.judge_api_key is not None and judge_key_env:
        # optional: a missing Secret would hold the pod in CreateContainerConfigError (it "hangs"),
        # even when the reward-model judge needs no key; the OpenAI judge instead fails at once,
        # naming the variable and this Secret. KFP's driver copies the flag onto the secretKeyRef
        # (backend/src/v2/driver/k8s.go, extendPodSpecPatch, "Get secret env information").
        kubernetes.use_secret_as_env(task, platform.judge_api_key.name, {platform.judge_api_key.key: judge_key_env},
                                     optional=True)
