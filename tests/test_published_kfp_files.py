"""The committed KFP files (pipelines/*.yaml, components/*/component.yaml) are current, and usable by others.

They are generated (``make kfp-files``, spo.pipelines.published) from the code, params.yaml and
configs/platform/*.yaml, so a change to any of those without regenerating fails here. The second
test is docs/kubeflow.md's snippet: another pipeline loads one of our component.yaml files. (No ``from
__future__ import annotations``: KFP reads the pipeline parameters' types from the annotations.)
"""

from pathlib import Path

import yaml

from spo.pipelines.published import PIPELINE_STEM, REFERENCE_IMAGE, write_components, write_pipelines

REPO = Path(__file__).resolve().parents[1]
REGENERATE = "the committed KFP files are stale: run `make kfp-files` and commit pipelines/ and components/"


def _generated(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for pattern in (f"pipelines/{PIPELINE_STEM}.*.yaml", "components/*/component.yaml")
        for path in sorted(folder.glob(pattern))
    }


def test_committed_kfp_files_are_current(tmp_path: Path) -> None:
    write_pipelines(REPO, tmp_path / "pipelines")
    write_components(tmp_path / "components")
    fresh, committed = _generated(tmp_path), _generated(REPO)
    platforms = sorted(path.stem for path in (REPO / "configs" / "platform").glob("*.yaml"))
    assert sorted(name for name in fresh if name.startswith("pipelines/")) == [
        f"pipelines/{PIPELINE_STEM}.{stem}.yaml" for stem in platforms
    ]
    assert "components/train/component.yaml" in fresh
    assert sorted(fresh) == sorted(committed), (
        f"{REGENERATE} (files differ: "
        f"missing {sorted(set(fresh) - set(committed))}, extra {sorted(set(committed) - set(fresh))})"
    )
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{REGENERATE} (changed: {stale})"
    # the same bytes on any machine: nothing of this checkout's place or of the generating machine in them
    for name, data in fresh.items():
        text = data.decode("utf-8")
        assert str(REPO) not in text and str(Path.home()) not in text and str(tmp_path) not in text, name
        assert REFERENCE_IMAGE in text, name


def test_a_committed_component_loads_into_another_pipeline(tmp_path: Path) -> None:
    """docs/kubeflow.md's snippet: load components/train/component.yaml, wire it in a pipeline of one's own."""
    from kfp import compiler, components, dsl
    from kfp.dsl import Dataset, Model

    train = components.load_component_from_file(str(REPO / "components" / "train" / "component.yaml"))

    @dsl.pipeline(name="my-dpo")
    def my_pipeline(params: str, rows_uri: str, degrees_uri: str, sft_uri: str) -> None:
        rows = dsl.importer(artifact_uri=rows_uri, artifact_class=Dataset)
        degrees = dsl.importer(artifact_uri=degrees_uri, artifact_class=Dataset)
        sft = dsl.importer(artifact_uri=sft_uri, artifact_class=Model)
        train(
            params=params,
            validated=rows.output,
            degrees=degrees.output,
            sft=sft.output,
            checkpoints="",
            loss="dpo",
            spo=True,
            spo_variant=True,
        ).set_container_image("registry.example.com/spo-pipeline:cpu-0123456789ab")

    out = tmp_path / "my_dpo.yaml"
    compiler.Compiler().compile(my_pipeline, str(out))
    spec = yaml.safe_load(out.read_text(encoding="utf-8"))
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks["train"]["inputs"]["artifacts"]) == {"validated", "degrees", "sft"}
    assert tasks["train"]["inputs"]["artifacts"]["sft"]["taskOutputArtifact"]["producerTask"] == "importer-3"
    executor = spec["deploymentSpec"]["executors"][tasks["train"]["componentRef"]["name"].replace("comp-", "exec-")]
    assert executor["container"]["image"] == "registry.example.com/spo-pipeline:cpu-0123456789ab"
    assert "spo.pipelines.runtime" in "\n".join(executor["container"]["command"])  # our step's body, as committed
