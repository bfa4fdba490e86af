"""Helpers of the tests that need a Docker daemon and the project image (not a test module).

Where Docker is optional (a laptop without it) these tests skip with the reason; CI sets
``SPO_REQUIRE_DOCKER=1`` after building the image (.ci/run), and then a missing daemon or image
fails them instead, so that a broken image can never pass CI as "skipped".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO


def _missing(reason: str) -> None:
    if os.environ.get("SPO_REQUIRE_DOCKER") == "1":
        pytest.fail(f"SPO_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(reason)


def docker_client() -> Any:
    """A client of the daemon at $DOCKER_HOST (``make docker-start`` exports the project's own)."""
    import docker

    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as err:  # no socket, refused, wrong host: all mean "no daemon here"
        _missing(f"no Docker daemon at {os.environ.get('DOCKER_HOST', 'the default socket')}: {err}")
    return client


def require_docker() -> None:
    """Skip (or, under SPO_REQUIRE_DOCKER=1, fail) when no Docker daemon answers."""
    docker_client()


def project_image(flavour: str = "cpu") -> str:
    """An image's tag: $SPO_IMAGE (cpu) or $SPO_IMAGE_CUDA, else build/image-<flavour>.ref (written by
    ``make image`` / ``make image-cuda``). CI builds the CPU image only: a missing CUDA image is
    always a skip (it needs several GB of wheels from the package index)."""
    ref_file = REPO / "build" / f"image-{flavour}.ref"
    image = os.environ.get("SPO_IMAGE" if flavour == "cpu" else f"SPO_IMAGE_{flavour.upper()}") or (
        ref_file.read_text().strip() if ref_file.is_file() else "")
    missing = _missing if flavour == "cpu" else pytest.skip
    if not image:
        missing(f"no {flavour} project image: run `make image{'' if flavour == 'cpu' else '-' + flavour}`")
    client = docker_client()
    try:
        client.images.get(image)
    except Exception as err:
        missing(f"image {image} is not on the Docker host: {err}")
    return image


def dockerfiles() -> list[Path]:
    return [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cuda"]
