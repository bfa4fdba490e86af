"""The stage table (spo.stages.table) is the pipeline's one description: dvc.yaml must say the
same, the KFP components must take what it names, and the checkout paths it derives must be
the config's defaults, which ``dvc repro`` writes to."""

from __future__ import annotations

import inspect

import pytest
import yaml
from conftest import REPO

from spo.pipelines import components
from spo.pipelines.runtime import path_defaults
from spo.stages.table import STAGES, TABLE, Stage, checkout_path, producer, published, sections

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
DEFAULTS = path_defaults()
TEMPLATE = "${item.variant}_s${item.seed}"  # dvc.yaml's matrix stage names a cell's paths so


def _dvc_stage(row: Stage) -> dict:
    entry = DVC[row.name]
    assert ("matrix" in entry) == row.per_cell, f"{row.name}: a per-cell stage is dvc.yaml's matrix"
    if row.per_cell:  # over every variant and every seed: the grid's cells
        assert entry["matrix"] == {"variant": "${variants}", "seed": "${grid.seeds}"}
        assert entry["cmd"] == f"spo {row.name} --variant ${{item.variant}} --seed ${{item.seed}}"
    return entry


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
        expected = {checkout_path(f"{row.name}.{out.name}", DEFAULTS, TEMPLATE if out.per_cell else ""): out
                    for out in row.outputs if out.dvc == section}
        listed = _listed(entry.get(section))
        assert set(listed) == set(expected), f"{row.name}: dvc.yaml's {section}"
        for path, out in expected.items():
            assert listed[path].get("cache", True) == out.cache, f"{row.name}: {path} cache"
            assert listed[path].get("persist", False) == out.persist, f"{row.name}: {path} persist"
    # its data deps: what its inputs' producers write (a per-cell policy: the folder of all of them;
    # DVC's matrix has no folder for the per-cell metrics, which change only with that policy)
    deps = {d for d in _listed(entry["deps"]) if not d.startswith("src/")}
    expected_deps = set()
    for item in row.inputs:
        _, out = producer(item.source)
        if out.per_cell:
            if out.kind == "Model":
                expected_deps.add(out.per_cell.rsplit("/", 1)[0])
            continue
        expected_deps.add(checkout_path(item.source, DEFAULTS))
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
            assert out.key in DEFAULTS or out.per_cell, f"{row.name}.{out.name}: {out.key} is not a path key"
        seen.add(row.name)


def test_checkout_paths_are_the_configs_defaults() -> None:
    assert checkout_path("prepare.quarantine", DEFAULTS) == "data/quarantine/prepare.jsonl"
    assert checkout_path("degrees.audit_plot", DEFAULTS) == "metrics/degrees_shortcut_audit.png"
    assert checkout_path("report.report_md", DEFAULTS) == "reports/report.md"
    assert checkout_path("train.policy", DEFAULTS, "dpo_spo_s1") == "models/policy/dpo_spo_s1"
    assert checkout_path("train.metrics", DEFAULTS, "dpo_s0") == "metrics/train_dpo_s0.json"
    with pytest.raises(ValueError, match="name the cell"):
        checkout_path("train.policy", DEFAULTS)


def test_a_cells_checkout_paths_are_what_spo_train_writes() -> None:
    """``spo train --variant --seed`` (dvc.yaml's matrix) writes where the table says a cell's outputs lie."""
    from spo.config import CELL_METRICS, CELL_POLICY, SpoConfig
    from spo.stages import table

    # written twice, as the table imports nothing of the project
    assert (table.CELL_POLICY, table.CELL_METRICS) == (CELL_POLICY, CELL_METRICS)
    cfg = SpoConfig().cell("dpo_spo", 3)
    assert cfg.train.out_dir == checkout_path("train.policy", DEFAULTS, "dpo_spo_s3")
    assert cfg.train.metrics_file == checkout_path("train.metrics", DEFAULTS, "dpo_spo_s3")


@pytest.mark.parametrize("row", TABLE, ids=STAGES)
def test_each_component_takes_what_the_table_names(row: Stage) -> None:
    """A stage's component has one input per table input, of its producer's artifact type, and one
    output per table output: the stage table, not the component, says where each one goes."""
    funcs = [components.STEPS[row.name]] + ([components.STEPS["train_job"]] if row.per_cell else [])
    for func in funcs:
        params = inspect.signature(func).parameters
        for item in row.inputs:
            source = producer(item.source)[1]
            assert item.name in params, f"{func.__name__}: no input {item.name}"
            annotation = repr(params[item.name].annotation)
            assert source.kind in annotation, f"{func.__name__}.{item.name} is not {source.kind}"
            # every cell's output comes as a list (dsl.Collected over the grid's loop)
            assert ("List[" in annotation) == bool(source.per_cell), f"{func.__name__}.{item.name}: {annotation}"
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
