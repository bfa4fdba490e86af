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

from spo.errors import WorkspaceNotWritable
from spo.kube.platform import RUN_NAME_ENV
from spo.pipelines.runtime import check_writable, train_folder


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
def test_the_train_step_checks_the_checkpoint_volume_before_creating_its_folders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RUN_NAME_ENV, "spo-pipeline-abc12")
    with pytest.raises(WorkspaceNotWritable), train_folder(str(tmp_path), "dpo", str(tmp_path / "artifact")):
        pass
    assert list(tmp_path.iterdir()) == []
    # with no checkpoint volume it trains on its artifact's own path, KFP's to create: nothing is probed
    with train_folder("", "dpo", str(tmp_path / "artifact")) as folder:
        assert folder == str(tmp_path / "artifact")
