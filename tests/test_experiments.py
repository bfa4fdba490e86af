"""`spo exp`: the presets are valid against the real config, runs go through `dvc exp run` without
touching the workspace, and the summary carries `dvc exp show`'s numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from spo import experiments
from spo.cli import main
from spo.errors import ConfigError

ALL_EXPERIMENTS = {"spo_on_off", "loss_x_spo", "extractor", "n_levels", "lambda", "heads", "positional_encoding",
                   "degree_mode", "dataset", "real", "real_degrees", "real_extractor", "real_positional_encoding",
                   "real_structure"}


def test_every_preset_run_is_a_valid_config_of_the_repo_params() -> None:
    presets = experiments.load_presets(REPO / "experiments.yaml")
    assert set(presets) == ALL_EXPERIMENTS
    assert set(presets["extractor"].runs) == {"rake", "yake", "positionrank", "random"}
    for preset in presets.values():
        for run in preset.runs:
            experiments.check_run(REPO / "params.yaml", preset.overrides(run))  # raises on a typo or a bad value
    six = experiments.load_config(REPO / "params.yaml",
                                  [experiments.spo_override(o) for o in presets["loss_x_spo"].runs["hh"]])
    assert ({(v.loss, v.spo) for v in six.variants.values()}
            == {(loss, spo) for loss in ("dpo", "ipo", "kto") for spo in (False, True)})


def test_a_typo_in_a_preset_fails_before_dvc_runs(tmp_path: Path) -> None:
    presets_file = tmp_path / "experiments.yaml"
    presets_file.write_text("presets:\n  bad:\n    description: x\n    runs:\n      one: [keywords.methd=yake]\n")
    presets = experiments.load_presets(presets_file)
    with pytest.raises(ConfigError, match="keywords.methd"):
        experiments.run_preset("bad", presets, params=REPO / "params.yaml")
    presets_file.write_text("presets:\n  bad:\n    description: x\n    runs:\n      'a..b': []\n")
    with pytest.raises(ConfigError, match="not a valid experiment name"):
        experiments.load_presets(presets_file)


def test_common_overrides_come_first_in_every_run_and_a_runs_own_win(tmp_path: Path) -> None:
    presets_file = tmp_path / "experiments.yaml"
    presets_file.write_text("""presets:
  real:
    description: x
    common: &real [keywords.method=yake, degrees.n_levels=3]
    runs:
      base: []
      n2: [degrees.n_levels=2]
  real_random:
    description: y
    common: *real
    runs:
      random: [keywords.method=random]
""")
    presets = experiments.load_presets(presets_file)
    results = experiments.run_preset("real", presets, params=REPO / "params.yaml", dry_run=True, extra=["seed=3"])
    assert [r["command"][6:] for r in results] == [
        ["-S", "keywords.method=yake", "-S", "degrees.n_levels=3", "-S", "seed=3"],
        ["-S", "keywords.method=yake", "-S", "degrees.n_levels=3", "-S", "degrees.n_levels=2", "-S", "seed=3"]]
    cfg = experiments.load_config(REPO / "params.yaml", presets["real_random"].overrides("random"))
    assert cfg.keywords.method == "random" and cfg.degrees.n_levels == 3  # shared by anchor, the run's own wins
    [demo] = experiments.run_preset("real", presets, params=REPO / "params.yaml", dry_run=True, only=["base"],
                                    in_workspace=True)
    assert demo["command"][:6] == ["dvc", "exp", "run", "-n", "real-base", "-S"]  # no --temp: the workspace's outputs
    with pytest.raises(ConfigError, match="one run"):
        experiments.run_preset("real", presets, params=REPO / "params.yaml", dry_run=True, in_workspace=True)
    # a preset's targets end the command: those stages and what they depend on, no more
    [heads] = experiments.run_preset("real_degrees", experiments.load_presets(REPO / "experiments.yaml"),
                                     params=REPO / "params.yaml", dry_run=True, only=["without_pe"])
    assert heads["command"][-3:] == ["-S", "train.spo.positional_encoding=false", "train@dpo_spo-0"]
    # --seeds: every run once per training seed, its grid that seed alone (a cell's train.seed comes from
    # grid.seeds: setting train.seed would train seed 0 every time), named <preset>-<run>-s<seed>
    seeded = experiments.run_preset("real", presets, params=REPO / "params.yaml", dry_run=True, only=["base"],
                                    seeds=[0, 1, 2])
    assert [r["command"][4] for r in seeded] == ["real-base-s0", "real-base-s1", "real-base-s2"]
    assert [r["command"][-2:] for r in seeded] == [["-S", f"grid.seeds=[{s}]"] for s in (0, 1, 2)]
    for s in (0, 1, 2):
        cfg = experiments.check_run(REPO / "params.yaml", seeded[s]["command"][7::2])
        assert {cfg.cell(c.variant, c.seed).train.seed for c in cfg.cells()} == {s}
    # a preset's cell target follows the seed: train@dpo_spo-0 becomes train@dpo_spo-2
    [heads2] = experiments.run_preset("real_degrees", experiments.load_presets(REPO / "experiments.yaml"),
                                      params=REPO / "params.yaml", dry_run=True, only=["without_pe"], seeds=[2])
    assert heads2["command"][-3:] == ["-S", "grid.seeds=[2]", "train@dpo_spo-2"]
    with pytest.raises(ConfigError, match="one run"):
        experiments.run_preset("real", presets, params=REPO / "params.yaml", dry_run=True, only=["base"],
                               in_workspace=True, seeds=[0, 1])
    presets_file.write_text(presets_file.read_text().replace("degrees.n_levels=3", "degrees.n_levels=1"))
    with pytest.raises(ConfigError, match="n_levels"):  # a bad common override fails every run before DVC
        experiments.run_preset("real", experiments.load_presets(presets_file), params=REPO / "params.yaml",
                               dry_run=True)


def test_a_train_target_must_be_a_stage_of_the_runs_grid(tmp_path: Path) -> None:
    """dvc.yaml's train is a matrix: a target names a cell's stage, train@<variant>-<seed>; a policy's
    name alone (train@dpo_spo, the stage before the grid) or a cell outside grid.seeds fails before DVC."""
    assert experiments.train_stage("dpo_spo_s0") == "train@dpo_spo-0"
    assert experiments.train_stage("kto_s12") == "train@kto-12"
    assert experiments.train_stage("dpo_spo") == "train@dpo_spo"  # a run from before the grid
    presets_file = tmp_path / "experiments.yaml"
    for targets, ok in (("[train@dpo_spo-0]", True), ("[train, judge]", True), ("[train@dpo_spo]", False),
                        ("[train@dpo_spo-1]", False), ("[train@ipo-0]", False)):
        presets_file.write_text(f"presets:\n  p:\n    description: x\n    targets: {targets}\n    runs:\n      a: []\n")
        presets = experiments.load_presets(presets_file)
        if ok:
            [run] = experiments.run_preset("p", presets, params=REPO / "params.yaml", dry_run=True)
            assert run["command"][-len(presets["p"].targets):] == presets["p"].targets
        else:
            with pytest.raises(ConfigError, match="not a train stage of this run's grid"):
                experiments.run_preset("p", presets, params=REPO / "params.yaml", dry_run=True)
    # the run's own overrides make the grid: a variant added, or more seeds, adds its stages
    [run] = experiments.run_preset("p", presets, params=REPO / "params.yaml", dry_run=True,
                                   extra=["++variants.ipo={loss: ipo, spo: false}", "grid.seeds=[0,1]"])
    assert run["command"][-1] == "train@ipo-0"


# -- against real DVC, in a scratch project whose one stage writes judge-like metrics from params
STAGE = textwrap.dedent("""
    import json, os, pathlib, yaml
    p = yaml.safe_load(open("params.yaml"))
    rate = {"rake": 0.55, "yake": 0.6, "random": 0.45}[p["keywords"]["method"]]
    pathlib.Path("metrics").mkdir(exist_ok=True)
    stats = {"win_rate": rate, "ci_low": rate - 0.1, "ci_high": rate + 0.1, "n": 100, "tie_rate": 0.0}
    # as spo judge writes it: one comparison per grid cell (<variant>_s<seed>), each family pooled over seeds
    judge = {f"{v}_s0_vs_chosen": {"a": f"{v}_s0", "b": "chosen", **stats} for v in p["variants"]}
    judge["grid"] = {f"{v}_vs_chosen": {"a": v, "b": "chosen", "seeds": [0], **stats} for v in p["variants"]}
    judge["data_dir"] = os.environ.get("SPO_DATA_DIR")
    json.dump(judge, open("metrics/judge.json", "w"))
    for v in p["variants"]:
        json.dump({"eval": {"rewards/accuracies": rate}}, open(f"metrics/train_{v}_s0.json", "w"))
""")


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "proj"
    work.mkdir()
    (work / "params.yaml").write_text("# the knobs\ndata:\n  dataset: hh\nkeywords:\n  method: rake   # extractor\n"
                                      "variants:\n  dpo_spo: {loss: dpo, spo: true}\n")
    (work / "stage.py").write_text(STAGE)
    (work / "dvc.yaml").write_text(textwrap.dedent("""
        stages:
          judge:
            cmd: python stage.py
            deps: [stage.py]
            params: [data, keywords, variants]
            metrics:
              - metrics/judge.json: {cache: false}
              - metrics/train_dpo_spo_s0.json: {cache: false}
    """))
    (work / "experiments.yaml").write_text(textwrap.dedent("""
        presets:
          extractor:
            description: which phrases
            runs:
              yake: [keywords.method=yake]
              random: [keywords.method=random, '++variants.ipo={loss: ipo, spo: false}']
    """))
    monkeypatch.chdir(work)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"],
                [sys.executable, "-m", "dvc", "init", "-q"], [sys.executable, "-m", "dvc", "repro", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
        subprocess.run(cmd, check=True, capture_output=True)
    return work


def test_preset_runs_are_dvc_experiments_and_the_summary_shows_them(scratch: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    params_before = (scratch / "params.yaml").read_text()
    monkeypatch.setenv("SPO_DATA_DIR", "shared/data")  # relative to the project, not to DVC's temporary copy
    assert main(["exp", "run", "extractor"]) == 0
    assert (scratch / "params.yaml").read_text() == params_before, "runs happen in temporary copies"
    assert json.loads((scratch / "metrics/judge.json").read_text())["dpo_spo_s0_vs_chosen"]["win_rate"] == 0.55

    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True,
                                      check=True).stdout)
    rows = experiments.parse_exp_show(shown)
    assert [r["name"] for r in rows][1:] == ["extractor-yake", "extractor-random"]  # the workspace is the baseline
    assert [r["win_rates"]["dpo_spo_s0_vs_chosen"]["win_rate"] for r in rows] == [0.55, 0.6, 0.45]
    assert "ipo_s0_vs_chosen" in rows[2]["win_rates"] and "ipo_s0_vs_chosen" not in rows[1]["win_rates"]
    assert [r["training"] for r in rows][1:] == [{"dpo_spo_s0": {"rewards/accuracies": 0.6}},
                                                 {"dpo_spo_s0": {"rewards/accuracies": 0.45}}]  # metrics/train_<cell>
    assert [r["grid"]["dpo_spo_vs_chosen"]["win_rate"] for r in rows] == [0.55, 0.6, 0.45]  # the families
    assert experiments.varying_params(rows) == ["keywords.method", "variants"]
    yake = next(e for e in shown[1]["experiments"] if e["name"] == "extractor-yake")["revs"][0]["data"]
    assert yake["metrics"]["metrics/judge.json"]["data"]["data_dir"] == str(scratch / "shared/data")

    assert main(["exp", "summary", "-o", "out"]) == 0
    md = (scratch / "out/experiments.md").read_text()
    assert "| extractor-yake | yake | dpo_spo | 60.0% [50.0, 70.0] (n=100) |" in md
    assert ("| extractor-random | random | dpo_spo, ipo | 45.0% [35.0, 55.0] (n=100) "
            "| 45.0% [35.0, 55.0] (n=100) |") in md
    assert "| extractor-yake | dpo_spo_s0 | 0.600 |" in md  # the policy's last evaluation: one per cell
    assert "| Method | hh |" in md  # the paper's layout: the latest run for each method and data set
    # a method is a variant, its win rate the grid family's (pooled over seeds), not one cell's
    assert "| dpo_spo | 45.0% [35.0, 55.0] (n=100) |" in md and "| ipo | 45.0% [35.0, 55.0] (n=100) |" in md
    assert "| dpo_spo_s0 | 45.0%" not in md
    assert (scratch / "out/experiments.png").stat().st_size > 1000
    assert "data:image/png;base64," in (scratch / "out/experiments.html").read_text()
    assert json.loads((scratch / "out/experiments.json").read_text())[1]["params"]["keywords.method"] == "yake"
    assert main(["exp", "summary", "-o", "only", "--match", "yake$"]) == 0
    assert [r["name"] for r in json.loads((scratch / "only/experiments.json").read_text())] == ["extractor-yake"]


def test_degree_heads_per_level_carry_n_intervals_and_chance(tmp_path: Path) -> None:
    """48 eval pairs, 2 of them not distinct on the chosen side: each level is predicted 46 times."""
    from spo.judging.statistics import wilson_interval

    ev = {"pairs": 48.0, "excluded_w": 2.0, "degree/accuracy_w": 0.5,
          "degree/accuracy_w/ci_low": 0.38, "degree/accuracy_w/ci_high": 0.62,
          **{f"degree/accuracy_w/level_{k}": v for k, v in enumerate([1.0, 0.5, 0.25, 0.25])}}
    rows = [{"name": "real_degrees-random", "training": {"dpo_spo_s0": ev, "dpo_s0": {"rewards/accuracies": 0.5}}}]
    [head] = experiments.degree_levels(rows)
    assert (head["head"], head["n"], head["chance"]) == ("chosen", 4 * 46, 0.25)
    # over all levels: the trainer's bootstrap over responses, never a binomial over 4 x 46 correlated trials
    assert (head["ci_low"], head["ci_high"]) == (0.38, 0.62) != wilson_interval(92, 184)
    assert [(lv["level"], lv["n"]) for lv in head["levels"]] == [(0, 46), (1, 46), (2, 46), (3, 46)]
    assert (head["levels"][1]["ci_low"], head["levels"][1]["ci_high"]) == wilson_interval(23, 46)
    assert experiments.plot_degrees([head], tmp_path / "d.png") and (tmp_path / "d.png").stat().st_size > 1000
    from spo.report import to_markdown

    md = to_markdown(experiments.summary_doc([{**rows[0], "rev": "x", "params": {}, "win_rates": {}}]))
    assert "| real_degrees-random | dpo_spo_s0 | chosen | 184 | 0.500 |" in md
    # beside the heads, what they must beat: the shortcut audit of the same degree data (metrics/degrees.json)
    audit = {"chance": 0.25, "formatting_max": 0.271, "probes": {"length": {"accuracy": 0.33},
             "word_length": {"accuracy": 0.548}, "length_all": {"accuracy": 0.56}}}
    md = to_markdown(experiments.summary_doc([{**rows[0], "rev": "x", "params": {}, "win_rates": {}, "audit": audit}]))
    assert "| real_degrees-random | 0.271 | 0.330 | 0.548 | 0.560 |" in md


def test_a_training_only_experiment_is_a_row_of_the_summary() -> None:
    """A targets: [train@dpo_spo-0] run in a workspace that never ran the judge has no judge.json at all:
    its degree heads are still its result (dvc exp show --json's shape, as parse_exp_show reads it)."""
    data = {"params": {"params.yaml": {"data": {"keywords": {"method": "random"}}}},
            "metrics": {"metrics/train_dpo_spo_s0.json": {"data": {"eval": {"degree/accuracy_w": 0.4}}},
                        "metrics/degrees.json": {"data": {"shortcut_audit": {"chance": 0.25, "probes": {}}}}}}
    entries = [{"rev": "a" * 40, "name": "main", "data": None,
                "experiments": [{"revs": [{"rev": "b" * 40, "name": "real_degrees-random-s0", "data": data}]}]}]
    [row] = experiments.parse_exp_show(entries)
    assert row["name"] == "real_degrees-random-s0" and row["training"]["dpo_spo_s0"]["degree/accuracy_w"] == 0.4
    assert row["audit"] == {"chance": 0.25, "probes": {}}


def test_a_targeted_runs_summary_shows_only_the_metrics_it_produced() -> None:
    """real_degrees runs train@dpo_spo-0: its judge.json and train_dpo_s0.json are the baseline's files."""
    presets = experiments.load_presets(REPO / "experiments.yaml")
    ev = {"rewards/accuracies": 0.4}
    row = {"name": "real_degrees-random", "win_rates": {"dpo_spo_s0_vs_dpo_s0": {"win_rate": 0.57}},
           "grid": {"dpo_spo_vs_dpo": {"a": "dpo_spo", "b": "dpo", "win_rate": 0.57}},
           "training": {"dpo_s0": ev, "dpo_spo_s0": ev, "dpo_spo_s1": ev}}
    full = {**row, "name": "real-hh"}
    kept, untouched = experiments.only_what_ran([row, full], presets)
    # the cell dpo_spo_s0 is the stage train@dpo_spo-0; dpo_spo_s1 (train@dpo_spo-1) did not run either
    assert kept["win_rates"] == {} and kept["grid"] == {} and list(kept["training"]) == ["dpo_spo_s0"]
    assert untouched == full  # a preset without targets ran everything
    # a run of `--seeds` (<run>-s<seed>) is the same run of the same preset
    [seeded] = experiments.only_what_ran([{**row, "name": "real_degrees-random-s2"}], presets)
    assert seeded["win_rates"] == {} and list(seeded["training"]) == ["dpo_spo_s0"]


def test_seeded_runs_give_mean_spread_and_range_per_metric() -> None:
    def row(name: str, rate: float, acc: float) -> dict:
        return {"name": name, "win_rates": {"dpo_spo_s0_vs_dpo_s0": {"win_rate": rate}},
                "training": {"dpo_spo_s0": {"degree/accuracy_w": acc}}, "params": {}}

    rows = [row("real-base-s0", 0.50, 0.40), row("real-base-s1", 0.56, 0.44), row("real-base-s2", 0.53, 0.48),
            row("real-other", 0.9, 0.9)]
    [group] = experiments.seed_groups(rows)
    assert group["run"] == "real-base" and group["seeds"] == [0, 1, 2]
    win = group["metrics"]["win rate dpo_spo_s0_vs_dpo_s0"]
    assert win["mean"] == pytest.approx(0.53) and win["sd"] == pytest.approx(0.03)  # sample sd of .50 .56 .53
    assert (win["min"], win["max"], win["seeds"]) == (0.50, 0.56, 3)
    assert group["metrics"]["degree accuracy dpo_spo_s0 chosen"]["sd"] == pytest.approx(0.04)
    from spo.report import to_markdown

    md = to_markdown(experiments.summary_doc(rows))
    assert "| real-base | 0 1 2 | win rate dpo_spo_s0_vs_dpo_s0 | 0.530 | 0.030 | 0.500 | 0.560 |" in md


def test_the_method_table_pools_the_seeds_of_a_grid_and_reads_older_runs_by_policy() -> None:
    """A method of the paper's table is a variant: its win rate is judge.json's grid family (pooled over
    the run's seeds), never one seed's cell; a run from before the grid had one comparison per policy."""
    def stats(rate: float) -> dict:
        return {"win_rate": rate, "ci_low": rate - 0.1, "ci_high": rate + 0.1, "n": 50}

    grid_run = {"name": "loss_x_spo-hh", "params": {"data.dataset": "hh"},
                "win_rates": {f"dpo_spo_s{s}_vs_chosen": {"a": f"dpo_spo_s{s}", "b": "chosen", **stats(0.4 + s / 10)}
                              for s in (0, 1)},
                "grid": {"dpo_spo_vs_chosen": {"a": "dpo_spo", "b": "chosen", **stats(0.45)},
                         "dpo_spo_vs_dpo": {"a": "dpo_spo", "b": "dpo", **stats(0.6)}}}
    old_run = {"name": "loss_x_spo-tldr", "params": {"data.dataset": "tldr"},
               "win_rates": {"dpo_spo_vs_chosen": {"a": "dpo_spo", "b": "chosen", **stats(0.7)}}}
    datasets, table = experiments.paper_table([grid_run, old_run])
    assert datasets == ["hh", "tldr"]
    assert table == [["dpo_spo", "45.0% [35.0, 55.0] (n=50)", "70.0% [60.0, 80.0] (n=50)"]]
