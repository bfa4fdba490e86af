"""What ``spo pipeline submit --check --cluster`` verifies in the cluster before a run is started.

KFP accepts a run whose pods can never start: a PVC the platform file names but nobody created
leaves ``prepare`` or ``train`` Pending for ever, a TrainJob on a cluster without Kubeflow
Trainer fails only when the launcher posts it, after the data steps and SFT ran. These checks read
the namespace where the run's pods will live (the release's, checked against KFP's mode by
:func:`spo.pipelines.submit.check_namespaces`) with the caller's credentials: ``get`` on
persistentvolumeclaims there, and API discovery, which every authenticated user may read.
Each finding says what to create or change; nothing is created.
"""

from __future__ import annotations

from typing import Any

from spo.kube.platform import Platform

__all__ = ["cluster_findings"]


def cluster_findings(platform: Platform, namespace: str, api_client: Any) -> list[str]:
    """The problems a run of ``platform`` in ``namespace`` would meet (empty: none found)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    findings: list[str] = []
    core = client.CoreV1Api(api_client)
    claims = {}
    if platform.checkpoints is not None:
        claims["checkpoints.claim"] = platform.checkpoints.claim
    if platform.data_volume is not None:
        claims["data_volume.claim"] = platform.data_volume.claim
    for where, claim in claims.items():
        try:
            pvc = core.read_namespaced_persistent_volume_claim(claim, namespace)
        except ApiException as err:
            if err.status == 404:
                findings.append(f"{where}: PersistentVolumeClaim {claim!r} does not exist in namespace {namespace!r}: "
                                "the steps that mount it would stay Pending; "
                                "create it (the Helm chart does: storage.*)")
                continue
            if err.status == 403:
                findings.append(f"{where}: cannot read PersistentVolumeClaim {claim!r} in {namespace!r} (HTTP 403): "
                                "grant 'get' on persistentvolumeclaims to check it, or check it yourself")
                continue
            raise
        phase = (pvc.status.phase if pvc.status else None) or "unknown"
        if phase == "Lost":
            findings.append(f"{where}: PersistentVolumeClaim {claim!r} is Lost (its volume is gone): recreate it")
        modes = list((pvc.spec.access_modes if pvc.spec else None) or [])
        if where == "checkpoints.claim" and platform.train_job and "ReadWriteMany" not in modes:
            findings.append(f"{where}: PersistentVolumeClaim {claim!r} is {modes}, "
                            "but the train step is a TrainJob whose "
                            "pods on several nodes mount it at once: it needs ReadWriteMany")
    if platform.train_job:
        try:
            resources = client.CustomObjectsApi(api_client).get_api_resources("trainer.kubeflow.org", "v1alpha1")
        except ApiException as err:
            if err.status != 404:
                raise
            resources = None
        names = {r.name for r in (resources.resources if resources else None) or []}
        if "trainjobs" not in names:
            findings.append("the train pool is multi-node, but the cluster serves no trainer.kubeflow.org/v1alpha1 "
                            "trainjobs: install Kubeflow Trainer v2.3 and its torch-distributed runtime "
                            "(docs/kubeflow.md, \"Multi-node training\")")
    return findings
