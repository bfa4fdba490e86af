"""Strict validation of Kubernetes manifests against vendored CRDs: KFP's ``Pipeline``/``PipelineVersion``,
and (``crd_set="trainer"``) Kubeflow Trainer's ``TrainJob``.

KFP's Kubernetes-native API mode stores pipelines as custom resources, and
``kfp.compiler.Compiler().compile(..., kubernetes_manifest_format=True)``
writes them. The API server would *prune* fields its CRD does not know (or,
with ``kubectl apply --validate=strict``, reject them), so a typo in a manifest
is either lost silently or found only at deploy time. This module checks the
manifests offline against the CRDs of the KFP release we pin (vendored in
``spo/kube/crds/kfp``, see its README), treating every unknown field as an
error, plus the cross-document rules KFP's admission webhook enforces
(a ``PipelineVersion`` must name an existing ``Pipeline``). The CRDs' CEL rules are
translated too (spo.kube.crd_cel). Another set of CRDs in a folder of ``crds`` with its own
``SOURCE.json`` (``spo/kube/crds/trainer``) is validated the same way: one validator, not two.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import jsonschema
import jsonschema.exceptions
import yaml

from spo.errors import ManifestValidationError, Problem
from spo.kube.crd_cel import cel_rule_schema, re2_pattern

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "GroupVersionKind",
    "load_crd_schemas",
    "read_manifests",
    "strict_json_schema",
    "validate_manifests",
]

GroupVersionKind = tuple[str, str, str]
"""``(group, version, kind)``, e.g. ``("pipelines.kubeflow.org", "v2beta1", "Pipeline")``."""

_CRD_SET = "kfp"
_CRD_DIR = "crds"
_SOURCE_FILE = "SOURCE.json"

_PIPELINE_KIND = "Pipeline"
_PIPELINE_VERSION_KIND = "PipelineVersion"

# k8s.io/apimachinery/pkg/util/validation: IsDNS1123Subdomain / IsDNS1123Label.
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_RE = re.compile(rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*")
_DNS1123_LABEL_RE = re.compile(_DNS1123_LABEL)
_DNS1123_SUBDOMAIN_MAX = 253
_DNS1123_LABEL_MAX = 63

_MAX_MESSAGE_CHARS = 300

# OpenAPI keywords that mean the same in JSON Schema 2020-12 and are copied as is.
_PASSTHROUGH_KEYS = frozenset({
    "description", "title", "format", "maximum", "minimum", "maxLength", "minLength",
    "maxItems", "minItems", "uniqueItems", "multipleOf", "maxProperties", "minProperties",
    "required", "enum",
})
# Keywords that do not constrain a value (or only matter to the API server's
# merge strategy), so dropping them loses no validation.
_IGNORED_KEYS = frozenset({
    "default", "example", "externalDocs", "id", "$schema",
    "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
})
# Keywords handled explicitly by _convert_node.
_HANDLED_KEYS = frozenset({
    "type", "nullable", "pattern", "exclusiveMaximum", "exclusiveMinimum",
    "properties", "additionalProperties", "items", "allOf", "anyOf", "oneOf", "not",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string", "x-kubernetes-list-type", "x-kubernetes-validations",
})


def _string_map() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": {"type": "string"}}


def _object_meta_schema(*, name_required: bool) -> dict[str, Any]:
    """JSON Schema for ``metav1.ObjectMeta``.

    CRDs declare ``metadata`` as a bare ``type: object`` because the API server
    validates it against the built-in ObjectMeta type; strict field validation
    rejects unknown metadata fields there, so we spell the type out here.
    """
    owner_reference = {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "name": {"type": "string"},
            "uid": {"type": "string"},
            "controller": {"type": "boolean"},
            "blockOwnerDeletion": {"type": "boolean"},
        },
        "required": ["apiVersion", "kind", "name", "uid"],
        "additionalProperties": False,
    }
    managed_fields_entry = {
        "type": "object",
        "properties": {
            "manager": {"type": "string"},
            "operation": {"type": "string"},
            "apiVersion": {"type": "string"},
            "time": {"type": ["string", "null"]},
            "fieldsType": {"type": "string"},
            "fieldsV1": {"type": "object"},
            "subresource": {"type": "string"},
        },
        "additionalProperties": False,
    }
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "generateName": {"type": "string"},
            "namespace": {"type": "string"},
            "selfLink": {"type": "string"},
            "uid": {"type": "string"},
            "resourceVersion": {"type": "string"},
            "generation": {"type": "integer"},
            # kubectl-generated YAML writes `creationTimestamp: null`.
            "creationTimestamp": {"type": ["string", "null"]},
            "deletionTimestamp": {"type": ["string", "null"]},
            "deletionGracePeriodSeconds": {"type": "integer"},
            "labels": _string_map(),
            "annotations": _string_map(),
            "ownerReferences": {"type": "array", "items": owner_reference},
            "finalizers": {"type": "array", "items": {"type": "string"}},
            "managedFields": {"type": "array", "items": managed_fields_entry},
        },
        "additionalProperties": False,
    }
    if name_required:
        schema["required"] = ["name"]
    return schema


# --------------------------------------------------------------------------- errors


# --------------------------------------------------------------------------- CRD loading


def _crd_dir(crd_set: str) -> Traversable:
    """One set's vendored CRD folder, read through importlib.resources so it works from a wheel."""
    return resources.files("spo.kube").joinpath(_CRD_DIR, crd_set)


@functools.cache
def _vendored_crds(crd_set: str) -> tuple[Mapping[str, Any], ...]:
    """Parse every CRD file that SOURCE.json lists (and only those: provenance first)."""
    folder = _crd_dir(crd_set)
    source = json.loads(folder.joinpath(_SOURCE_FILE).read_text(encoding="utf-8"))
    crds: list[Mapping[str, Any]] = []
    for entry in source["files"]:
        text = folder.joinpath(entry["file"]).read_text(encoding="utf-8")
        for document in yaml.safe_load_all(text):
            if document is None:
                continue
            if document.get("kind") != "CustomResourceDefinition":
                raise ValueError(f"{entry['file']}: expected a CustomResourceDefinition, got {document.get('kind')!r}")
            crds.append(document)
    return tuple(crds)


def _crd_versions(crd: Mapping[str, Any]) -> Iterator[tuple[GroupVersionKind, Mapping[str, Any]]]:
    """Yield ``(gvk, openAPIV3Schema)`` for each *served* version of one CRD."""
    spec = crd["spec"]
    for version in spec["versions"]:
        if version.get("served", False):
            yield (spec["group"], version["name"], spec["names"]["kind"]), version["schema"]["openAPIV3Schema"]


@functools.cache
def _raw_schemas(crd_set: str) -> Mapping[GroupVersionKind, Mapping[str, Any]]:
    return {gvk: schema for crd in _vendored_crds(crd_set) for gvk, schema in _crd_versions(crd)}


def load_crd_schemas(crd_set: str = _CRD_SET) -> dict[GroupVersionKind, dict[str, Any]]:
    """The vendored CRDs' ``openAPIV3Schema`` per served ``(group, version, kind)``
    (the folder ``crds/<crd_set>``: ``kfp`` by default, or ``trainer``).

    Returns fresh copies (the parsed files are cached), exactly as written in
    the CRDs; :func:`strict_json_schema` turns one into the JSON Schema that
    :func:`validate_manifests` applies.
    """
    return {gvk: copy.deepcopy(dict(schema)) for gvk, schema in _raw_schemas(crd_set).items()}


# --------------------------------------------------------------------------- OpenAPI -> JSON Schema


def _exclusive_bound(node: Mapping[str, Any], out: dict[str, Any], bound: str, exclusive: str) -> None:
    """OpenAPI 3.0 ``exclusiveMaximum: true`` qualifies ``maximum``; 2020-12 wants the number itself."""
    flag = node.get(exclusive)
    if flag is True and bound in node:
        out.pop(bound, None)
        out[exclusive] = node[bound]
    elif isinstance(flag, (int, float)) and not isinstance(flag, bool):
        out[exclusive] = flag


def _convert_type(node: Mapping[str, Any], out: dict[str, Any]) -> None:
    """Apply ``type``, ``x-kubernetes-int-or-string`` and ``nullable``."""
    types: list[str] = []
    if "type" in node and node["type"] != "":
        types = [node["type"]]
    elif node.get("x-kubernetes-int-or-string") is True:
        types = ["integer", "string"]
    if types and node.get("nullable") is True:
        types.append("null")
    if types:
        out["type"] = types[0] if len(types) == 1 else types
    if node.get("nullable") is True and "enum" in out and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]


def _is_object_node(node: Mapping[str, Any]) -> bool:
    return node.get("type") == "object" or "properties" in node


def _embedded_resource_fields(out: dict[str, Any]) -> None:
    """``x-kubernetes-embedded-resource``: apiVersion, kind and metadata are implied and the first two required."""
    properties = out.setdefault("properties", {})
    properties.setdefault("apiVersion", {"type": "string"})
    properties.setdefault("kind", {"type": "string"})
    properties.setdefault("metadata", _object_meta_schema(name_required=False))
    out["required"] = sorted({*out.get("required", []), "apiVersion", "kind"})


def _convert_node(node: Mapping[str, Any], *, structural: bool) -> dict[str, Any]:
    """Convert one OpenAPI v3 (Kubernetes structural) schema node to JSON Schema 2020-12.

    ``structural`` is False inside allOf/anyOf/oneOf/not: Kubernetes only uses
    those for value checks, so they must not close objects to unknown fields.
    """
    unsupported = set(node) - _PASSTHROUGH_KEYS - _IGNORED_KEYS - _HANDLED_KEYS
    if unsupported:
        raise ValueError(f"unsupported schema keywords: {sorted(unsupported)}")

    out: dict[str, Any] = {key: copy.deepcopy(node[key]) for key in _PASSTHROUGH_KEYS if key in node}
    _convert_type(node, out)
    if "pattern" in node:
        out["pattern"] = re2_pattern(node["pattern"])
    _exclusive_bound(node, out, "maximum", "exclusiveMaximum")
    _exclusive_bound(node, out, "minimum", "exclusiveMinimum")
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True

    if "properties" in node:
        out["properties"] = {
            name: _convert_node(child, structural=structural) for name, child in node["properties"].items()
        }
    if "items" in node:
        out["items"] = _convert_node(node["items"], structural=structural)
    additional = node.get("additionalProperties")
    if isinstance(additional, Mapping):
        out["additionalProperties"] = _convert_node(additional, structural=structural)
    elif isinstance(additional, bool):
        out["additionalProperties"] = additional
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            out[key] = [_convert_node(branch, structural=False) for branch in node[key]]
    if "not" in node:
        out["not"] = _convert_node(node["not"], structural=False)
    rules = [schema for rule in node.get("x-kubernetes-validations", []) if (schema := cel_rule_schema(rule))]
    if rules:
        out["allOf"] = [*out.get("allOf", []), *rules]

    if structural and node.get("x-kubernetes-embedded-resource") is True:
        _embedded_resource_fields(out)
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if structural and _is_object_node(node) and not preserve and "additionalProperties" not in node:
        # What the API server would prune (or reject under strict field validation).
        out["additionalProperties"] = False
    return out


def strict_json_schema(openapi_schema: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a CRD's root ``openAPIV3Schema`` into a strict JSON Schema (2020-12).

    Every object node that lists ``properties`` (or is ``type: object``) gets
    ``additionalProperties: false`` unless it says
    ``x-kubernetes-preserve-unknown-fields: true`` or sets
    ``additionalProperties`` itself, matching what the API server prunes.
    ``nullable`` admits ``null``, ``x-kubernetes-int-or-string`` admits an
    integer or a string, ``x-kubernetes-embedded-resource`` implies
    apiVersion/kind/metadata. The root's bare ``metadata: {type: object}`` is
    replaced by ObjectMeta (``name`` required), and apiVersion, kind and
    metadata become required. CEL rules (``x-kubernetes-validations``) become
    JSON Schema where spo.kube.crd_cel translates them (transition rules,
    which only constrain updates, are dropped); other rules and keywords this
    converter does not understand raise ``ValueError`` rather than being skipped.
    """
    schema = _convert_node(openapi_schema, structural=True)
    properties = schema.setdefault("properties", {})
    crd_metadata = properties.get("metadata", {})
    properties["metadata"] = {"allOf": [_object_meta_schema(name_required=True), _unclosed(crd_metadata)]}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def _unclosed(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``additionalProperties: false`` we added, so ObjectMeta decides which fields exist."""
    out = dict(schema)
    if out.get("additionalProperties") is False:
        del out["additionalProperties"]
    return out


@functools.cache
def _validators(crd_set: str) -> Mapping[GroupVersionKind, jsonschema.Draft202012Validator]:
    validators = {}
    for gvk, openapi in _raw_schemas(crd_set).items():
        schema = strict_json_schema(openapi)
        jsonschema.Draft202012Validator.check_schema(schema)
        validators[gvk] = jsonschema.Draft202012Validator(schema)
    return validators


# --------------------------------------------------------------------------- reading


class _KubernetesYamlLoader(yaml.SafeLoader):
    """SafeLoader that keeps timestamps as strings.

    The API server converts YAML with sigs.k8s.io/yaml, which leaves an
    unquoted ``2024-01-01`` a string; PyYAML would make it a ``date`` and a
    ``type: string`` field would then fail here but pass on the cluster.
    """


_KubernetesYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def read_manifests(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a multi-document YAML manifest file, skipping empty documents.

    Raises ``ValueError`` naming the file for invalid YAML or for a document
    that is not a mapping (``kubectl apply`` would refuse both).
    """
    with open(path, encoding="utf-8") as stream:
        try:
            documents = list(yaml.load_all(stream, Loader=_KubernetesYamlLoader))
        except yaml.YAMLError as error:
            raise ValueError(f"{os.fspath(path)}: not valid YAML: {error}") from error
    manifests = [document for document in documents if document is not None]
    for index, document in enumerate(manifests, start=1):
        if not isinstance(document, dict):
            raise ValueError(f"{os.fspath(path)}: document {index} is a {type(document).__name__}, not a mapping")
    return manifests


# --------------------------------------------------------------------------- validation


def _json_path(parts: Iterable[str | int]) -> str:
    path = "$"
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            path += f".{part}"
        else:
            path += "[" + repr(part) + "]"
    return path


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."


def _document_label(index: int, document: Any) -> str:
    kind = name = "?"
    if isinstance(document, Mapping):
        kind = str(document.get("kind") or "?")
        metadata = document.get("metadata")
        if isinstance(metadata, Mapping) and metadata.get("name"):
            name = str(metadata["name"])
    return f"{kind}/{name} (document {index})"


def _schema_problems(label: str, error: jsonschema.exceptions.ValidationError) -> Iterator[Problem]:
    """Turn one jsonschema error into problems that point at the offending field itself."""
    parts = list(error.absolute_path)
    instance = error.instance
    if error.validator == "additionalProperties" and error.validator_value is False and isinstance(instance, Mapping):
        known = sorted(error.schema.get("properties", {}))
        allowed = f" (allowed here: {', '.join(known)})" if known else " (no fields are allowed here)"
        for key in sorted(set(instance) - set(known), key=str):
            yield Problem(label, _json_path([*parts, str(key)]), f"unknown field{allowed}")
    elif error.validator == "required" and isinstance(instance, Mapping):
        for key in error.validator_value:
            if key not in instance:
                yield Problem(label, _json_path([*parts, key]), "required field is missing")
    else:
        rule = error.schema.get("$comment") if isinstance(error.schema, Mapping) else None
        if error.context:
            error = jsonschema.exceptions.best_match(error.context)
            parts = list(error.absolute_path)
            if isinstance(error.schema, Mapping):
                rule = error.schema.get("$comment", rule)
        # a translated CEL rule carries the CRD's own message (crd_cel): say it with the finding
        yield Problem(label, _json_path(parts), _shorten(error.message + (f" ({rule})" if rule else "")))


def _gvk_problem(label: str, document: Mapping[str, Any],
                 crd_set: str) -> tuple[GroupVersionKind | None, Problem | None]:
    """Find the CRD a document claims to be, or explain why none matches."""
    api_version, kind = document.get("apiVersion"), document.get("kind")
    supported = sorted(_validators(crd_set))
    expected = "; ".join(f"apiVersion {g}/{v} kind {k}" for g, v, k in supported)
    if not isinstance(api_version, str) or "/" not in api_version:
        return None, Problem(label, "$.apiVersion",
                             f"must be 'group/version', got {api_version!r}; expected {expected}")
    if not isinstance(kind, str) or not kind:
        return None, Problem(label, "$.kind", f"missing or not a string; expected {expected}")
    group, version = api_version.split("/", 1)
    gvk = (group, version, kind)
    if gvk in _validators(crd_set):
        return gvk, None
    if any((g, v) == (group, version) for g, v, _ in supported):
        return None, Problem(label, "$.kind", f"unknown kind {kind!r} for {api_version}; expected {expected}")
    return None, Problem(label, "$.apiVersion",
                         f"unsupported apiVersion {api_version!r} for kind {kind!r}; expected {expected}")


def _name_problems(label: str, document: Mapping[str, Any]) -> Iterator[Problem]:
    """metadata.name must be a DNS-1123 subdomain and metadata.namespace a DNS-1123 label, as the API server demands."""
    metadata = document.get("metadata")
    if not isinstance(metadata, Mapping):
        return
    name, namespace = metadata.get("name"), metadata.get("namespace")
    if isinstance(name, str) and (len(name) > _DNS1123_SUBDOMAIN_MAX or not _DNS1123_SUBDOMAIN_RE.fullmatch(name)):
        yield Problem(label, "$.metadata.name", f"{name!r} is not a valid DNS-1123 subdomain (lowercase alphanumerics, "
                      f"'-' and '.', starting and ending alphanumeric, at most {_DNS1123_SUBDOMAIN_MAX} characters)")
    if isinstance(namespace, str) and (len(namespace) > _DNS1123_LABEL_MAX
                                       or not _DNS1123_LABEL_RE.fullmatch(namespace)):
        yield Problem(label, "$.metadata.namespace", f"{namespace!r} is not a valid DNS-1123 label (lowercase "
                      "alphanumerics and '-', starting and ending alphanumeric, "
                      f"at most {_DNS1123_LABEL_MAX} characters)")


def _document_problems(index: int, document: Any, crd_set: str) -> tuple[GroupVersionKind | None, list[Problem]]:
    """Validate one document on its own: apiVersion/kind, the strict schema, names."""
    label = _document_label(index, document)
    if not isinstance(document, Mapping):
        return None, [Problem(label, "$", f"document is a {type(document).__name__}, not a mapping")]
    gvk, problem = _gvk_problem(label, document, crd_set)
    if gvk is None:
        return None, [problem] if problem else []
    errors = sorted(_validators(crd_set)[gvk].iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    problems = [found for error in errors for found in _schema_problems(label, error)]
    problems.extend(_name_problems(label, document))
    # jsonschema reports a `required` list once per missing key; keep each problem once.
    return gvk, list(dict.fromkeys(problems))


def _identity(document: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(namespace, name)``; a missing namespace means 'whatever namespace kubectl applies to'."""
    metadata = document.get("metadata")
    if not isinstance(metadata, Mapping):
        return None, None
    namespace, name = metadata.get("namespace"), metadata.get("name")
    return (namespace if isinstance(namespace, str) else None, name if isinstance(name, str) else None)


def _duplicate_problems(entries: Sequence[tuple[int, GroupVersionKind, Mapping[str, Any]]]) -> Iterator[Problem]:
    """Two documents for the same object: the second silently overwrites the first on apply."""
    seen: dict[tuple[GroupVersionKind, str | None, str | None], int] = {}
    for index, gvk, document in entries:
        key = (gvk, *_identity(document))
        if key[2] is None:
            continue
        if key in seen:
            yield Problem(_document_label(index, document), "$.metadata.name",
                          f"duplicates document {seen[key]} (same kind, namespace and name)")
        else:
            seen[key] = index


def _reference_problems(
    entries: Sequence[tuple[int, GroupVersionKind, Mapping[str, Any]]], external_pipelines: Collection[str]
) -> Iterator[Problem]:
    """Each PipelineVersion's ``spec.pipelineName`` must name a Pipeline in the same namespace.

    KFP's mutating webhook looks the Pipeline up by ``spec.pipelineName`` in
    the PipelineVersion's namespace and rejects the version when it is absent.
    """
    pipelines = {_identity(doc) for _, (_, _, kind), doc in entries if kind == _PIPELINE_KIND}
    for index, (_, _, kind), document in entries:
        spec = document.get("spec")
        if kind != _PIPELINE_VERSION_KIND or not isinstance(spec, Mapping):
            continue
        label = _document_label(index, document)
        target = spec.get("pipelineName")
        namespace, _ = _identity(document)
        if not isinstance(target, str) or not target:
            yield Problem(label, "$.spec.pipelineName",
                          "required: KFP links a PipelineVersion to its Pipeline by this name")
        elif (namespace, target) not in pipelines and target not in external_pipelines:
            elsewhere = sorted(ns or "<unset>" for ns, name in pipelines if name == target)
            hint = f"; a Pipeline of that name is in namespace {', '.join(elsewhere)}" if elsewhere else ""
            yield Problem(label, "$.spec.pipelineName",
                          f"names Pipeline {target!r}, which is not among these manifests "
                          f"in namespace {namespace or '<unset>'}{hint} "
                          "(pass external_pipelines for one that already exists)")


def validate_manifests(documents: Iterable[Any], *, external_pipelines: Collection[str] = (),
                       crd_set: str = _CRD_SET) -> None:
    """Validate manifests strictly against ``crd_set``'s vendored CRDs (KFP's
    ``Pipeline``/``PipelineVersion`` by default; ``"trainer"``: Trainer's ``TrainJob``);
    raise on any problem.

    Each document must be a known ``apiVersion``/``kind`` from the vendored
    CRDs and match its schema with no unknown fields (``$.spec.pipelineSpec``
    and ``$.spec.platformSpec`` are free-form, as the CRD says), carry a
    DNS-1123 ``metadata.name``, and not repeat another document's object.
    Every PipelineVersion's ``spec.pipelineName`` must name a Pipeline in the
    same namespace among ``documents``, or be listed in
    ``external_pipelines`` (Pipelines already on the cluster: the compiler's
    default output is a lone PipelineVersion).

    Raises :class:`ManifestValidationError` (a ``ValueError``) listing every
    problem as ``Kind/name (document N): $.json.path: what is wrong``.
    """
    if isinstance(external_pipelines, str):
        raise TypeError("external_pipelines takes a collection of Pipeline names, not a single string")
    documents = list(documents)
    if not documents:
        raise ManifestValidationError([Problem("<input>", "$", "no manifest documents")])
    problems: list[Problem] = []
    entries: list[tuple[int, GroupVersionKind, Mapping[str, Any]]] = []
    for index, document in enumerate(documents, start=1):
        gvk, found = _document_problems(index, document, crd_set)
        problems.extend(found)
        if gvk is not None:
            entries.append((index, gvk, document))
    problems.extend(_duplicate_problems(entries))
    problems.extend(_reference_problems(entries, frozenset(external_pipelines)))
    if problems:
        raise ManifestValidationError(problems)
