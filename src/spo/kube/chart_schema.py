"""The Helm chart's values schema, its platform part generated from :class:`spo.kube.platform.Platform`.

The platform's fields used to be written three times: the pydantic ``Platform``, the chart's
``charts/spo/values.schema.json`` and the chart's translation of its values into the platform file
(``spo.platform`` in ``templates/_helpers.tpl``). Two copies drifted: the schema took ``cpu: 4``,
which ``Platform`` refuses, so the mistake passed ``helm install`` and failed in the upload hook.
Here ``Platform`` is the source. Each chart value in :data:`CHART_VALUES` gets the JSON schema
pydantic derives for its platform field, with the chart's camelCase keys, descriptions and all.
Only a few things are written out here, each with its reason. :data:`CHART_ONLY` holds rules the
chart checks at install time that the platform file leaves to Kubernetes (quantities, variable
names). :data:`WIDENED` holds the one input pydantic's schema under-states. The step names come
from ``STEP_NAMES``.

The rest of values.schema.json (image, kfp, rbac, storage's PVCs, ...) describes values of the
chart's own shape and stays hand-written: this module rewrites only the nodes it owns, in place,
so the file stays the single file Helm reads and edits elsewhere in it survive. Each generated
node carries a ``$comment`` naming its source. ``tests/test_chart_schema.py`` checks that the file
is current, and that every platform field is either generated here or listed in :data:`COMPOSED`
or :data:`NOT_IN_CHART`.

The file declares JSON Schema draft-07, which every Helm 3 and 4 reads. Helm <= 3.17 validates with
xeipuuv/gojsonschema (drafts 4/6/7, pkg/chartutil/jsonschema.go). Helm 3.18+ and 4 use
santhosh-tekuri/jsonschema/v6 (helm/helm#13283; v4's pkg/chart/common/util/jsonschema.go), which
follows ``$schema``. So ``$ref`` is inlined: draft-07 has no ``$defs``. ``Optional`` collapses to its type,
because an empty or absent chart value means unset and the chart needs no ``null``.

    python -m spo.kube.chart_schema            # rewrite charts/spo/values.schema.json (make chart-schema)
    python -m spo.kube.chart_schema --check    # exit 1 when it is not current
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from spo.kube.platform import STEP_NAMES, TORCHRUN_ENV, Platform

SCHEMA_PATH = Path("charts/spo/values.schema.json")
REGENERATE = "make chart-schema"

# chart value (dotted path) -> the Platform field (dotted path) whose schema it takes; the chart's
# template (spo.platform in _helpers.tpl) copies each into the platform file under that field's name
CHART_VALUES: dict[str, str] = {
    "image.pullPolicy": "image_pull_policy",
    "image.pullSecrets": "image_pull_secrets",
    "pools": "pools",
    "defaultPool": "default_pool",
    "steps": "steps",
    "launcherPool": "launcher_pool",
    "caching": "caching",
    "storage.workspace": "workspace",
    "storage.checkpoints.mountPath": "checkpoints.mount_path",
    "storage.data.mountPath": "data_volume.mount_path",
    "dvcRemote.name": "dvc_remote.name",
    "dvcRemote.credentials.accessKeyIdKey": "dvc_remote.credentials_secret.access_key_id_key",
    "dvcRemote.credentials.secretAccessKeyKey": "dvc_remote.credentials_secret.secret_access_key_key",
    "judge.apiKey.key": "judge_api_key.key",
}
# Platform field -> the chart values the template builds it from (their schema stays hand-written:
# an empty string there means "unset" or "create one", which the platform field has no word for)
COMPOSED: dict[str, str] = {
    "image": "image.registry, image.repository, image.tag, image.digest (spo.image)",
    "checkpoints.claim": "storage.checkpoints.existingClaim, or the PVC of storage.checkpoints.create",
    "data_volume.claim": "storage.data.existingClaim, or the PVC of storage.data.create",
    "dvc_remote.url": "dvcRemote.url, when dvcRemote.enabled",
    "dvc_remote.endpoint_url": "dvcRemote.endpoint (empty: unset)",
    "dvc_remote.region": "dvcRemote.region (empty: unset)",
    "dvc_remote.credentials_secret.name": "dvcRemote.credentials.existingSecret, or the Secret of "
                                          "dvcRemote.credentials.create",
    "judge_api_key.name": "judge.apiKey.existingSecret, when judge.backend is openai",
}
# Platform field -> why the chart leaves it at its default
NOT_IN_CHART: dict[str, str] = {
    "dvc_remote.credentials_secret.session_token_key": "long-lived keys only: the Secret the chart makes holds "
                                                       "none, and a session token expires before a recurring run",
}
# the chart's key where it is not the field's name in camelCase: (model, field) -> key
RENAMED: dict[tuple[str, str], str] = {("Pool", "node_affinity"): "affinity"}

_QUANTITY = {"pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"}  # Kubernetes resource.Quantity
# a C identifier, as shells and the kubelet take it, and not one of torchrun's (Pool._not_torchrun_env)
_ENV_NAME = {"propertyNames": {"pattern": r"^[A-Za-z_][A-Za-z0-9_]*$", "not": {"enum": list(TORCHRUN_ENV)}}}
# chart value ("*": any key of a map, any item of a list) -> keywords the chart adds to the generated
# schema: rules the platform file leaves to the API server or the compiler, which `helm install`
# checks before anything is created. Adding one the model already has is an error.
CHART_ONLY: dict[str, dict[str, Any]] = {
    "image.pullSecrets.*": {"minLength": 1},
    "pools": {"minProperties": 1, "propertyNames": {"pattern": r"^[A-Za-z0-9][A-Za-z0-9_-]*$"}},
    "pools.*.accelerator.type": {"pattern": r"^([a-z0-9.-]+/)?[A-Za-z0-9._-]+$"},  # an extended resource name
    "pools.*.requests.cpu": _QUANTITY,
    "pools.*.requests.memory": _QUANTITY,
    "pools.*.limits.cpu": _QUANTITY,
    "pools.*.limits.memory": _QUANTITY,
    # a subset of what KFP's compiler takes (kfp.dsl.structures.convert_duration_to_seconds)
    "pools.*.retryBackoff": {"pattern": r"^[0-9]+(s|m|h)$"},
    "pools.*.env": _ENV_NAME,
    "pools.*.secretEnv": _ENV_NAME,
    "pools.*.secretEnv.*.name": {"minLength": 1},
    "pools.*.secretEnv.*.key": {"minLength": 1},
    "defaultPool": {"minLength": 1},
    "steps.*": {"minLength": 1},
    "storage.workspace.size": _QUANTITY,
    "storage.workspace.accessModes": {"minItems": 1, "uniqueItems": True},
    "dvcRemote.credentials.accessKeyIdKey": {"minLength": 1},
    "dvcRemote.credentials.secretAccessKeyKey": {"minLength": 1},
    "judge.apiKey.key": {"minLength": 1},
}
# chart value -> keywords that replace the generated ones: Pool._duration (a before-validator) turns
# '48h' into seconds, and pydantic's schema shows only the integer it validates into
WIDENED: dict[str, dict[str, Any]] = {
    "pools.*.activeDeadline": {"type": ["integer", "string"], "pattern": r"^([0-9]+|([0-9]+h)?([0-9]+m)?([0-9]+s)?)$"},
}

_KEPT = ("type", "enum", "const", "pattern", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
         "exclusiveMaximum", "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties")
_DROPPED = ("title", "default")  # pydantic's titles repeat the key; the defaults are values.yaml's
# the key order of a generated node (the rest of the file keeps its own)
_ORDER = ("$comment", "description", "type", "enum", "const", *_KEPT[3:], "propertyNames", "not", "anyOf",
          "additionalProperties", "required", "properties", "items")


def chart_key(model: str, field: str) -> str:
    """The chart's key for a field of a platform model: its name in camelCase, unless renamed."""
    if (model, field) in RENAMED:
        return RENAMED[(model, field)]
    head, *rest = field.split("_")
    return head + "".join(word.capitalize() for word in rest)


def _description(text: str) -> str:
    return " ".join(text.replace("``", "`").split())


def _translate(node: dict[str, Any], defs: dict[str, Any], model: str = "Platform") -> dict[str, Any]:
    """One node of pydantic's schema in the chart's terms (``model``: whose properties these are)."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        resolved = _translate(defs[name], defs, name)
        resolved.update(_translate({k: v for k, v in node.items() if k != "$ref"}, defs))  # the field's own words
        return resolved
    if "anyOf" in node:
        options = [option for option in node["anyOf"] if option != {"type": "null"}]
        rest = _translate({k: v for k, v in node.items() if k != "anyOf"}, defs)
        if len(options) == 1:
            return {**_translate(options[0], defs), **rest}
        return {"anyOf": [_translate(option, defs) for option in options], **rest}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key in _KEPT:
            out[key] = copy.deepcopy(value)
        elif key == "description":
            out[key] = _description(value)
        elif key == "properties":
            out[key] = {chart_key(model, name): _translate(sub, defs) for name, sub in value.items()}
        elif key == "required":
            out[key] = [chart_key(model, name) for name in value]
        elif key in ("additionalProperties", "items"):
            out[key] = value if isinstance(value, bool) else _translate(value, defs)
        else:  # a construct this translation has not been taught: fail rather than drop a rule
            raise ValueError(f"pydantic schema keyword {key!r} ({model}) has no chart translation")
    return out


def _platform_field(schema: dict[str, Any], path: str) -> dict[str, Any]:
    """The pydantic schema node of a dotted Platform field, Optional and $ref seen through."""
    defs, node, model = schema["$defs"], schema, "Platform"
    for name in path.split("."):
        while "properties" not in node:
            if "$ref" in node:
                model = node["$ref"].rsplit("/", 1)[-1]
                node = defs[model]
            else:
                node = next(o for o in node["anyOf"] if o != {"type": "null"})
        if name not in node["properties"]:
            raise KeyError(f"Platform has no field {path} ({model} has no {name!r})")
        node = node["properties"][name]
    return node


def _node(schema: dict[str, Any], path: str, create: bool = False) -> dict[str, Any]:
    """The node of a chart value's schema ("*": a map's values or a list's items)."""
    node = schema
    for part in path.split("."):
        if part == "*":
            node = node["additionalProperties"] if isinstance(node.get("additionalProperties"), dict) \
                else node["items"]
        elif create:
            node = node.setdefault("properties", {}).setdefault(part, {})
        else:
            node = node["properties"][part]
    return node


def _ordered(node: Any) -> Any:
    """A generated node with its keywords in :data:`_ORDER` (property names keep the model's order)."""
    if isinstance(node, list):
        return [_ordered(item) for item in node]
    if not isinstance(node, dict):
        return node
    rank = {key: i for i, key in enumerate(_ORDER)}
    ordered: dict[str, Any] = {}
    for key in sorted(node, key=lambda k: (rank.get(k, len(rank)), k)):
        value = node[key]
        if key == "properties":
            ordered[key] = {name: _ordered(sub) for name, sub in value.items()}
        elif key in ("enum", "required", "const"):
            ordered[key] = value
        else:
            ordered[key] = _ordered(value)
    return ordered


def platform_part() -> dict[str, dict[str, Any]]:
    """Chart value -> its generated schema, for every value in :data:`CHART_VALUES`."""
    source = Platform.model_json_schema()
    built: dict[str, Any] = {"properties": {}}  # the chart values' tree, to address CHART_ONLY's and WIDENED's paths
    for chart_path, platform_path in CHART_VALUES.items():
        node = _translate(_platform_field(source, platform_path), source["$defs"])
        node["$comment"] = (f"Generated from spo.kube.platform.Platform.{platform_path} by spo.kube.chart_schema "
                            f"(`{REGENERATE}`): edit those, not this.")
        _node(built, chart_path, create=True).update(node)
    for path, extra in CHART_ONLY.items():
        target = _node(built, path)
        already = sorted(set(extra) & set(target))
        if already:
            raise ValueError(f"{path}: Platform's schema now has {already} itself; drop them from CHART_ONLY")
        target.update(copy.deepcopy(extra))
    for path, wider in WIDENED.items():
        _node(built, path).update(copy.deepcopy(wider))
    # Platform._known_steps refuses any step but STEP_NAMES, a rule pydantic's schema cannot show
    steps = _node(built, "steps")
    value = steps.pop("additionalProperties")
    steps.update(additionalProperties=False, properties={step: copy.deepcopy(value) for step in STEP_NAMES})
    return {path: _ordered(_node(built, path)) for path in CHART_VALUES}


def generate(current: dict[str, Any]) -> dict[str, Any]:
    """values.schema.json with its platform part regenerated and the rest as it is."""
    schema = copy.deepcopy(current)
    for path, node in platform_part().items():
        *parents, key = path.split(".")
        parent = _node(schema, ".".join(parents)) if parents else schema
        if "properties" not in parent:
            raise KeyError(f"values.schema.json has no object {'.'.join(parents)} to hold {path}")
        parent["properties"][key] = node  # in place: a new key goes last
    return schema


def render(schema: dict[str, Any]) -> str:
    """The file's text: two-space JSON, keys in the order built, one trailing newline."""
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spo.kube.chart_schema", description=__doc__.split("\n\n")[0])
    parser.add_argument("schema", nargs="?", type=Path, default=SCHEMA_PATH, help="values.schema.json to rewrite")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when the file is not current")
    args = parser.parse_args(argv)
    text = args.schema.read_text(encoding="utf-8")
    fresh = render(generate(json.loads(text)))
    if fresh == text:
        return 0
    if args.check:
        print(f"{args.schema} is not generated from spo.kube.platform.Platform: run `{REGENERATE}`", file=sys.stderr)
        return 1
    args.schema.write_text(fresh, encoding="utf-8")
    print(f"wrote {args.schema}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
