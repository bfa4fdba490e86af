"""The project images: the Dockerfiles lint clean, and the built CPU image is what a cluster
expects of it — non-root, runnable as any uid on a read-only root filesystem, offline by default
but switchable at run time, labelled, and free of secrets, data and model weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO
from docker_helpers import docker_client, dockerfiles, project_image

HADOLINT = Path(sys.executable).parent / "hadolint"
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")


@pytest.fixture(params=["cpu", "cuda"])
def image(request: pytest.FixtureRequest) -> str:
    """The built image of each flavour (the CUDA one only where `make image-cuda` ran)."""
    return project_image(request.param)


def _run(image: str, command: list[str], **kwargs) -> str:
    """The command's output in a throwaway container with no network; fails the test on a non-zero exit."""
    client = docker_client()
    container = client.containers.run(image, command, detach=True, network_mode="none", **kwargs)
    try:
        status = container.wait(timeout=600)["StatusCode"]  # a hang guard: the commands take seconds
        stdout = container.logs(stdout=True, stderr=False).decode(errors="replace")
        stderr = container.logs(stdout=False, stderr=True).decode(errors="replace")
    finally:
        container.remove(force=True)
    assert status == 0, f"{command} exited {status}:\n{stderr[-3000:]}"
    return stdout


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_the_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    result = subprocess.run([str(HADOLINT), "--failure-threshold", "info", str(dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_the_dockerfiles_build_offline_from_a_wheelhouse_as_a_non_root_user(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert text.count("FROM ${BASE_IMAGE}") == 2 and "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text
    installs = re.findall(r"pip install ([^\n]*(?:\\\n[^\n]*)*)", text)
    assert installs and all("--no-index" in line for line in installs), installs
    assert re.search(r"^USER 1000:1000$", text, re.M)
    for label in ("source", "revision", "version"):
        assert f"org.opencontainers.image.{label}=" in text


def test_the_image_runs_as_a_non_root_user_with_labels_of_this_version(image: str) -> None:
    attrs = docker_client().images.get(image).attrs
    config = attrs["Config"]
    assert config["User"] == "1000:1000"
    labels = config["Labels"]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.revision"] not in ("", None)
    assert "org.opencontainers.image.source" in labels
    assert _run(image, ["id", "-u"]).strip() == "1000"
    assert _run(image, ["spo", "--version"]).strip().endswith(version)
    assert "run the train stage" in _run(image, ["spo", "--help"])


def test_the_image_holds_the_package_kfp_and_the_torch_of_its_flavour(image: str) -> None:
    out = _run(image, ["python3", "-c",
               "import torch, kfp, kfp.kubernetes, spo.pipelines.components, spo.stages.train; "
               "print(torch.__version__, torch.version.cuda, kfp.__version__)"])
    torch_version, cuda, kfp_version = out.split()
    description = docker_client().images.get(image).attrs["Config"]["Labels"]["org.opencontainers.image.description"]
    if description.endswith("CPU"):
        assert torch_version == "2.13.0+cpu" and cuda == "None"
    else:  # PyPI's CUDA build, e.g. 2.13.0+cu130
        assert torch_version.startswith("2.13.0+cu") and cuda != "None"
    constraints = (REPO / "constraints.txt").read_text()
    assert f"kfp=={kfp_version}" in constraints


def test_any_uid_can_run_a_stage_on_a_read_only_root_filesystem(image: str, tmp_path: Path, hh_slice: Path) -> None:
    """OpenShift-style: an arbitrary uid with no passwd entry, the root filesystem read-only, /tmp a
    tmpfs, data and params mounted read-only, outputs only in the mounted work folder — and the
    stage's result is the one the same stage gives outside the container."""
    host, work = tmp_path / "host", tmp_path / "work"
    for folder in (host, work):
        folder.mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    data = shutil.copytree(hh_slice, tmp_path / "data")  # readable by any uid (pytest's are 0700)
    for path in [data, *data.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    if os.getuid() == 0:
        os.chown(work, 4242, 4242)
    out = _run(image, ["spo", "prepare", "-p", "/config/params.yaml", "--json", "-q"],
               user="4242:4242", read_only=True, tmpfs={"/tmp": "rw,size=64m"}, working_dir="/work",
               environment={"SPO_DATA_DIR": "/data"},
               volumes={str(data): {"bind": "/data", "mode": "ro"},
                        str(tmp_path / "params.yaml"): {"bind": "/config/params.yaml", "mode": "ro"},
                        str(work): {"bind": "/work", "mode": "rw"}})
    env = {**os.environ, "SPO_DATA_DIR": str(hh_slice)}
    expected = subprocess.run([sys.executable, "-m", "spo", "prepare", "-p", str(tmp_path / "params.yaml"),
                               "--json", "-q"], cwd=host, env=env, capture_output=True, text=True, check=True)
    inside, outside = json.loads(out), json.loads(expected.stdout)
    inside.pop("seconds"), outside.pop("seconds")
    assert inside == outside and inside["rows_prepared"] > 0
    for split in ("train", "eval", "test"):
        name = f"data/prepared/{split}.jsonl"
        assert (work / name).read_bytes() == (host / name).read_bytes()
        if os.getuid() == 0:
            assert (work / name).stat().st_uid == 4242


def test_the_offline_switches_are_defaults_a_run_can_override(image: str) -> None:
    env = dict(line.split("=", 1) for line in docker_client().images.get(image).attrs["Config"]["Env"])
    assert all(env[name] == "1" for name in OFFLINE)
    out = _run(image, ["python3", "-c", "import os; print(os.environ['HF_HUB_OFFLINE'])"],
               environment={"HF_HUB_OFFLINE": "0"})
    assert out.strip() == "0"


def test_no_secrets_data_or_weights_are_baked_in(image: str) -> None:
    client = docker_client()
    attrs = client.images.get(image).attrs
    names = [line.split("=", 1)[0] for line in attrs["Config"]["Env"]]
    assert not [n for n in names if re.search(r"KEY|SECRET|PASSWORD|TOKEN", n) and n != "TOKENIZERS_PARALLELISM"]
    history = " ".join(step.get("CreatedBy", "") for step in client.api.history(image))
    assert not re.search(r"sk-[A-Za-z0-9]{8}|OPENAI_API_KEY=|HF_TOKEN=", history)
    # Model weights or data sets anywhere outside the installed libraries' own test fixtures, and
    # nothing in the project's package but code and its package data.
    found = _run(image, ["sh", "-c",
                 "find / -xdev -type f \\( -name '*.safetensors' -o -name '*.gguf' -o -name '*.bin' "
                 "-o -name '*.jsonl' -o -name '*.parquet' -o -name '*.arrow' -o -name '*.ckpt' \\) "
                 "-not -path '/opt/venv/lib/python3.11/site-packages/*' -not -path '/proc/*' 2>/dev/null; "
                 "find /opt/venv/lib/python3.11/site-packages/spo -type f -size +1M"])
    assert found.strip() == "", found
    listing = _run(image, ["ls", "/"]).split()
    assert not {"data", "models", "outputs", "work"} & set(listing), listing
