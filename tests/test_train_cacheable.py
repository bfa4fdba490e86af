"""The train steps stay cacheable on a real KFP backend, and a retried one still resumes (issue 23).

KFP >= 2.15 puts the names of the PVCs a task mounts into its cache key, and the run's workspace
PVC among them whenever the task's inputs reach the workspace (kubeflow/pipelines#12220). At tag
2.17.0 (commit 4a3592cb2dd0a91a4652ab93893ec8beda1f3158):

- ``backend/src/v2/driver/container.go`` (lines 149-173): when caching, the names of the PVCs of
  the task's ``pvcMount`` entries go into the key, and ``GetWorkspacePVCName(opts.RunName)``
  (``<workflow name>-kfp-workspace``, ``k8s.go`` line 125) too if ``needsWorkspaceMount``;
- ``backend/src/v2/driver/driver.go`` (lines 519-550), ``needsWorkspaceMount``: an input parameter
  whose string value holds ``{{$.workspace_path}}`` or ``/kfp-workspace``, or an input artifact
  whose metadata has ``_kfp_workspace: true``;
- ``backend/src/v2/driver/cache.go`` (lines 80-116), ``getFingerPrint``: the key is the inputs,
  the outputs' definitions, command and args, the image and those PVC names, nothing else — no
  environment variable.

:func:`run_name_in_key` reads the compiled IR by those rules: a task for which it is true gets a
new key in every run and is never taken from the cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from spo.kube.platform import RUN_NAME_ENV, WORKFLOW_LABEL, CheckpointVolume, Platform, load_platform
from spo.pipelines.runtime import train_folder

REPO = Path(__file__).resolve().parents[1]
PLATFORMS = REPO / "configs" / "platform"
WORKSPACE_MARKERS = ("{{$.workspace_path}}", "/kfp-workspace")  # driver.go, needsWorkspaceMount


def _compile(tmp_path: Path, platform: Platform) -> tuple[dict[str, Any], dict[str, Any]]:
    from spo.pipelines.compile import compile_pipeline

    path = tmp_path / "platform.yaml"
    path.write_text(yaml.safe_dump(platform.model_dump(mode="json", exclude_none=True)))
    out = compile_pipeline(tmp_path / "pipeline.yaml", params=REPO / "params.yaml", platform=path)
    spec, platform_spec = [d for d in yaml.safe_load_all(out.read_text()) if d]
    return spec, platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every task the driver runs: the pipeline's, and the one in the grid's loop (once per cell)."""
    tasks = {}
    for name, task in spec["root"]["dag"]["tasks"].items():
        if "parameterIterator" in task:
            tasks.update(spec["components"][task["componentRef"]["name"]]["dag"]["tasks"])
        else:
            tasks[name] = task
    return tasks


def run_name_in_key(task: dict[str, Any]) -> bool:
    """Whether KFP 2.17's driver puts the run's workspace PVC name into this task's cache key."""
    for value in task.get("inputs", {}).get("parameters", {}).values():
        constant = value.get("runtimeValue", {}).get("constant")
        if isinstance(constant, str) and any(marker in constant for marker in WORKSPACE_MARKERS):
            return True
    return False  # no importer here downloads to the workspace (the _kfp_workspace artifact metadata)


def _with_checkpoints(platform: Platform, claim: str = "spo-checkpoints") -> Platform:
    return platform.model_copy(update={"checkpoints": CheckpointVolume(claim=claim)})


@pytest.mark.parametrize("name", ["gpu", "multinode"])
def test_with_a_checkpoint_volume_no_step_has_the_run_in_its_cache_key(tmp_path: Path, name: str) -> None:
    spec, executors = _compile(tmp_path, _with_checkpoints(load_platform(PLATFORMS / f"{name}.yaml")))
    tasks = _tasks(spec)
    assert [t for t, task in tasks.items() if run_name_in_key(task)] == []
    assert set(tasks["publish"]["inputs"]["parameters"]) >= {"run_id"}  # no workspace (it writes in scratch)
    trains = [t for t in tasks if t.startswith("train")]
    assert len(trains) == 1  # one task in the grid's loop, run once per cell
    for t in trains:
        assert tasks[t]["cachingOptions"] == {"enableCache": True}
        executor = executors[f"exec-{t}"]
        # the one PVC in the key: the same name in every run
        assert executor["pvcMount"] == [{"constant": "spo-checkpoints", "mountPath": "/spo-checkpoints",
                                         "pvcNameParameter": {"runtimeValue": {"constant": "spo-checkpoints"}}}]
        # the run's folder on it comes from the pod label Argo puts on every pod of the workflow, as an
        # environment variable: not in the key (cache.go), the same for each retry of the task
        assert executor["fieldPathAsEnv"] == [{"name": RUN_NAME_ENV,
                                               "fieldPath": f"metadata.labels['{WORKFLOW_LABEL}']"}]


def test_without_one_a_single_pod_train_is_still_cacheable_and_a_trainjob_is_not(tmp_path: Path) -> None:
    spec, executors = _compile(tmp_path, load_platform(PLATFORMS / "gpu.yaml").model_copy(update={"checkpoints": None}))
    tasks = _tasks(spec)
    assert [t for t, task in tasks.items() if run_name_in_key(task)] == []
    assert "pvcMount" not in executors["exec-train"] and "fieldPathAsEnv" not in executors["exec-train"]
    spec, _ = _compile(tmp_path, load_platform(PLATFORMS / "multinode.yaml").model_copy(update={"checkpoints": None}))
    tasks = _tasks(spec)
    # its pods need a volume to be handed their inputs: the run's workspace, whose name is per run
    assert sorted(t for t, task in tasks.items() if run_name_in_key(task)) == ["train-job"]


def test_the_example_gpu_platforms_name_a_checkpoint_volume() -> None:
    for name in ("gpu", "multinode"):
        assert load_platform(PLATFORMS / f"{name}.yaml").checkpoints is not None, name


def test_a_checkpoint_volume_under_the_workspace_mount_is_refused() -> None:
    # driver.go (2.17.0, line 816): "user volume mount at %s conflicts with workspace mount at %s"
    with pytest.raises(ValueError, match="/kfp-workspace"):
        CheckpointVolume(claim="c", mount_path="/kfp-workspace/ckpt")
    CheckpointVolume(claim="c", mount_path="/kfp-workspace-not")  # a sibling is fine


def test_a_train_task_works_in_its_runs_folder_resumes_there_and_clears_it_once_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    volume = tmp_path / "ckpt"
    volume.mkdir()
    monkeypatch.setenv(RUN_NAME_ENV, "spo-pipeline-x7k2p")
    with pytest.raises(RuntimeError, match="pre-empted"), train_folder(str(volume), "dpo_spo", "unused") as folder:
        assert folder == str(volume / "spo-pipeline-x7k2p" / "dpo_spo")
        (Path(folder) / "checkpoints" / "step-10").mkdir(parents=True)
        raise RuntimeError("pre-empted")
    assert (volume / "spo-pipeline-x7k2p/dpo_spo/checkpoints/step-10").is_dir()  # kept for the retry
    with train_folder(str(volume), "dpo", "unused"):
        pass  # the other policy finished
    assert (volume / "spo-pipeline-x7k2p").is_dir() and not (volume / "spo-pipeline-x7k2p/dpo").exists()
    with train_folder(str(volume), "dpo_spo", "unused") as folder:  # the retry: same folder, checkpoints there
        assert (Path(folder) / "checkpoints" / "step-10").is_dir()
    assert list(volume.iterdir()) == []  # both stored: nothing of the run is left on the volume


@pytest.mark.parametrize("value", ["", "a/b", ".."])
def test_a_train_task_without_the_run_name_stops_naming_the_label(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(RUN_NAME_ENV, value)
    with pytest.raises(RuntimeError, match=WORKFLOW_LABEL), train_folder(str(tmp_path), "dpo", "unused"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_the_platform_file_round_trips_the_checkpoint_volume(tmp_path: Path) -> None:
    platform = _with_checkpoints(load_platform(PLATFORMS / "local.yaml"), claim="ckpt")
    assert json.loads(platform.model_dump_json())["checkpoints"] == {"claim": "ckpt", "mount_path": "/spo-checkpoints"}


# --------------------------------------------------------------------------- prepare's key follows the data


def test_on_a_data_volume_prepare_is_keyed_by_the_datas_content(tmp_path: Path) -> None:
    """The driver keys a mounted PVC by its name only (container.go, lines 149-162): a version of
    the data, computed each run by an uncached step on that volume, is what makes prepare rerun on
    new data. Off a data volume there is no such step."""
    from spo.kube.platform import DataVolume

    platform = load_platform(PLATFORMS / "gpu.yaml").model_copy(
        update={"data_volume": DataVolume(claim="spo-data", mount_path="/data")})
    spec, executors = _compile(tmp_path, platform)
    tasks = spec["root"]["dag"]["tasks"]
    assert not tasks["data-version"].get("cachingOptions", {}).get("enableCache")  # it reads the volume every run
    assert executors["exec-data-version"]["pvcMount"][0]["mountPath"] == "/data"
    assert tasks["prepare"]["inputs"]["parameters"]["data_version"] == {
        "taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "data-version"}}
    assert tasks["prepare"]["cachingOptions"] == {"enableCache": True}
    spec, _ = _compile(tmp_path, load_platform(PLATFORMS / "gpu.yaml"))
    tasks = spec["root"]["dag"]["tasks"]
    assert "data-version" not in tasks
    assert tasks["prepare"]["inputs"]["parameters"]["data_version"] == {"runtimeValue": {"constant": ""}}


def test_the_data_version_changes_with_the_bytes_not_with_a_fresh_copy(tmp_path: Path) -> None:
    from conftest import write_raw

    from spo.pipelines.runtime import data_version

    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    for split in ("train", "test"):
        write_raw(tmp_path / "a", "hh", split, [row])

    def at(folder: Path) -> str:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["data"]["local_dir"] = str(folder)
        return data_version(yaml.safe_dump(params))

    first = at(tmp_path / "a")
    assert set(json.loads(first)) == {"train", "test"}
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # copied anew: other inodes and times, the same bytes
    assert at(tmp_path / "b") == first
    write_raw(tmp_path / "b", "hh", "train", [row, row])
    assert at(tmp_path / "b") != first
