"""Render charts/spo with Helm's own engine (helm-python-sdk: Helm v4's Go SDK, no helm binary).

Not a test module: imported as ``from chart_helpers import ...`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from conftest import REPO

CHART = REPO / "charts" / "spo"
EXAMPLES = CHART / "examples"
RELEASE, NAMESPACE = "spo", "ml-team"
KUBERNETES_VERSION = "1.33"  # the schemas objects are validated against (kubernetes-validate)


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``-f a.yaml -f b.yaml``: maps merge key by key, anything else is replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) \
            else copy.deepcopy(value)
    return out


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())


def render(values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Template file -> rendered text (helm template; the schema is checked first)."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(dict(values or {}), name=RELEASE, namespace=NAMESPACE)


def objects(values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every rendered Kubernetes object (NOTES.txt and empty templates left out)."""
    out: list[dict[str, Any]] = []
    for name, text in sorted(render(values).items()):
        if name.endswith(".yaml"):
            out += [d for d in yaml.safe_load_all(text) if d]
    return out


def one(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, (kind, suffix, [d["metadata"]["name"] for d in found])
    return found[0]


def write_manifests(docs: list[dict[str, Any]], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"{i:02d}-{doc['kind'].lower()}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder
