"""charts/spo/values.schema.json: its platform part generated from spo.kube.platform.Platform and
current, the chart's values valid under it, bad platform values refused by it as Helm refuses them,
and the chart's translation of its values into the platform file (spo.platform in _helpers.tpl)
covering every Platform field.

Helm validates the coalesced values (values.yaml, then each -f file over it) against the schema.
Helm <= 3.17 uses xeipuuv/gojsonschema (pkg/chartutil/jsonschema.go). Helm 3.18+ and 4 use
santhosh-tekuri/jsonschema/v6 (helm/helm#13283; v4's pkg/chart/common/util/jsonschema.go), which
follows ``$schema``. The file declares draft-07, so the jsonschema checks here use Draft7Validator
on the same merged values. The same values also go through Helm's own engine (helm-python-sdk),
which must refuse them at the same place.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from chart_helpers import CHART, deep_merge, example, objects, one, render
from pydantic import BaseModel, TypeAdapter

from spo.kube import chart_schema
from spo.kube.platform import TORCHRUN_ENV, Platform

SCHEMA_FILE = CHART / "values.schema.json"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


def _validator() -> jsonschema.protocols.Validator:
    schema = _schema()
    cls = jsonschema.validators.validator_for(schema)
    assert cls is jsonschema.Draft7Validator  # what the file declares, and what every Helm 3 and 4 reads
    cls.check_schema(schema)
    return cls(schema)


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part] if isinstance(tree, dict) else getattr(tree, part)
    return tree


# --------------------------------------------------------------------------- generated and current


def test_the_schema_file_is_generated_from_the_platform_model() -> None:
    text = SCHEMA_FILE.read_text()
    fresh = chart_schema.render(chart_schema.generate(json.loads(text)))
    assert fresh == text, "charts/spo/values.schema.json is not what spo.kube.platform.Platform gives: " \
                          "run `make chart-schema`"


def test_the_check_names_the_command_when_the_file_is_stale(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    stale = _schema()
    stale["properties"]["pools"]["additionalProperties"]["properties"]["retries"]["minimum"] = -5
    path = tmp_path / "values.schema.json"
    path.write_text(chart_schema.render(stale))
    assert chart_schema.main(["--check", str(path)]) == 1
    assert "run `make chart-schema`" in capsys.readouterr().err
    assert chart_schema.main([str(path)]) == 0 and path.read_text() == SCHEMA_FILE.read_text()


def test_generating_rewrites_only_the_platform_part() -> None:
    """The hand-written rest (image.repository, kfp, storage's PVC settings, ...) is left as it is."""
    current = _schema()
    edited = copy.deepcopy(current)
    edited["properties"]["kfp"]["properties"]["host"]["pattern"] = "^edited$"  # hand-written: kept
    edited["properties"]["pools"] = {"type": "object"}  # generated: restored
    edited["properties"]["storage"]["properties"]["workspace"] = {}
    out = chart_schema.generate(edited)
    assert out["properties"]["kfp"]["properties"]["host"]["pattern"] == "^edited$"
    out["properties"]["kfp"]["properties"]["host"]["pattern"] = current["properties"]["kfp"]["properties"]["host"][
        "pattern"]
    assert chart_schema.render(out) == chart_schema.render(current)
    assert list(out["properties"]) == list(current["properties"])  # the values' order survives


def test_descriptions_come_from_the_model() -> None:
    pool = _schema()["properties"]["pools"]["additionalProperties"]["properties"]
    fields = _models(Platform.model_fields["pools"].annotation)[0].model_fields
    assert pool["nodes"]["description"] == fields["nodes"].description
    assert pool["activeDeadline"]["description"] == fields["active_deadline"].description


# --------------------------------------------------------------------------- what the schema takes and refuses


@pytest.mark.parametrize("name", ["values.yaml", "gpu-pools", "multinode"])
def test_the_charts_values_are_valid(name: str) -> None:
    values = VALUES if name == "values.yaml" else deep_merge(VALUES, example(name))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(values)]
    assert errors == []


REFUSED: dict[str, tuple[dict[str, Any], tuple[str, str]]] = {  # values -> (where, what): JSON pointer, keyword
    "an unknown pool key": ({"pools": {"gpu": {"nodeSelectr": {"a": "b"}}}}, ("/pools/gpu", "additionalProperties")),
    "an unknown toleration key": ({"pools": {"gpu": {"tolerations": [{"key": "a", "efect": "NoSchedule"}]}}},
                                  ("/pools/gpu/tolerations/0", "additionalProperties")),
    "an unknown workspace key": ({"storage": {"workspace": {"storage_class": "x"}}},
                                 ("/storage/workspace", "additionalProperties")),
    "an unknown step": ({"steps": {"finetune": "gpu"}}, ("/steps", "additionalProperties")),
    "retries as a string": ({"pools": {"gpu": {"retries": "2"}}}, ("/pools/gpu/retries", "type")),
    "a CPU quantity as a number, which Platform refuses": ({"pools": {"cpu": {"requests": {"cpu": 4}}}},
                                                           ("/pools/cpu/requests/cpu", "type")),
    "caching as a string": ({"caching": "yes"}, ("/caching", "type")),
    "an affinity weight over 100": ({"pools": {"gpu": {"affinity": [{"matchExpressions": [
        {"key": "zone", "operator": "In", "values": ["a"]}], "weight": 101}]}}},
        ("/pools/gpu/affinity/0/weight", "maximum")),
    "a duration in words": ({"pools": {"gpu": {"activeDeadline": "2 days"}}}, ("/pools/gpu/activeDeadline", "pattern")),
}


@pytest.mark.parametrize("case", REFUSED)
def test_bad_platform_values_are_refused_here_and_by_helm(case: str) -> None:
    import helm_python as helm

    values, (where, keyword) = REFUSED[case]
    found = [("/" + "/".join(map(str, e.absolute_path)), e.validator)
             for e in _validator().iter_errors(deep_merge(VALUES, values))]
    assert (where, keyword) in found, found
    with pytest.raises(helm.HelmValuesError) as refused:
        render(values)
    assert f"at '{where}'" in str(refused.value), str(refused.value)


def test_a_duration_string_is_taken_as_platform_takes_it() -> None:
    values = deep_merge(VALUES, {"pools": {"gpu": {"activeDeadline": "1h30m"}}})
    assert list(_validator().iter_errors(values)) == []


def test_torchruns_own_variables_are_refused_at_install() -> None:
    """Pool._not_torchrun_env's rule, from the same TORCHRUN_ENV (Helm names the variable, not the pool)."""
    import helm_python as helm

    values = {"pools": {"gpu": {"env": {"PET_NNODES": "2"}}}}
    found = [("/" + "/".join(map(str, e.absolute_path)), e.message) for e in _validator().iter_errors(
        deep_merge(VALUES, values))]
    assert found == [("/pools/gpu/env", "'PET_NNODES' should not be valid under {'enum': " +
                      repr(list(TORCHRUN_ENV)) + "}")]
    with pytest.raises(helm.HelmValuesError, match="invalid propertyName 'PET_NNODES'"):
        render(values)


# --------------------------------------------------------------------------- the template's translation


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The platform models inside an annotation (X, X | None, list[X], dict[str, X])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every field of a platform model, nested models' fields as dotted paths (maps and lists looked through)."""
    for name, field in model.model_fields.items():
        yield prefix + name
        for sub in _models(field.annotation):
            yield from _fields(sub, f"{prefix}{name}.")


def _to_platform(value: Any, annotation: Any) -> Any:
    """Chart values in the platform file's field names (what spo.platform in _helpers.tpl writes)."""
    models = _models(annotation)
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        names = {chart_schema.chart_key(annotation.__name__, f): f for f in annotation.model_fields}
        return {names[k]: _to_platform(v, annotation.model_fields[names[k]].annotation) for k, v in value.items()}
    if origin is dict:
        return {k: _to_platform(v, typing.get_args(annotation)[1]) for k, v in value.items()}
    if origin is list:
        return [_to_platform(v, typing.get_args(annotation)[0]) for v in value]
    if origin in (typing.Union, types.UnionType) and models:
        return _to_platform(value, models[0])
    return value


def _annotation(platform_path: str) -> Any:
    model: type[BaseModel] = Platform
    *parents, name = platform_path.split(".")
    for parent in parents:
        model = _models(model.model_fields[parent].annotation)[0]
    return model.model_fields[name].annotation


def test_every_platform_field_is_generated_composed_or_left_out_by_name() -> None:
    fields = set(_fields(Platform))
    generated = set(chart_schema.CHART_VALUES.values())
    listed = generated | set(chart_schema.COMPOSED) | set(chart_schema.NOT_IN_CHART)
    assert listed <= fields, f"not Platform fields: {sorted(listed - fields)}"
    uncovered = sorted(f for f in fields if not any(f == p or f.startswith(p + ".") or p.startswith(f + ".")
                                                    for p in listed))
    assert uncovered == [], (f"Platform fields the chart neither generates nor composes: {uncovered}; map them in "
                             "spo.kube.chart_schema (and spo.platform in charts/spo/templates/_helpers.tpl)")


FULL_POOL = {  # every Pool field, each with a value that is not its default
    "accelerator": {"type": "nvidia.com/gpu", "count": 8},
    "nodeSelector": {"pool": "full"},
    "tolerations": [{"key": "spot", "operator": "Equal", "value": "yes", "effect": "NoExecute",
                     "tolerationSeconds": 300}],
    "affinity": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}], "weight": 50}],
    "requests": {"cpu": "8", "memory": "64Gi"},
    "limits": {"cpu": "16", "memory": "128Gi"},
    "retries": 3,
    "retryBackoff": "90s",
    "env": {"NCCL_DEBUG": "INFO"},
    "secretEnv": {"HF_TOKEN": {"name": "hf", "key": "token"}},
    "nodes": 2,
    "processesPerNode": 4,
    "activeDeadline": "1h30m",
    "trainerRuntime": "torch-custom",
}
FULL = {  # and every other generated value
    "image": {"pullPolicy": "Always", "pullSecrets": ["regcred"]},
    "pools": {"full": FULL_POOL},
    "steps": {"train": "full"},
    "launcherPool": "cpu",
    "caching": False,
    "storage": {"workspace": {"size": "3Ti", "storageClass": "cephfs", "accessModes": ["ReadWriteMany"]},
                "checkpoints": {"mountPath": "/ckpt", "accessModes": ["ReadWriteMany"]},
                "data": {"mountPath": "/datasets"}},
    "dvcRemote": {"enabled": True, "url": "s3://bucket/spo", "name": "lab",
                  "credentials": {"existingSecret": "dvc", "accessKeyIdKey": "id", "secretAccessKeyKey": "secret"}},
    "judge": {"backend": "openai", "apiKey": {"existingSecret": "judge", "key": "token"}},
}


def _unset(schema: dict[str, Any], values: list[Any], where: str) -> list[str]:
    """Properties of a generated schema that none of ``values`` sets."""
    missing = []
    for key, sub in schema.get("properties", {}).items():
        present = [v[key] for v in values if isinstance(v, dict) and key in v]
        if not present:
            missing.append(f"{where}{key}")
            continue
        inner = [x for p in present for x in (p if isinstance(p, list) else [p])]
        if isinstance(sub.get("additionalProperties"), dict):
            inner = [x for p in present for x in p.values()]
            sub = sub["additionalProperties"]
        missing += _unset(sub.get("items", sub), inner, f"{where}{key}.")
    return missing


def test_the_template_copies_every_generated_value_into_the_platform_file() -> None:
    """Each chart value of CHART_VALUES, rendered by Helm, is its Platform field's value."""
    values = deep_merge(deep_merge(VALUES, example("multinode")), FULL)
    part = chart_schema.platform_part()
    unset = [p for path, node in part.items() if path != "steps"  # steps: a map of step -> pool
             for p in _unset({"properties": {path: node}}, [{path: _get(values, path)}], "")]
    assert unset == [], f"FULL leaves these generated values unset: {unset}"
    rendered = yaml.safe_load(one(objects(values), "ConfigMap")["data"]["platform.yaml"])
    platform = Platform.model_validate(rendered)
    for chart_path, platform_path in chart_schema.CHART_VALUES.items():
        annotation = _annotation(platform_path)
        adapter = TypeAdapter(annotation)
        expected = adapter.validate_python(_to_platform(_get(values, chart_path), annotation))
        assert adapter.dump_python(_get(platform, platform_path)) == adapter.dump_python(expected), chart_path
