"""``spo pipeline compile``: the pipeline YAML a KFP backend runs, and its Kubernetes resources.

The compiled file is the pipeline spec (plus its Kubernetes platform spec: placement, secrets,
pull policy). With ``kubernetes_manifests`` it is instead the ``Pipeline`` and ``PipelineVersion``
resources (``pipelines.kubeflow.org/v2beta1``) for KFP installs that store pipelines in
Kubernetes; those are validated against the CRD schemas of the pinned KFP release before they
are written (spo.kube.manifests).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from spo.kube.platform import load_platform

log = logging.getLogger("spo.pipeline")

DEFAULT_PLATFORM = "configs/platform/local.yaml"


def compile_pipeline(out: str | Path, *, params: str | Path = "params.yaml", platform: str | Path = DEFAULT_PLATFORM,
                     image: str | None = None, kubernetes_manifests: bool = False, namespace: str | None = None,
                     version: str | None = None, pipeline_name: str | None = None,
                     allow_large_grid: bool = False) -> Path:
    """Compile to ``out``; ``image`` replaces the platform file's image. Returns ``out``.

    The grid's size and cost are logged first, and a grid over ``grid``'s limits is refused
    (:class:`~spo.errors.GridTooLarge`) unless ``allow_large_grid``."""
    from kfp import compiler

    from spo.config import load_config
    from spo.grid import check_grid, format_grid
    from spo.pipelines.dag import PIPELINE_NAME, build_pipeline

    started = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    placed = load_platform(platform, image)
    size = check_grid(load_config(params), allow_over=allow_large_grid)
    log.info("pipeline compile: %s", format_grid(size))
    pipeline = build_pipeline(params, placed)
    options = None
    if kubernetes_manifests:
        options = compiler.KubernetesManifestOptions(
            pipeline_name=pipeline_name or PIPELINE_NAME,
            pipeline_version_name=version or f"{PIPELINE_NAME}-{_image_tag(placed.image)}",
            namespace=namespace, include_pipeline_manifest=True)
    compiler.Compiler().compile(pipeline, str(out), kubernetes_manifest_options=options,
                                kubernetes_manifest_format=kubernetes_manifests)
    if kubernetes_manifests:
        from spo.kube.manifests import read_manifests, validate_manifests

        validate_manifests(read_manifests(out))
    if not image_is_pinned(placed.image):
        log.warning("pipeline compile: image %s is a tag that can move: KFP's cache key holds the image *string* "
                    "(backend/src/v2/driver/cache.go), so after a rebuild under the same tag every step is still "
                    "taken from results of the old code; name it by digest (<repo>@sha256:...) or by the content "
                    "tag `make image` writes to build/image-*.ref (docs/images.md)", placed.image)
    log.info("pipeline compile: %s + %s (image %s) -> %s%s in %.1f s", params, platform, placed.image, out,
             " (Pipeline/PipelineVersion resources)" if kubernetes_manifests else "", time.perf_counter() - started)
    return out


# `make image`'s content tag: <flavour>-<12 hex of a sha256 over what the image is built from>
# (docker/build-image.sh), which changes whenever the code or the dependencies do
_CONTENT_TAG = re.compile(r"(cpu|cuda)-[0-9a-f]{12}")


def image_is_pinned(image: str) -> bool:
    """A digest, or a content tag: a reference whose image cannot change under it."""
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and bool(_CONTENT_TAG.fullmatch(name.rsplit(":", 1)[1]))


def _image_tag(image: str) -> str:
    """A DNS-1123-safe suffix from the image's tag or digest (a version name per image)."""
    tail = (image.rsplit("@", 1)[-1] if "@" in image
            else image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1]
            else "latest")
    safe = "".join(ch if ch.isalnum() else "-" for ch in tail.lower()).strip("-")
    return safe[:40] or "latest"
