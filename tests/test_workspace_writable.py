"""The run's workspace volume is checked writable before a step writes there (issue 23).

KFP sets no ``fsGroup`` on task pods (kubeflow/pipelines#3866, open) and a dynamically provisioned
block volume has a root-owned 0755 root, so the image's uid 1000 cannot write: the step must say so,
with what to change, instead of failing with a bare PermissionError on every retry. These tests run
as root here, where nothing is refused, so the refusal is injected at the write itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spo.pipelines import runtime
from spo.pipelines.runtime import WorkspaceNotWritable, check_writable, workspace_dir


@pytest.fixture
def refusing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write of a file is refused, as the kernel refuses uid 1000 on a root-owned 0755 folder."""
    def refuse(self: Path, data: bytes) -> int:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", refuse)


def test_a_writable_workspace_passes_and_keeps_no_probe(tmp_path: Path) -> None:
    check_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("refusing")
def test_a_root_owned_workspace_is_refused_with_owner_mode_and_fix(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    with pytest.raises(WorkspaceNotWritable) as err:
        check_writable(tmp_path)
    message = str(err.value)
    assert f"uid {os.getuid()}" in message and f"owned by uid {tmp_path.stat().st_uid}" in message
    assert "mode 0755" in message and "fsGroup" in message and "docs/operations.md" in message


@pytest.mark.usefixtures("refusing")
def test_the_train_step_checks_before_creating_its_folders(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceNotWritable):
        workspace_dir(str(tmp_path), "models", "policy", "dpo")
    assert not (tmp_path / "models").exists()
    # an artifact's own path (no parts) is KFP's to create, and is not probed
    assert workspace_dir(str(tmp_path / "artifact")) == str(tmp_path / "artifact")


@pytest.mark.usefixtures("refusing")
def test_publish_checks_before_writing_on_the_workspace(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(WorkspaceNotWritable):
        runtime.publish(outputs={}, params_text="seed: 0\n", dvc_yaml="stages: {}\n", dvcignore="",
                        workspace=str(tmp_path / "ws"), remote=None, run_id="r", dvc_lock=out / "dvc.lock",
                        params_yaml=out / "params.yaml", results=out / "results.tar.gz")
    assert not (tmp_path / "ws" / "dvc-publish").exists()
