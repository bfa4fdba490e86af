"""The committed KFP files (pipelines/*.yaml, components/*/component.yaml) are current, and usable by others.

They are generated (``make kfp-files``, spo.pipelines.published) from the code, params.yaml and
configs/platform/*.yaml, so a change to any of those without regenerating fails here. The second
test is docs/kubeflow.md's snippet: another pipeline loads one of our component.yaml files. (No ``from
__future__ import annotations``: KFP reads the pipeline parameters' types from the annotations.)
"""

import re
from pathlib import Path

import yaml

from spo.pipelines.published import PIPELINE_STEM, REFERENCE_IMAGE, write_components, write_pipelines

REPO = Path(__file__).resolve().parents[1]
SNIPPET_COMPONENT = "components/train/component.yaml"
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


def _docs_snippet() -> str:
    """docs/kubeflow.md's example of another pipeline loading one of our components."""
    text = (REPO / "docs" / "kubeflow.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    found = [block for block in blocks if f'load_component_from_file("{SNIPPET_COMPONENT}")' in block]
    assert len(found) == 1, f"docs/kubeflow.md: no python block loading {SNIPPET_COMPONENT}"
    return found[0]


def test_a_committed_component_loads_into_another_pipeline(tmp_path: Path) -> None:
    """docs/kubeflow.md's snippet, run: it loads components/train/component.yaml into a pipeline of its own,
    wires it to imported artifacts and compiles."""
    out = tmp_path / "my_dpo.yaml"
    code = _docs_snippet().replace(f'"{SNIPPET_COMPONENT}"', repr(str(REPO / SNIPPET_COMPONENT)))
    # exec: running the docs' own text is the point (a copy here could drift from what readers copy)
    exec(compile(code.replace('"my_dpo.yaml"', repr(str(out))), "docs/kubeflow.md", "exec"), {})  # noqa: S102

    spec = yaml.safe_load(out.read_text(encoding="utf-8"))
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks["train"]["inputs"]["artifacts"]) == {"validated", "degrees", "sft", "reference"}
    assert {
        tasks["train"]["inputs"]["artifacts"][name]["taskOutputArtifact"]["producerTask"]
        for name in ("validated", "degrees", "sft", "reference")
    } == {"importer", "importer-2", "importer-3", "importer-4"}
    executor = spec["deploymentSpec"]["executors"][tasks["train"]["componentRef"]["name"].replace("comp-", "exec-")]
    assert executor["container"]["image"] != REFERENCE_IMAGE  # the snippet names its own image
    assert executor["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    assert "spo.pipelines.runtime" in "\n".join(executor["container"]["command"])  # our step's body, as committed
