"""KFP Kubernetes-native manifests: compiler output validated strictly against the vendored CRDs."""

# No `from __future__ import annotations`: kfp reads component annotations at runtime.
import copy
import fnmatch
import hashlib
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from kfp import compiler, dsl

from spo.errors import ManifestValidationError
from spo.kube.manifests import load_crd_schemas, read_manifests, strict_json_schema, validate_manifests

GROUP_VERSION = "pipelines.kubeflow.org/v2beta1"
PIPELINE = ("pipelines.kubeflow.org", "v2beta1", "Pipeline")
PIPELINE_VERSION = ("pipelines.kubeflow.org", "v2beta1", "PipelineVersion")
REPO_ROOT = Path(__file__).resolve().parents[1]


@dsl.component(base_image="python:3.11-slim")
def make_text(n: int) -> str:
    return "x" * n


@dsl.component(base_image="python:3.11-slim")
def show_text(text: str):
    print(text)


@dsl.pipeline(name="toy-pipeline", description="Two steps: make a string, print it.")
def toy_pipeline(n: int = 3):
    show_text(text=make_text(n=n).output)


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compile once in both manifest modes; compiling costs ~0.5 s."""
    out = tmp_path_factory.mktemp("kfp-manifests")
    compiler.Compiler().compile(
        toy_pipeline,
        str(out / "full.yaml"),
        kubernetes_manifest_format=True,
        kubernetes_manifest_options=compiler.KubernetesManifestOptions(
            pipeline_version_name="toy-pipeline-v1",
            namespace="kubeflow",
            include_pipeline_manifest=True,
        ),
    )
    compiler.Compiler().compile(toy_pipeline, str(out / "default.yaml"), kubernetes_manifest_format=True)
    return out


@pytest.fixture
def documents(manifest_dir: Path) -> list[dict[str, Any]]:
    return read_manifests(manifest_dir / "full.yaml")


def rejection(docs: list[Any], **kwargs: Any) -> ManifestValidationError:
    with pytest.raises(ManifestValidationError) as caught:
        validate_manifests(docs, **kwargs)
    return caught.value


def paths(error: ManifestValidationError) -> set[str]:
    return {problem.path for problem in error.problems}


# --------------------------------------------------------------------------- compiler output


def test_compiled_manifests_validate(documents: list[dict[str, Any]]) -> None:
    assert [(d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in documents] == [
        (GROUP_VERSION, "Pipeline", "toy-pipeline"),
        (GROUP_VERSION, "PipelineVersion", "toy-pipeline-v1"),
    ]
    version = documents[1]
    assert version["metadata"]["namespace"] == "kubeflow"
    assert version["spec"]["pipelineName"] == "toy-pipeline"
    assert set(version["spec"]["pipelineSpec"]["root"]["dag"]["tasks"]) == {"make-text", "show-text"}
    validate_manifests(documents)


def test_default_output_is_a_lone_version_needing_an_existing_pipeline(manifest_dir: Path) -> None:
    docs = read_manifests(manifest_dir / "default.yaml")
    assert [(d["kind"], d["metadata"]) for d in docs] == [("PipelineVersion", {"name": "toy-pipeline"})]
    error = rejection(docs)
    assert paths(error) == {"$.spec.pipelineName"}
    validate_manifests(docs, external_pipelines={"toy-pipeline"})


def test_free_form_pipeline_spec_accepts_anything(documents: list[dict[str, Any]]) -> None:
    docs = copy.deepcopy(documents)
    docs[1]["spec"]["pipelineSpec"]["notAnIrField"] = {"deep": [1, 2]}
    docs[1]["spec"]["platformSpec"] = {"whatever": True}
    validate_manifests(docs)


# --------------------------------------------------------------------------- unknown fields


@pytest.mark.parametrize(
    ("doc_index", "where", "field", "path"),
    [
        (0, ("spec",), "bogus", "$.spec.bogus"),
        (1, ("spec",), "pipelineSpecUri", "$.spec.pipelineSpecUri"),
        (1, ("metadata",), "label", "$.metadata.label"),
        (0, (), "status", "$.status"),  # Pipeline has no status in its CRD
        (1, (), "extra", "$.extra"),
    ],
)
def test_unknown_field_is_rejected_with_its_path(
    documents: list[dict[str, Any]], doc_index: int, where: tuple[str, ...], field: str, path: str
) -> None:
    docs = copy.deepcopy(documents)
    target = docs[doc_index]
    for key in where:
        target = target[key]
    target[field] = "x"
    error = rejection(docs)
    assert paths(error) == {path}
    kind, name = docs[doc_index]["kind"], docs[doc_index]["metadata"]["name"]
    assert f"{kind}/{name}" in str(error) and path in str(error) and "unknown field" in str(error)


def test_nested_metadata_and_status_fields_are_checked(documents: list[dict[str, Any]]) -> None:
    docs = copy.deepcopy(documents)
    docs[1]["metadata"]["ownerReferences"] = [
        {"apiVersion": GROUP_VERSION, "kind": "Pipeline", "name": "toy-pipeline", "uid": "1", "extra": 1}
    ]
    docs[1]["status"] = {"conditions": [{"type": "Ready", "status": "Maybe", "reason": "r", "message": "m", "x": 1}]}
    docs[0]["spec"]["tags"] = {"team.example.com/owner": 7}
    error = rejection(docs)
    assert paths(error) == {
        "$.metadata.ownerReferences[0].extra",
        "$.status.conditions[0].x",
        "$.status.conditions[0].status",
        "$.spec.tags['team.example.com/owner']",
    }


def test_missing_required_pipeline_spec(documents: list[dict[str, Any]]) -> None:
    docs = copy.deepcopy(documents)
    del docs[1]["spec"]["pipelineSpec"]
    assert paths(rejection(docs)) == {"$.spec.pipelineSpec"}


# --------------------------------------------------------------------------- kind, apiVersion, names, references


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("kind", "Pipelines", "$.kind"),
        ("kind", None, "$.kind"),
        ("apiVersion", "pipelines.kubeflow.org/v1beta1", "$.apiVersion"),
        ("apiVersion", "v1", "$.apiVersion"),
    ],
)
def test_wrong_kind_or_api_version(documents: list[dict[str, Any]], field: str, value: Any, path: str) -> None:
    docs = copy.deepcopy(documents)
    docs[0][field] = value
    error = rejection(docs)
    # The version's Pipeline no longer counts, so its reference breaks too.
    assert paths(error) == {path, "$.spec.pipelineName"}
    assert "pipelines.kubeflow.org/v2beta1" in str(error)


def test_non_mapping_and_empty_input() -> None:
    assert paths(rejection([["not", "a", "mapping"]])) == {"$"}
    assert "no manifest documents" in str(rejection([]))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("$.metadata.name", "Toy_Pipeline"),
        ("$.metadata.name", "a" * 254),
        ("$.metadata.namespace", "kube.flow"),
    ],
)
def test_names_must_be_dns1123(documents: list[dict[str, Any]], path: str, value: str) -> None:
    docs = copy.deepcopy(documents)
    docs[1]["metadata"][path.rsplit(".", 1)[1]] = value
    error = rejection(docs)
    assert path in paths(error)
    assert "DNS-1123" in str(error)


def test_version_name_follows_crd_pattern_with_re2_anchors(documents: list[dict[str, Any]]) -> None:
    docs = copy.deepcopy(documents)
    docs[1]["spec"]["versionName"] = "v1\n"  # Python's `$` alone would accept this
    assert paths(rejection(docs)) == {"$.spec.versionName"}


def test_version_pointing_at_missing_pipeline(documents: list[dict[str, Any]]) -> None:
    docs = copy.deepcopy(documents)
    docs[1]["spec"]["pipelineName"] = "no-such-pipeline"
    error = rejection(docs)
    assert paths(error) == {"$.spec.pipelineName"}
    assert "PipelineVersion/toy-pipeline-v1" in str(error) and "no-such-pipeline" in str(error)


def test_version_and_pipeline_in_different_namespaces(documents: list[dict[str, Any]]) -> None:
    docs = copy.deepcopy(documents)
    docs[1]["metadata"]["namespace"] = "other"
    error = rejection(docs)
    assert paths(error) == {"$.spec.pipelineName"}
    assert "kubeflow" in str(error)


def test_missing_pipeline_name_and_duplicates(documents: list[dict[str, Any]]) -> None:
    docs = copy.deepcopy(documents)
    del docs[1]["spec"]["pipelineName"]
    assert paths(rejection(docs)) == {"$.spec.pipelineName"}
    duplicated = copy.deepcopy(documents) + [copy.deepcopy(documents[0])]
    error = rejection(duplicated)
    assert paths(error) == {"$.metadata.name"} and "duplicates document 1" in str(error)


def test_error_is_a_value_error(documents: list[dict[str, Any]]) -> None:
    docs = copy.deepcopy(documents)
    docs[0]["spec"]["x"] = 1
    with pytest.raises(ValueError, match=r"Pipeline/toy-pipeline \(document 1\): \$\.spec\.x: unknown field"):
        validate_manifests(docs)


# --------------------------------------------------------------------------- reading


def test_read_manifests_skips_empty_documents_and_keeps_timestamps_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("---\n---\nkind: Pipeline\nmetadata:\n  creationTimestamp: 2024-01-01T00:00:00Z\n---\n")
    assert read_manifests(path) == [{"kind": "Pipeline", "metadata": {"creationTimestamp": "2024-01-01T00:00:00Z"}}]
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="not a mapping"):
        read_manifests(path)


# --------------------------------------------------------------------------- schema conversion


def test_conversion_of_kubernetes_extensions() -> None:
    root = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "port": {"x-kubernetes-int-or-string": True},
                    "note": {"type": "string", "nullable": True},
                    "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                             "properties": {"closed": {"type": "object", "properties": {"a": {"type": "string"}}}}},
                    "template": {"type": "object", "x-kubernetes-embedded-resource": True,
                                 "x-kubernetes-preserve-unknown-fields": True},
                    "empty": {"type": "object"},
                    "max": {"type": "integer", "maximum": 5, "exclusiveMaximum": True},
                },
            }
        },
    }
    schema = strict_json_schema(root)
    spec = schema["properties"]["spec"]
    assert spec["additionalProperties"] is False
    assert spec["properties"]["port"]["type"] == ["integer", "string"]
    assert spec["properties"]["note"]["type"] == ["string", "null"]
    free = spec["properties"]["free"]
    assert "additionalProperties" not in free  # preserved at this node ...
    assert free["properties"]["closed"]["additionalProperties"] is False  # ... but not inherited
    template = spec["properties"]["template"]
    assert {"apiVersion", "kind"} <= set(template["required"]) and "metadata" in template["properties"]
    assert spec["properties"]["empty"]["additionalProperties"] is False  # bare object: everything is pruned
    assert spec["properties"]["max"]["exclusiveMaximum"] == 5 and "maximum" not in spec["properties"]["max"]
    assert {"apiVersion", "kind", "metadata"} <= set(schema["required"])


def test_cel_rules_are_refused_not_skipped() -> None:
    with pytest.raises(ValueError, match="x-kubernetes-validations"):
        strict_json_schema({"type": "object", "x-kubernetes-validations": [{"rule": "self.a > 0"}]})


# --------------------------------------------------------------------------- vendored files


def crd_folder() -> Any:
    return resources.files("spo.kube").joinpath("crds", "kfp")


def source() -> dict[str, Any]:
    return json.loads(crd_folder().joinpath("SOURCE.json").read_text(encoding="utf-8"))


def test_schemas_load_through_importlib_resources() -> None:
    schemas = load_crd_schemas()
    assert set(schemas) == {PIPELINE, PIPELINE_VERSION}
    version_spec = schemas[PIPELINE_VERSION]["properties"]["spec"]
    assert version_spec["required"] == ["pipelineSpec"]
    assert version_spec["properties"]["pipelineSpec"] == {"x-kubernetes-preserve-unknown-fields": True}
    schemas[PIPELINE]["properties"].clear()  # callers get copies, not the cache
    assert load_crd_schemas()[PIPELINE]["properties"]


def test_source_json_sha256s_match_vendored_files() -> None:
    meta = source()
    assert meta["repository"] == "https://github.com/kubeflow/pipelines"
    assert meta["tag"] and len(meta["commit"]) == 40
    listed = {entry["file"] for entry in meta["files"]}
    on_disk = {item.name for item in crd_folder().iterdir() if item.name.endswith(".yaml")}
    assert listed == on_disk
    for entry in meta["files"]:
        data = crd_folder().joinpath(entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["file"]
        # git's blob id: lets anyone check the copy against the upstream tree.
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        assert blob == entry["git_blob"], entry["file"]
        assert entry["source_path"].endswith(entry["file"])


def test_crd_files_are_package_data() -> None:
    """A wheel only ships files matched by package-data; without them load_crd_schemas fails when installed."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["spo"]
    for item in crd_folder().iterdir():
        relative = f"kube/crds/kfp/{item.name}"
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
