"""The pipeline's last step: a run's outputs recorded and pushed as ``dvc repro`` would leave them.

KFP hands this step every output artifact of the run; :func:`publish` lays them out as a
checkout holds them, writes the dvc.lock entries they make (:mod:`spo.lineage.dvc_sync`) and
pushes them to the project's DVC remote, so ``dvc pull`` on a laptop restores the run. Nothing
here knows about KFP or Kubernetes: the component (spo.pipelines.components) maps artifacts to
checkout paths and calls this.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spo.lineage import dvc_sync

# the checkout publish lays out beside its output artifacts (not itself an artifact: never uploaded)
PUBLISH_VIEW = ".spo-publish-checkout"


def publish(*, outputs: Mapping[str, str | Path], params_text: str, dvc_yaml: str, dvcignore: str,
            remote: Mapping[str, Any] | None, run_id: str, dvc_lock: str | Path, params_yaml: str | Path,
            results: str | Path) -> dict[str, Any]:
    """The ``publish`` step: record the run's outputs in a dvc.lock (:mod:`spo.lineage.dvc_sync`), hand
    dvc.lock, params.yaml and results.tar.gz back as artifacts, and push the outputs to the DVC
    remote when the platform names one (``remote``: url, name, endpoint_url, region).

    The checkout it records and pushes from is laid out beside its own output artifacts: on a
    cluster that is the scratch volume KFP downloaded the input artifacts into (the launcher's
    ``/minio``, ``/s3`` or ``/gcs`` emptyDir; backend/src/v2/compiler/argocompiler/container.go),
    so the outputs enter it and DVC's cache as hard links: the node holds each model once, not
    twice, and the step needs no volume of the run (whose per-run name would only add a PVC).
    The checkout is removed once the step has succeeded.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("spo.publish")
    for artifact in (dvc_lock, params_yaml, results):
        Path(artifact).parent.mkdir(parents=True, exist_ok=True)
    Path(params_yaml).write_text(params_text, encoding="utf-8")
    if not dvc_yaml.strip():
        log.warning("publish: no dvc.yaml was compiled into the pipeline: no dvc.lock, nothing pushed")
        Path(dvc_lock).write_text("", encoding="utf-8")
        dvc_sync.bundle_files({"params.yaml": Path(params_yaml)}, results)
        return {"pushed": None}
    view = Path(results).parent / PUBLISH_VIEW
    if view.exists():  # a retried publish (kfp.local keeps its folders): start over
        shutil.rmtree(view)
    lock = dvc_sync.lock_run(view, outputs, params_text, dvc_yaml, dvcignore_text=dvcignore)
    shutil.copyfile(view / "dvc.lock", dvc_lock)
    dvc_sync.bundle_run(view, results)
    if not remote or not remote.get("url"):
        log.info("publish: no dvc_remote in the platform file, nothing pushed: dvc.lock (%d lines), params.yaml "
                 "and results.tar.gz are this step's artifacts", len(lock.splitlines()))
        summary: dict[str, Any] = {"pushed": None}
    else:
        summary = dvc_sync.push_run(view, remote["url"], endpoint_url=remote.get("endpoint_url") or None,
                                    region=remote.get("region") or None, remote_name=remote.get("name") or "cluster",
                                    run_id=run_id or None)
        log.info("publish: %s", json.dumps(summary))
    shutil.rmtree(view)
    return summary
