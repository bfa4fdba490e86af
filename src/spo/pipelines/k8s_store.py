"""Upload a pipeline version as ``Pipeline``/``PipelineVersion`` resources, for KFP installs that
store pipelines in Kubernetes (KFP's Kubernetes-native API mode, ``--pipelinesStore=kubernetes``).

``spo pipeline submit --store kubernetes`` calls :func:`put_version`: the compiled resources
(validated against the vendored CRDs of the pinned KFP release before anything is sent) are
created through the official ``kubernetes`` client in the pod's namespace. The version is named
``<pipeline>-<first 12 hex of the compiled YAML's sha256>``, the same content key as the REST
path uses, so a rerun with nothing changed finds it and creates nothing (409 AlreadyExists on an
identical spec is a reuse; on a different one it is an error naming both). In this mode the API
server serves the resources as pipelines and versions whose ids are their UIDs, which is what a
run started afterwards through the REST API refers to.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from spo.errors import StoreError

__all__ = ["GROUP", "VERSION", "get_version", "put_version", "version_name"]

GROUP, VERSION = "pipelines.kubeflow.org", "v2beta1"
log = logging.getLogger("spo.pipeline")


def version_name(pipeline: str, digest: str) -> str:
    return f"{pipeline}-{digest[:12]}"


def put_version(manifests: Path, *, pipeline: str, digest: str, namespace: str, api: Any) -> tuple[str, str]:
    """Create the Pipeline (unless it exists) and the PipelineVersion (unless an identical one
    exists) of ``manifests``; return their UIDs (pipeline id, version id)."""
    from spo.kube.manifests import read_manifests, validate_manifests

    documents = read_manifests(manifests)
    validate_manifests(documents)
    uids: dict[str, str] = {}
    for document in documents:
        kind = document["kind"]
        plural = {"Pipeline": "pipelines", "PipelineVersion": "pipelineversions"}[kind]
        name = document["metadata"]["name"]
        body = {**document, "metadata": {**document["metadata"], "namespace": namespace}}
        existing = _create_or_get(api, plural, namespace, name, body)
        if existing is None:
            log.info("%s %s/%s: created", kind, namespace, name)
            existing = api.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        elif kind == "PipelineVersion" and existing.get("spec", {}).get("pipelineSpec") != body["spec"]["pipelineSpec"]:
            raise StoreError(f"PipelineVersion {namespace}/{name} exists with another pipeline spec than this "
                             f"compiles to ({digest[:12]} is its content key): delete it, or rename the pipeline")
        else:
            log.info("%s %s/%s: exists, reused", kind, namespace, name)
        uids[kind] = existing["metadata"]["uid"]
    return uids["Pipeline"], uids["PipelineVersion"]


def get_version(*, pipeline: str, digest: str, namespace: str, api: Any) -> str | None:
    """The UID of the PipelineVersion of this content, or None."""
    from kubernetes.client.rest import ApiException

    try:
        found = api.get_namespaced_custom_object(GROUP, VERSION, namespace, "pipelineversions",
                                                 version_name(pipeline, digest))
    except ApiException as err:
        if err.status == 404:
            return None
        raise StoreError(_refusal(err, "reading", namespace)) from None
    return str(found["metadata"]["uid"])


def _create_or_get(api: Any, plural: str, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """None when created; the existing object when the name was taken."""
    from kubernetes.client.rest import ApiException

    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)
        return None
    except ApiException as err:
        if err.status != 409:
            raise StoreError(_refusal(err, f"creating {plural}/{name}", namespace)) from None
    return dict(api.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name))


def _refusal(err: Any, action: str, namespace: str) -> str:
    meaning = {401: "the service-account token was refused", 403: "the role lacks this verb on pipelines.kubeflow.org "
               "(the chart's uploader Role grants it)", 404: "no such resource: is KFP installed with its "
               "pipelines.kubeflow.org CRDs (Kubernetes-native mode)?"}.get(err.status, "")
    return (f"Kubernetes API, {action} in {namespace}: HTTP {err.status} {err.reason}"
            + (f": {meaning}" if meaning else ""))
