"""The grid: variants x grid.seeds as cells (spo.config), its size and limits (spo.grid, ``spo grid``,
``spo train --variant --seed``), the families pooled over seeds (spo.judging.grid) and the judge stage
judging a grid end to end with a fake judge."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from test_judge_stage import LongerWins

from spo.cli import main
from spo.config import Cell, SpoConfig, load_config
from spo.errors import ConfigError, GridTooLarge
from spo.grid import TEMPLATE_TOKENS, check_grid, format_grid, grid_size, over_limits
from spo.io import read_jsonl, write_jsonl
from spo.judging.grid import GRID, GRID_DIFFERENCES, families, grid_results, pool_difference, pool_family
from spo.judging.statistics import SCORE, bootstrap_ci
from spo.stages import judge as judge_stage
from spo.stages import load_stage

TWO_BY_THREE = ["variants={dpo: {loss: dpo, spo: false}, dpo_spo: {loss: dpo, spo: true}}", "grid.seeds=[0, 1, 2]"]
LOSS_BY_SPO = ("variants={dpo: {loss: dpo, spo: false}, dpo_spo: {loss: dpo, spo: true}, "
               "ipo: {loss: ipo, spo: false}, ipo_spo: {loss: ipo, spo: true}}")


# --- spo.config: cells, cell(), twin(), the comparisons per cell -------------------------------------


def test_cells_are_every_variant_once_per_seed_in_order() -> None:
    cfg = load_config(None, TWO_BY_THREE)
    assert cfg.cells() == [Cell("dpo", 0), Cell("dpo", 1), Cell("dpo", 2),
                           Cell("dpo_spo", 0), Cell("dpo_spo", 1), Cell("dpo_spo", 2)]
    assert [c.name for c in cfg.cells()] == ["dpo_s0", "dpo_s1", "dpo_s2", "dpo_spo_s0", "dpo_spo_s1", "dpo_spo_s2"]
    assert cfg.generation_models() == {"sft": "models/sft",
                                       **{c.name: f"models/policy/{c.name}" for c in cfg.cells()}}


def test_cell_sets_loss_spo_seed_folders_and_the_variants_own_settings() -> None:
    cfg = load_config(None, [
        "train.beta=0.1", "train.spo.lambda_w=0.1", "train.spo.hidden_size=16", "train.optim.max_steps=7",
        "variants={ipo: {loss: ipo, spo: false},"
        " ipo_spo: {loss: ipo, spo: true, set: {beta: 0.5, spo.lambda_w: 0.3, optim.learning_rate: 0.002}}}",
        "grid.seeds=[0, 4]",
    ])
    cell = cfg.cell("ipo_spo", 4)
    train = cell.train
    assert (train.loss, train.spo.enabled, train.seed, cell.training_seed) == ("ipo", True, 4, 4)
    assert (train.out_dir, train.metrics_file) == ("models/policy/ipo_spo_s4", "metrics/train_ipo_spo_s4.json")
    assert (train.beta, train.spo.lambda_w, train.optim.learning_rate) == (0.5, 0.3, 0.002)
    # the rest of train, and of the config, stays as it is
    assert (train.spo.hidden_size, train.optim.max_steps) == (16, 7)
    assert cell.seed == cfg.seed and cell.section_hash("degrees") == cfg.section_hash("degrees")
    plain = cfg.cell("ipo", 0).train
    assert (plain.loss, plain.spo.enabled, plain.seed, plain.beta, plain.spo.lambda_w) == ("ipo", False, 0, 0.1, 0.1)
    assert plain.out_dir == "models/policy/ipo_s0"
    assert cfg.train.out_dir != train.out_dir  # the config itself is left alone
    with pytest.raises(ConfigError, match="variant 'kto' is not in variants"):
        cfg.cell("kto", 0)


@pytest.mark.parametrize("setting, message", [
    ("{nope: 1}", r"variants\.dpo_spo\.set: invalid train settings:\s+train\.nope: Extra inputs"),
    ("{spo.nope: 1}", r"variants\.dpo_spo\.set: invalid train settings:\s+train\.spo\.nope"),
    ("{beta: -1}", r"variants\.dpo_spo\.set: invalid train settings:\s+train\.beta"),
    ("{loss: ipo}", r"variants\.dpo_spo\.set: .*loss: set by the grid itself"),
    ("{seed: 3}", r"variants\.dpo_spo\.set: .*seed: set by the grid itself"),
    ("{out_dir: elsewhere}", r"variants\.dpo_spo\.set: .*out_dir: set by the grid itself"),
    ("{metrics_file: m.json}", r"variants\.dpo_spo\.set: .*metrics_file: set by the grid itself"),
    ("{spo.enabled: false}", r"variants\.dpo_spo\.set: .*spo\.enabled: set by the grid itself"),
])
def test_a_bad_set_is_a_config_error_naming_the_variant(setting: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["variants={dpo: {loss: dpo, spo: false}, "
                           f"dpo_spo: {{loss: dpo, spo: true, set: {setting}}}}}"])


def test_duplicate_seeds_and_bad_variant_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"grid\.seeds: .*\[0, 1, 0\]: a seed is listed twice"):
        load_config(None, ["grid.seeds=[0, 1, 0]"])
    with pytest.raises(ConfigError, match=r"grid\.seeds"):
        load_config(None, ["grid.seeds=[]"])
    params = tmp_path / "params.yaml"
    for bad in ("dpo-spo", "dpo__spo", "_dpo", "dpo_", "dpo spo", "dpo.x", "dpo/x"):
        params.write_text(yaml.safe_dump({"variants": {"dpo": {"loss": "dpo"}, bad: {"loss": "dpo"}}}))
        with pytest.raises(ConfigError, match=f"variants: .*{bad}: a variant's name is letters and digits"):
            load_config(params)
    assert list(load_config(None, ["variants={DPO2_b05: {loss: dpo}}"]).variants) == ["DPO2_b05"]


def test_twin_prefers_the_plain_variant_with_the_same_set() -> None:
    cfg = load_config(None, [
        "variants={dpo: {loss: dpo, spo: false}, dpo_b5: {loss: dpo, spo: false, set: {beta: 0.5}},"
        " dpo_spo: {loss: dpo, spo: true}, dpo_spo_b5: {loss: dpo, spo: true, set: {beta: 0.5}},"
        " dpo_spo_b9: {loss: dpo, spo: true, set: {beta: 0.9}}, ipo_spo: {loss: ipo, spo: true}}",
    ])
    assert cfg.twin("dpo_spo_b5") == "dpo_b5"  # not the first plain DPO
    assert cfg.twin("dpo_spo") == "dpo"
    assert cfg.twin("dpo_spo_b9") == "dpo"  # no plain DPO at beta 0.9: the first with the same loss
    assert cfg.twin("ipo_spo") is None and cfg.twin("dpo_b5") is None and cfg.twin("nope") is None


def test_judge_comparisons_are_per_cell_against_the_same_seed_twin() -> None:
    cfg = load_config(None, ["variants={dpo: {loss: dpo, spo: false}, dpo_spo: {loss: dpo, spo: true}}",
                             "grid.seeds=[0, 1]"])
    pairs = [(c.name, c.a, c.b) for c in cfg.judge_comparisons()]
    assert pairs == [
        ("dpo_s0_vs_chosen", "dpo_s0", "chosen"),
        ("dpo_s1_vs_chosen", "dpo_s1", "chosen"),
        ("dpo_spo_s0_vs_chosen", "dpo_spo_s0", "chosen"),
        ("dpo_spo_s0_vs_dpo_s0", "dpo_spo_s0", "dpo_s0"),
        ("dpo_spo_s0_vs_sft", "dpo_spo_s0", "sft"),
        ("dpo_spo_s1_vs_chosen", "dpo_spo_s1", "chosen"),
        ("dpo_spo_s1_vs_dpo_s1", "dpo_spo_s1", "dpo_s1"),
        ("dpo_spo_s1_vs_sft", "dpo_spo_s1", "sft"),
    ]
    no_sft = load_config(None, ["grid.seeds=[0, 1]", "generate.models={}"])
    assert not any(c.b == "sft" for c in no_sft.judge_comparisons())
    assert len(no_sft.judge_comparisons()) == 6


# --- spo.grid: size, cost, limits ------------------------------------------------------------------


def _eight_cells(*extra: str) -> SpoConfig:
    """2 losses x SPO on/off x 2 seeds, 10 prompts, 2 samples each, an OpenAI judge at known prices."""
    return load_config(None, [
        LOSS_BY_SPO, "grid.seeds=[0, 1]", "train.optim.max_steps=5",
        "generate.max_prompts=10", "generate.sampling.num_samples=2", "generate.max_prompt_length=100",
        "generate.sampling.max_new_tokens=50",
        "judge.backend=openai", "judge.openai.max_tokens=20",
        "judge.openai.budget.usd_per_1k_prompt_tokens=0.002", "judge.openai.budget.usd_per_1k_completion_tokens=0.01",
        *extra,
    ])


def test_grid_size_counts_cells_steps_generations_and_judge_calls() -> None:
    cfg = _eight_cells()
    size = grid_size(cfg)
    assert (size.variants, size.seeds, size.cells) == (4, 2, 8)
    assert (size.steps_per_cell, size.train_steps) == (5, 40)
    assert size.generated_models == 9  # sft and the 8 cells
    assert size.generations == 10 * 2 * 9
    # per seed: 4 vs chosen, 2 SPO vs twin, 2 SPO vs sft
    assert size.comparisons == 16 == len(cfg.judge_comparisons())
    assert size.judge_calls == 2 * 10 * 16
    assert size.judge == "openai:gpt-4o"
    # every call at its longest: the template, the prompt, two responses; and max_tokens of answer
    prompt_tokens = TEMPLATE_TOKENS + 100 + 2 * 50
    assert size.cost_usd_at_most == pytest.approx(320 * (prompt_tokens * 0.002 + 20 * 0.01) / 1000)
    assert size.cost_usd_at_most == pytest.approx(0.384)
    assert over_limits(cfg, size) == [] and check_grid(cfg) == size
    text = format_grid(size)
    assert text.startswith("grid: 4 variants x 2 seeds = 8 training cells (5 steps each, 40 in all); ")
    assert "180 generations from 9 models; 16 comparisons, 320 judge calls with openai:gpt-4o, at most $0.38" in text


def test_grid_size_with_per_variant_steps_and_unknown_counts() -> None:
    cfg = _eight_cells("variants.ipo.set={optim.max_steps: 9}")
    size = grid_size(cfg)
    assert (size.steps_per_cell, size.train_steps) == (None, 6 * 5 + 2 * 9)
    unknown = grid_size(_eight_cells("generate.max_prompts=null", "train.optim.max_steps=null"))
    assert (unknown.generations, unknown.judge_calls, unknown.cost_usd_at_most) == (None, None, None)
    assert (unknown.steps_per_cell, unknown.train_steps) == (None, None)
    assert "all generations (unknown before the data is read)" in format_grid(unknown)
    reward = grid_size(_eight_cells("judge.backend=reward"))
    assert reward.cost_usd_at_most is None and reward.judge == "reward (local)" and reward.judge_calls == 320


@pytest.mark.parametrize("limits, over", [
    (["grid.max_cells=8", "grid.max_judge_calls=320", "grid.max_cost_usd=0.39"], []),
    (["grid.max_cells=7"], ["8 cells (4 variants x 2 seeds) > grid.max_cells 7"]),
    (["grid.max_judge_calls=319"], ["320 judge calls > grid.max_judge_calls 319"]),
    (["grid.max_cost_usd=0.38"], ["the judge may cost up to $0.38 > grid.max_cost_usd $0.38"]),
    (["generate.max_prompts=null", "grid.max_judge_calls=1000"],
     ["the judge calls are unknown (generate.max_prompts null: every test prompt), so grid.max_judge_calls 1000 "
      "cannot be checked"]),
    (["generate.max_prompts=null", "grid.max_cost_usd=5"],
     ["the judge's cost is unknown (generate.max_prompts null), so grid.max_cost_usd 5.0 cannot be checked"]),
    (["judge.backend=reward", "grid.max_cost_usd=0.01"], []),  # a local judge costs nothing
    (["grid.max_cells=1", "grid.max_judge_calls=1"], ["8 cells (4 variants x 2 seeds) > grid.max_cells 1",
                                                      "320 judge calls > grid.max_judge_calls 1"]),
])
def test_over_limits_names_each_limit(limits: list[str], over: list[str]) -> None:
    cfg = _eight_cells(*limits)
    assert over_limits(cfg, grid_size(cfg)) == over
    if over:
        with pytest.raises(GridTooLarge, match="the grid is over its limits: ") as caught:
            check_grid(cfg)
        assert all(line in str(caught.value) for line in over)
        assert isinstance(caught.value, ConfigError)
        assert check_grid(cfg, allow_over=True) == grid_size(cfg)
    else:
        assert check_grid(cfg) == grid_size(cfg)


def _params(tmp_path: Path, **sections: Any) -> Path:
    tree: dict[str, Any] = {
        "variants": {"dpo": {"loss": "dpo", "spo": False}, "dpo_spo": {"loss": "dpo", "spo": True}},
        "grid": {"seeds": [0, 1, 2]},
        "generate": {"max_prompts": 4},
    }
    tree.update(sections)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_cli_grid_prints_the_cells_and_exits_1_over_a_limit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = _params(tmp_path)
    assert main(["grid", "-p", str(params)]) == 0
    out = capsys.readouterr().out
    assert "grid: 2 variants x 3 seeds = 6 training cells" in out
    assert "cells: dpo_s0, dpo_s1, dpo_s2, dpo_spo_s0, dpo_spo_s1, dpo_spo_s2" in out
    assert "over a limit" not in out

    assert main(["grid", "-p", str(params), "-S", "grid.max_cells=5"]) == 1
    out = capsys.readouterr().out
    assert "over a limit: 6 cells (2 variants x 3 seeds) > grid.max_cells 5" in out

    assert main(["grid", "-p", str(params), "-S", "grid.max_judge_calls=10", "--json"]) == 1
    shown = json.loads(capsys.readouterr().out)
    # 2 x 3 vs chosen, 3 SPO vs twin, 3 SPO vs sft; 4 prompts, both orders
    assert (shown["cells"], shown["comparisons"], shown["judge_calls"]) == (6, 12, 2 * 4 * 12)
    assert shown["over_limits"] == ["96 judge calls > grid.max_judge_calls 10"]


def test_cli_train_cell_needs_variant_and_seed_and_the_grid_within_its_limits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    trained: list[SpoConfig] = []
    monkeypatch.setattr(load_stage("train"), "run", lambda cfg: trained.append(cfg) or {})
    params = _params(tmp_path)
    assert main(["train", "-p", str(params), "--variant", "dpo"]) == 2
    assert "--variant and --seed go together" in caplog.text
    assert main(["train", "-p", str(params), "--seed", "1"]) == 2
    assert main(["train", "-p", str(params), "--variant", "kto", "--seed", "0"]) == 2
    assert "variant 'kto' is not in variants" in caplog.text
    caplog.clear()
    assert main(["train", "-p", str(params), "--variant", "dpo", "--seed", "0", "-S", "grid.max_cells=5"]) == 2
    assert "the grid is over its limits: 6 cells" in caplog.text
    assert trained == []  # nothing trained for a refused cell

    assert main(["train", "-p", str(params), "--variant", "dpo_spo", "--seed", "2"]) == 0
    (cell,) = trained
    assert (cell.train.loss, cell.train.spo.enabled, cell.train.seed) == ("dpo", True, 2)
    assert cell.train.out_dir == "models/policy/dpo_spo_s2"
    assert cell.train.metrics_file == "metrics/train_dpo_spo_s2.json"


def test_argparse_rejects_a_seed_that_is_not_a_number(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["train", "--variant", "dpo", "--seed", "one"])
    assert caught.value.code == 2 and "--seed" in capsys.readouterr().err


# --- spo.judging.grid: pooling over seeds -----------------------------------------------------------


def test_pool_family_by_hand() -> None:
    seed3 = {"p1": "win", "p2": "tie", "p3": "loss"}
    seed7 = {"p1": "win", "p2": "win", "p3": "invalid"}  # p3 drops out for both seeds
    pooled = pool_family([seed3, seed7], [3, 7], 200, 0)
    # per prompt (seed mean): p1 1.0, p2 0.75; per seed: 0.75 and 1.0
    assert pooled["n"] == 2 and pooled["seeds"] == [3, 7]
    assert pooled["win_rate"] == pytest.approx(0.875)
    assert pooled["per_seed"] == {"3": pytest.approx(0.75), "7": pytest.approx(1.0)}
    assert pooled["seed_sd"] == pytest.approx(math.sqrt(2 * 0.125 ** 2))  # ddof=1 over 2 seeds
    assert pooled["seed_sd"] == pytest.approx(float(np.std([0.75, 1.0], ddof=1)))
    assert (pooled["seed_min"], pooled["seed_max"]) == (0.75, 1.0)
    assert pooled["tie_rate"] == pytest.approx(1 / 4)
    assert (pooled["ci_low"], pooled["ci_high"]) == bootstrap_ci(np.array([1.0, 0.75]), 200, 0)
    assert pooled["ci_level"] == 0.95


def test_pool_family_one_seed_and_no_common_prompt() -> None:
    one = pool_family([{"p1": "win", "p2": "loss", "p3": "not_judged"}], [0], 200, 0)
    assert (one["n"], one["win_rate"], one["seed_sd"], one["seed_min"], one["seed_max"]) == (2, 0.5, None, 0.5, 0.5)
    assert one["per_seed"] == {"0": 0.5}
    none = pool_family([{"p1": "win"}, {"p1": "invalid"}], [0, 1], 200, 0)
    assert (none["n"], none["win_rate"], none["ci_low"], none["tie_rate"], none["per_seed"]) == (0, None, None, None,
                                                                                                   {})
    assert none["seed_sd"] is None


def test_pool_difference_by_hand() -> None:
    spo = [{"p1": "win", "p2": "win", "p3": "tie"}, {"p1": "win", "p2": "loss", "p3": "win"}]
    twin = [{"p1": "loss", "p2": "win", "p3": "invalid"}, {"p1": "tie", "p2": "loss", "p3": "loss"}]
    diff = pool_difference(spo, twin, [0, 1], 200, 5)
    # common p1, p2. p1: 1.0 - 0.25, p2: 0.5 - 0.5; seed 0: mean(1-0, 1-1) = 0.5, seed 1: mean(1-0.5, 0-0) = 0.25
    assert diff["n"] == 2 and diff["difference"] == pytest.approx(0.375)
    assert diff["per_seed"] == {"0": pytest.approx(0.5), "1": pytest.approx(0.25)}
    assert diff["seed_sd"] == pytest.approx(float(np.std([0.5, 0.25], ddof=1)))
    assert (diff["seed_min"], diff["seed_max"]) == (0.25, 0.5)
    assert (diff["ci_low"], diff["ci_high"]) == bootstrap_ci(np.array([0.75, 0.0]), 200, 5)
    single = pool_difference(spo[:1], twin[:1], [0], 200, 5)
    assert (single["n"], single["difference"], single["seed_sd"]) == (2, pytest.approx(0.5), None)


def _grid_cfg() -> SpoConfig:
    cfg = load_config(None, ["variants={dpo: {loss: dpo, spo: false}, dpo_spo: {loss: dpo, spo: true}}",
                             "grid.seeds=[0, 1]", "judge.bootstrap_samples=200"])
    return cfg


def test_grid_results_group_the_seeds_of_each_comparison() -> None:
    cfg = _grid_cfg()
    by_item = {
        "dpo_spo_s0_vs_dpo_s0": {"p1": "win", "p2": "win", "p3": "loss"},
        "dpo_spo_s1_vs_dpo_s1": {"p1": "win", "p2": "tie", "p3": "loss"},
        "dpo_spo_s0_vs_chosen": {"p1": "win", "p2": "loss", "p3": "tie"},
        "dpo_spo_s1_vs_chosen": {"p1": "win", "p2": "win", "p3": "invalid"},
        "dpo_s0_vs_chosen": {"p1": "loss", "p2": "loss", "p3": "loss"},
        "dpo_s1_vs_chosen": {"p1": "win", "p2": "loss", "p3": "loss"},
        "dpo_spo_s0_vs_dpo_s1": {"p1": "win", "p2": "win", "p3": "win"},  # another seed's cell: no family
        "dpo_spo_s0_vs_sft": {"p1": "win", "p2": "win", "p3": "win"},  # one seed only
    }
    sides = {"dpo_spo_s0_vs_dpo_s1": ("dpo_spo_s0", "dpo_s1")}
    results: dict[str, Any] = {}
    for name in by_item:
        a, b = sides.get(name) or tuple(name.split("_vs_"))
        results[name] = {"a": a, "b": b, "win_rate": 0.0}
    results["paired_differences"] = {"x": {"a": "dpo_spo_s0"}}  # not a comparison: ignored

    found = families(cfg, results)
    assert found == {
        "dpo_spo_vs_dpo": {"a": "dpo_spo", "b": "dpo", "seeds": [0, 1],
                           "comparisons": {0: "dpo_spo_s0_vs_dpo_s0", 1: "dpo_spo_s1_vs_dpo_s1"}},
        "dpo_spo_vs_chosen": {"a": "dpo_spo", "b": "chosen", "seeds": [0, 1],
                              "comparisons": {0: "dpo_spo_s0_vs_chosen", 1: "dpo_spo_s1_vs_chosen"}},
        "dpo_vs_chosen": {"a": "dpo", "b": "chosen", "seeds": [0, 1],
                          "comparisons": {0: "dpo_s0_vs_chosen", 1: "dpo_s1_vs_chosen"}},
        "dpo_spo_vs_sft": {"a": "dpo_spo", "b": "sft", "seeds": [0], "comparisons": {0: "dpo_spo_s0_vs_sft"}},
    }

    pooled, differences = grid_results(cfg, results, by_item)
    assert set(pooled) == set(found)
    vs_twin = pooled["dpo_spo_vs_dpo"]
    assert (vs_twin["a"], vs_twin["b"], vs_twin["loss"], vs_twin["spo"], vs_twin["dataset"]) == (
        "dpo_spo", "dpo", "dpo", True, cfg.data.dataset)
    assert vs_twin["comparisons"] == ["dpo_spo_s0_vs_dpo_s0", "dpo_spo_s1_vs_dpo_s1"]
    # p1 1, p2 0.75, p3 0
    assert (vs_twin["n"], vs_twin["win_rate"]) == (3, pytest.approx(1.75 / 3))
    assert vs_twin["per_seed"] == {"0": pytest.approx(2 / 3), "1": pytest.approx(1.5 / 3)}
    assert vs_twin == {**vs_twin, **pool_family([by_item["dpo_spo_s0_vs_dpo_s0"], by_item["dpo_spo_s1_vs_dpo_s1"]],
                                                [0, 1], 200, cfg.seed)}
    vs_chosen = pooled["dpo_spo_vs_chosen"]  # p3 is invalid under seed 1: p1 and p2 only
    assert (vs_chosen["n"], vs_chosen["win_rate"]) == (2, pytest.approx(0.75))
    assert pooled["dpo_spo_vs_sft"]["seed_sd"] is None and pooled["dpo_spo_vs_sft"]["win_rate"] == 1.0

    assert list(differences) == ["dpo_spo_minus_dpo_vs_chosen"]  # dpo was not judged against sft
    diff = differences["dpo_spo_minus_dpo_vs_chosen"]
    assert (diff["a"], diff["twin"], diff["b"], diff["seeds"]) == ("dpo_spo", "dpo", "chosen", [0, 1])
    assert diff["families"] == ["dpo_spo_vs_chosen", "dpo_vs_chosen"]
    # p1: 1 - 0.5, p2: 0.5 - 0 (p3 invalid under one seed of dpo_spo)
    assert (diff["n"], diff["difference"]) == (2, pytest.approx(0.5))
    assert diff["per_seed"] == {"0": pytest.approx(0.5), "1": pytest.approx(0.5)} and diff["seed_sd"] == 0.0


def test_a_difference_needs_the_same_seeds_on_both_arms() -> None:
    cfg = _grid_cfg()
    by_item = {"dpo_spo_s0_vs_chosen": {"p1": "win"}, "dpo_spo_s1_vs_chosen": {"p1": "win"},
               "dpo_s0_vs_chosen": {"p1": "loss"}}
    results = {name: {"a": name.split("_vs_")[0], "b": "chosen"} for name in by_item}
    pooled, differences = grid_results(cfg, results, by_item)
    assert pooled["dpo_vs_chosen"]["seeds"] == [0] and pooled["dpo_spo_vs_chosen"]["seeds"] == [0, 1]
    assert differences == {}


# --- the judge stage on a 2 x 2 grid ----------------------------------------------------------------


@pytest.fixture()
def grid_workspace(tmp_path: Path) -> Path:
    rows = [{"id": f"h{i}", "source": "hh", "split": "test", "prompt": f"\n\nHuman: question {i}?\n\nAssistant:",
             "chosen": " a fine answer", "rejected": " no"} for i in range(6)]
    write_jsonl(tmp_path / "data/validated/test.jsonl", rows)
    long, ok, same = " a much longer answer than the chosen one", " ok", " a fine answer"
    responses = {
        "dpo_spo_s0": {},  # long everywhere: wins against chosen, sft and its twin
        "dpo_spo_s1": {"h0": " garbage", "h1": ok},  # h0 invalid, h1 loses to chosen
        "dpo_s0": dict.fromkeys((r["id"] for r in rows), ok),  # loses to chosen
        "dpo_s1": dict.fromkeys((r["id"] for r in rows), same),  # as long as chosen: a tie
        "sft": dict.fromkeys((r["id"] for r in rows), ok),
    }
    for model, special in responses.items():
        write_jsonl(tmp_path / "outputs/generations" / f"{model}.jsonl",
                    [{"id": r["id"], "prompt": r["prompt"], "response": special.get(r["id"], long), "sample": 0,
                      "model": model} for r in rows])
    return tmp_path


def test_judge_stage_judges_every_cell_and_pools_the_seeds(
        grid_workspace: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    root = grid_workspace
    cfg = load_config(None, [
        "variants={dpo: {loss: dpo, spo: false}, dpo_spo: {loss: dpo, spo: true}}", "grid.seeds=[0, 1]",
        f"judge.rows_dir={root}/data/validated", f"judge.generations_dir={root}/outputs/generations",
        f"judge.out_dir={root}/outputs/judgments", f"judge.metrics_file={root}/metrics/judge.json",
        f"judge.cache_file={root}/outputs/judge_cache.sqlite", "judge.bootstrap_samples=200",
    ])
    monkeypatch.setattr(judge_stage, "make_judge", lambda cfg: (LongerWins(), None))
    caplog.set_level(logging.INFO, logger="spo.judge")
    judge_stage.run(cfg)
    judged = json.loads((root / "metrics/judge.json").read_text())
    comparisons = [c.name for c in cfg.judge_comparisons()]
    assert comparisons == ["dpo_s0_vs_chosen", "dpo_s1_vs_chosen", "dpo_spo_s0_vs_chosen", "dpo_spo_s0_vs_dpo_s0",
                           "dpo_spo_s0_vs_sft", "dpo_spo_s1_vs_chosen", "dpo_spo_s1_vs_dpo_s1", "dpo_spo_s1_vs_sft"]
    assert set(judged) == {*comparisons, "paired_differences", GRID, GRID_DIFFERENCES}
    for name in comparisons:
        assert (root / "outputs/judgments" / f"{name}.jsonl").is_file(), name
    assert (judged["dpo_spo_s0_vs_chosen"]["n"], judged["dpo_spo_s0_vs_chosen"]["win_rate"]) == (6, 1.0)
    assert (judged["dpo_spo_s1_vs_chosen"]["n"], judged["dpo_spo_s1_vs_chosen"]["win_rate"]) == (5, 0.8)
    assert judged["dpo_s1_vs_chosen"]["win_rate"] == 0.5  # every item a tie
    assert set(judged["paired_differences"]) == {"dpo_spo_s0_minus_dpo_s0_vs_chosen",
                                                 "dpo_spo_s1_minus_dpo_s1_vs_chosen"}

    grid = judged[GRID]
    assert set(grid) == {"dpo_vs_chosen", "dpo_spo_vs_chosen", "dpo_spo_vs_dpo", "dpo_spo_vs_sft"}
    family = grid["dpo_spo_vs_chosen"]
    assert family["comparisons"] == ["dpo_spo_s0_vs_chosen", "dpo_spo_s1_vs_chosen"] and family["seeds"] == [0, 1]
    # the per-seed comparisons' item scores, on the prompts both seeds judged validly
    outcomes = [{line["id"]: line["outcome"] for line in read_jsonl(root / "outputs/judgments" / f"{name}.jsonl")}
                for name in family["comparisons"]]
    common = [i for i in outcomes[0] if all(o[i] in SCORE for o in outcomes)]
    assert common == ["h1", "h2", "h3", "h4", "h5"]  # h0 is invalid under seed 1
    assert family["n"] == 5
    assert family["win_rate"] == pytest.approx(np.mean([SCORE[o[i]] for o in outcomes for i in common]))
    assert family["win_rate"] == pytest.approx(0.9)
    assert family["per_seed"] == {"0": pytest.approx(1.0), "1": pytest.approx(0.8)}
    assert family["seed_sd"] == pytest.approx(float(np.std([1.0, 0.8], ddof=1)))
    assert family["ci_low"] <= family["win_rate"] <= family["ci_high"]
    assert grid["dpo_vs_chosen"]["win_rate"] == pytest.approx(0.25)  # seed 0 loses, seed 1 ties

    assert list(judged[GRID_DIFFERENCES]) == ["dpo_spo_minus_dpo_vs_chosen"]
    diff = judged[GRID_DIFFERENCES]["dpo_spo_minus_dpo_vs_chosen"]
    # h1: (1 + 0)/2 - (0 + 0.5)/2 = 0.25; h2-h5: 1 - 0.25 = 0.75
    assert (diff["n"], diff["difference"]) == (5, pytest.approx((0.25 + 4 * 0.75) / 5))
    assert "grid dpo_spo_vs_chosen: 90.0% [" in caplog.text
    winrates = json.loads((root / "outputs/judgments/winrates.json").read_text())
    assert winrates == judged
