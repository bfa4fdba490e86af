"""The floors of the package (docs/architecture.md): no import runs back up.

``spo.lineage`` (dvc.lock and the DVC remote) lies lowest, ``spo.kube`` (the platform file,
manifests, CRDs; it checks a DVC remote's URL with lineage) on it, both beneath the two
adapters; ``spo.cluster`` (the TrainJob client) beneath
``spo.pipelines`` (the KFP adapter). An import back up is how the old ``pipelines`` <->
``cluster`` circle began, so every import in the source is checked, lazy ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "spo"

# package -> the packages it must never import
FORBIDDEN = {
    "kube": ("spo.pipelines", "spo.cluster", "spo.stages", "spo.training"),
    "lineage": ("spo.pipelines", "spo.cluster", "spo.kube", "spo.stages", "spo.training"),
    "cluster": ("spo.pipelines", "spo.stages", "spo.training"),
    "stages": ("spo.pipelines", "spo.cluster", "spo.kube", "spo.lineage"),
    "training": ("spo.pipelines", "spo.cluster", "spo.kube", "spo.lineage", "spo.stages"),
}


# the stage table is plain data every floor may read (it imports nothing of the project)
ALLOWED = {"spo.stages.table", "spo.stages.table.STEP_NAMES", "spo.stages.table.STAGES"}


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_stage_table_imports_nothing_of_the_project() -> None:
    assert not {name for name in imports(SRC / "stages" / "table.py") if name.startswith("spo")}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_back_up(package: str) -> None:
    upward = {f"{path.relative_to(SRC)}: {name}"
              for path in sorted((SRC / package).rglob("*.py"))
              for name in imports(path)
              if name not in ALLOWED and any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])}
    assert not upward, f"spo.{package} imports a floor above it:\n" + "\n".join(sorted(upward))


def test_the_checker_sees_a_lazy_import_back_up(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from spo.pipelines.runtime import run_stage\n    return run_stage\n")
    assert "spo.pipelines.runtime" in imports(module)
