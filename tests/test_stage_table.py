"""The stage table (spo.stages.table) is the pipeline's one description: dvc.yaml must say the
same, the KFP components must take what it names, and the checkout paths it derives must be
the config's defaults, which ``dvc repro`` writes to."""

from __future__ import annotations

import inspect

import pytest
import yaml
from conftest import REPO

from spo.pipelines import components
from spo.pipelines.runtime import path_defaults, variant_names
from spo.stages.table import STAGES, TABLE, Stage, checkout_path, producer, published, sections

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
DEFAULTS = path_defaults()
TEMPLATE = ("${key}",)  # dvc.yaml's foreach stage writes a variant's paths with ${key}


def _dvc_stage(row: Stage) -> dict:
    entry = DVC[row.name]
    assert ("foreach" in entry) == bool(row.tasks), f"{row.name}: a per-variant stage is dvc.yaml's foreach"
    return entry.get("do", entry)


def _listed(entries: list) -> dict[str, dict]:
    """dvc.yaml's list of outs/metrics/plots/deps: path -> its options."""
    return {next(iter(e)) if isinstance(e, dict) else e: (next(iter(e.values())) if isinstance(e, dict) else {})
            for e in entries or []}


def test_dvc_yaml_has_exactly_the_tables_stages_in_its_order() -> None:
    assert list(DVC) == list(STAGES)


@pytest.mark.parametrize("row", TABLE, ids=STAGES)
def test_dvc_yaml_stage_matches_the_table(row: Stage) -> None:
    entry = _dvc_stage(row)
    assert entry["cmd"].split()[:2] == ["spo", row.name]
    assert entry["params"] == list(row.params), f"{row.name}: dvc.yaml's params differ from the stage table's"
    for section in ("outs", "metrics", "plots"):
        expected = {checkout_path(f"{row.task_names[0]}.{out.name}", DEFAULTS, TEMPLATE): out
                    for out in row.outputs if out.dvc == section}
        listed = _listed(entry.get(section))
        assert set(listed) == set(expected), f"{row.name}: dvc.yaml's {section}"
        for path, out in expected.items():
            assert listed[path].get("cache", True) == out.cache, f"{row.name}: {path} cache"
            assert listed[path].get("persist", False) == out.persist, f"{row.name}: {path} persist"
    # its data deps: what its inputs' producers write (a per-variant policy: the folder of all of them;
    # DVC's foreach has no folder for the per-variant metrics, which change only with that policy)
    deps = {d for d in _listed(entry["deps"]) if not d.startswith("src/")}
    expected_deps = set()
    for item in row.inputs:
        _, _, out = producer(item.source)
        if out.per_variant:
            if out.kind == "Model":
                expected_deps.add(out.per_variant.rsplit("/", 1)[0])
            continue
        expected_deps.add(checkout_path(item.source, DEFAULTS, TEMPLATE))
    assert deps == expected_deps, f"{row.name}: dvc.yaml's data deps differ from the stage table's inputs"
    assert f"src/spo/stages/{row.name}.py" in _listed(entry["deps"])


def test_every_input_names_an_output_of_an_earlier_task_and_a_config_key() -> None:
    seen: set[str] = set()
    for row in TABLE:
        for item in row.inputs:
            task, _, _ = item.source.partition(".")
            assert task in seen, f"{row.name}.{item.name}: {item.source} is not made before it"
            producer(item.source)
        for out in row.outputs:
            assert out.key in DEFAULTS or out.per_variant, f"{row.name}.{out.name}: {out.key} is not a path key"
        seen.update(row.task_names)


def test_checkout_paths_are_the_configs_defaults() -> None:
    variants = variant_names("dpo")
    assert checkout_path("prepare.quarantine", DEFAULTS, variants) == "data/quarantine/prepare.jsonl"
    assert checkout_path("degrees.audit_plot", DEFAULTS, variants) == "metrics/degrees_shortcut_audit.png"
    assert checkout_path("report.report_md", DEFAULTS, variants) == "reports/report.md"
    assert checkout_path("train_spo.policy", DEFAULTS, variants) == "models/policy/dpo_spo"
    assert checkout_path("train.metrics", DEFAULTS, variants) == "metrics/train_dpo.json"


@pytest.mark.parametrize("row", TABLE, ids=STAGES)
def test_each_component_takes_what_the_table_names(row: Stage) -> None:
    """A stage's component has one input per table input, of its producer's artifact type, and one
    output per table output: the stage table, not the component, says where each one goes."""
    funcs = [components.STEPS[row.name]] + ([components.STEPS["train_job"]] if row.tasks else [])
    for func in funcs:
        params = inspect.signature(func).parameters
        for item in row.inputs:
            kind = producer(item.source)[2].kind
            assert item.name in params, f"{func.__name__}: no input {item.name}"
            assert f"[{kind}]" in str(params[item.name].annotation) or kind in repr(params[item.name].annotation)
        for out in row.outputs:
            assert out.name in params, f"{func.__name__}: no output {out.name}"
            assert out.kind in repr(params[out.name].annotation), f"{func.__name__}.{out.name} is not {out.kind}"


def test_publish_takes_every_output_of_the_run_by_the_tables_names() -> None:
    params = inspect.signature(components.STEPS["publish"]).parameters
    artifacts = {name for name, p in params.items() if "Input" in repr(p.annotation)}
    assert artifacts == {name for name, _ in published()}


def test_a_steps_params_text_holds_its_dvc_params_sections() -> None:
    """configure hands each step the sections it depends on, as DVC does: a change of one reruns
    the step in both orchestrators; the report also reads every section (it shows them)."""
    for row in TABLE:
        tops = {p.split(".")[0] for p in row.params if "${" not in p}
        assert tops <= set(sections(row)), row.name
    assert set(sections(TABLE[-1])) >= {"train", "sft", "judge"}
