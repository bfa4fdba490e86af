"""``spo results``: the win-rate table `make demo` ends with (the grid pooled over seeds first, then
every cell's comparisons), the judge accuracy interval, and the degree heads per cell and variant."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from spo.cli import main
from spo.judging.statistics import bootstrap_ci, wilson_interval


def test_wilson_interval_matches_hand_derived_values() -> None:
    # 30 of 47: p = 0.6383, z = 1.95996; centre (p + z^2/2n) / (1 + z^2/n) = 0.6279,
    # half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n) = 0.1325
    low, high = wilson_interval(30, 47)
    assert low == pytest.approx(0.4954, abs=5e-4) and high == pytest.approx(0.7604, abs=5e-4)
    # 0 of 10: the interval is [0, z^2 / (n + z^2)] = [0, 0.2775], not the normal approximation's [0, 0]
    assert wilson_interval(0, 10) == (0.0, pytest.approx(3.8415 / 13.8415, abs=1e-4))
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 0) == (None, None)


def _family(a: str, b: str, spo: bool, win_rate: float, per_seed: dict[str, float], tie_rate: float,
            n: int = 100) -> dict:
    """A ``grid`` record as spo.judging.grid writes it (interval +-7 points around the win rate)."""
    values = list(per_seed.values())
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"a": a, "b": b, "loss": "dpo", "spo": spo, "dataset": "hh", "seeds": [int(s) for s in per_seed],
            "comparisons": [f"{a}_s{s}_vs_{b}" if b in ("chosen", "sft") else f"{a}_s{s}_vs_{b}_s{s}"
                            for s in per_seed],
            "n": n, "win_rate": win_rate, "ci_low": win_rate - 0.07, "ci_high": win_rate + 0.07, "ci_level": 0.95,
            "per_seed": per_seed, "seed_sd": sd, "seed_min": min(values), "seed_max": max(values),
            "tie_rate": tie_rate}


# variants dpo and dpo_spo x seeds 0, 1; SPO against SFT judged for seed 0 only; one manual comparison
# (dpo against dpo_spo) that is not a row of the grid's table
GRID = {
    "dpo_vs_chosen": _family("dpo", "chosen", False, 0.42, {"0": 0.40, "1": 0.44}, 0.03),
    "dpo_spo_vs_chosen": _family("dpo_spo", "chosen", True, 0.47, {"0": 0.45, "1": 0.49}, 0.05),
    "dpo_spo_vs_dpo": _family("dpo_spo", "dpo", True, 0.55, {"0": 0.52, "1": 0.58}, 0.06),
    "dpo_spo_vs_sft": _family("dpo_spo", "sft", True, 0.61, {"0": 0.61}, 0.0, n=98),
    "dpo_vs_dpo_spo": _family("dpo", "dpo_spo", False, 0.45, {"0": 0.44, "1": 0.46}, 0.05),
}
GRID_DIFFERENCES = {"dpo_spo_minus_dpo_vs_chosen": {
    "a": "dpo_spo", "twin": "dpo", "b": "chosen", "families": ["dpo_spo_vs_chosen", "dpo_vs_chosen"], "seeds": [0, 1],
    "n": 100, "difference": 0.05, "ci_low": -0.02, "ci_high": 0.12, "ci_level": 0.95,
    "per_seed": {"0": 0.03, "1": 0.07}, "seed_sd": 0.0282842712, "seed_min": 0.03, "seed_max": 0.07}}


def _metrics(folder: Path, judge_id: str = "reward:models/reward", grid: bool = False) -> Path:
    folder.mkdir(parents=True)
    row = {"a": "dpo_spo_s0", "b": "dpo_s0", "n": 300, "win_rate": 0.57, "ci_low": 0.512, "ci_high": 0.627,
           "tie_rate": 0.04, "lc_win_rate": 0.518, "judge_id": judge_id}
    judged = {"dpo_spo_s0_vs_dpo_s0": row, "note": "not a comparison"}
    if grid:
        judged.update(grid=GRID, grid_differences=GRID_DIFFERENCES)
    (folder / "judge.json").write_text(json.dumps(judged))
    (folder / "reward_model.json").write_text(json.dumps({"held_out_accuracy_after": 0.64, "held_out_pairs": 300}))
    return folder


def test_the_table_shows_each_comparison_with_n_interval_ties_and_the_judges_accuracy(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = _metrics(tmp_path / "metrics")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "report.md").write_text("# report\n")
    assert main(["results", "--metrics-dir", str(metrics), "--reports-dir", str(tmp_path / "reports"),
                 "--policy-dir", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Win rates") and "judge reward:models/reward" in out[0]
    assert "held-out pair accuracy 64.0% [58.4, 69.2] on 300 pairs (chance 50%)" in out[0]
    assert out[2].split() == ["comparison", "n", "win", "rate", "95%", "interval", "ties", "LC", "win", "rate"]
    assert out[3].split() == ["dpo_spo_s0", "vs", "dpo_s0", "300", "57.0%", "[51.2,", "62.7]", "4.0%", "51.8%"]
    assert len(out) == 6 and out[-1] == f"Report: {tmp_path / 'reports' / 'report.md'}"


def test_an_api_judge_has_no_accuracy_line_and_json_is_there_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = _metrics(tmp_path / "metrics", judge_id="openai:gpt-4o@api.openai.com")
    assert main(["results", "--metrics-dir", str(metrics), "--json", "--policy-dir", str(tmp_path / "none")]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["judge"] == {"id": "openai:gpt-4o@api.openai.com"}
    assert list(found["win_rates"]) == ["dpo_spo_s0_vs_dpo_s0"]
    assert found["degrees"] == {} and found["degrees_by_variant"] == {}
    assert found["grid"] == {} and found["grid_differences"] == {}  # a judge.json from before the grid


def test_degree_heads_are_shown_per_head_and_level_against_chance(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    metrics = _metrics(tmp_path / "metrics")
    (tmp_path / "policy" / "dpo_spo_s0").mkdir(parents=True)
    # 4 levels, 10 eval variants per true level: head w gets 10, 5, 3, 2 right (20 of 40); head l always says 0
    w = [[10, 0, 0, 0], [3, 5, 2, 0], [1, 3, 3, 3], [0, 2, 6, 2]]
    l_ = [[10, 0, 0, 0]] * 4
    (tmp_path / "policy" / "dpo_spo_s0" / "degree_confusion.json").write_text(json.dumps({"l": l_, "w": w}))
    # the 40 predictions are 10 responses x 4 levels: five responses all right, five all wrong
    rows = [[f"e{i}", 4 if i < 5 else 0, 4] for i in range(10)]
    (tmp_path / "policy" / "dpo_spo_s0" / "degree_responses.json").write_text(json.dumps({"n_levels": 4, "w": rows}))
    assert main(["results", "--metrics-dir", str(metrics), "--policy-dir", str(tmp_path / "policy")]) == 0
    out = capsys.readouterr().out.splitlines()
    at = out.index(next(line for line in out if line.startswith("Degree heads")))
    assert "bootstrap interval over responses" in out[at]
    assert out[at + 2].split() == ["policy", "head", "n", "accuracy", "95%", "interval", "chance", "per", "level"]
    low, high = bootstrap_ci(np.array([1.0] * 5 + [0.0] * 5), 2000, 0)
    assert out[at + 3].split() == ["dpo_spo_s0", "chosen", "40", "50.0%", f"[{100 * low:.1f},", f"{100 * high:.1f}]",
                                   "25%", "1.00", "0.50", "0.30", "0.20"]
    # ten correlated responses are not forty trials: the interval is much wider than Wilson's over 40
    wilson_low, wilson_high = wilson_interval(20, 40)
    assert high - low > 1.5 * (wilson_high - wilson_low)
    assert out[at + 4].split()[:5] == ["dpo_spo_s0", "rejected", "40", "25.0%", "–"]  # no responses file for it
    assert out[at + 4].split()[-4:] == ["1.00", "0.00", "0.00", "0.00"]


def test_no_judge_metrics_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["results", "--metrics-dir", str(tmp_path)]) == 2
    assert f"{tmp_path}/judge.json: no judge metrics (run the pipeline first: dvc repro)" in caplog.text


def test_the_shortcut_audit_is_shown_beside_the_heads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = _metrics(tmp_path / "metrics")
    probes = {name: {"accuracy": acc, "ci_low": acc - 0.01, "ci_high": acc + 0.01, "per_level": [acc] * 4}
              for name, acc in (("whitespace", 0.253), ("formatting", 0.283), ("length", 0.33),
                                ("word_length", 0.548), ("length_all", 0.57))}
    audit = {"chance": 0.25, "test_responses": 1544, "judged": True, "shortcuts": {}, "formatting_max": 0.283,
             "probes": probes}
    (metrics / "degrees.json").write_text(json.dumps({"n_levels": 4, "shortcut_audit": audit}))
    assert main(["results", "--metrics-dir", str(metrics), "--policy-dir", str(tmp_path / "none")]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Shortcut audit"))
    assert line == ("Shortcut audit of the degree levels (1544 held-out responses, chance 25%): formatting at most "
                    "28.3% (within the limit); length 33.0%, word length 54.8%, all length probes 57.0%")
    audit["shortcuts"] = {"whitespace": 0.37}
    (metrics / "degrees.json").write_text(json.dumps({"n_levels": 4, "shortcut_audit": audit}))
    assert main(["results", "--metrics-dir", str(metrics), "--json", "--policy-dir", str(tmp_path / "none")]) == 0
    assert json.loads(capsys.readouterr().out)["shortcut_audit"]["shortcuts"] == {"whitespace": 0.37}
    assert main(["results", "--metrics-dir", str(metrics), "--policy-dir", str(tmp_path / "none")]) == 0
    assert "(SHORTCUT in whitespace)" in capsys.readouterr().out


def _lines_after(out: list[str], title: str) -> list[str]:
    """The rows of the table under the line that starts with ``title`` (header first), split into words."""
    at = out.index(next(line for line in out if line.startswith(title)))
    rows = []
    for line in out[at + 2:]:
        if not line:
            break
        rows.append(line.split())
    return rows


def test_the_grid_comes_first_one_row_per_loss_spo_and_opponent_pooled_over_seeds(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = _metrics(tmp_path / "metrics", grid=True)
    assert main(["results", "--metrics-dir", str(metrics), "--policy-dir", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "judge reward:models/reward: held-out pair accuracy 64.0%" in out[0]  # the judge line, as before
    assert out[2].startswith("The grid:")
    grid = _lines_after(out, "The grid:")
    assert grid[0] == ["dataset", "loss", "SPO", "opponent", "seeds", "prompts", "win", "rate", "95%", "interval",
                       "seed", "spread", "tie", "rate"]
    # against chosen (loss x SPO), then SFT, then the twin; the manual dpo-vs-dpo_spo family is no row
    assert grid[1:] == [
        ["hh", "dpo", "no", "chosen", "2", "100", "42.0%", "[35.0,", "49.0]", "40.0", "to", "44.0%", "(sd", "2.8)",
         "3.0%"],
        ["hh", "dpo", "yes", "chosen", "2", "100", "47.0%", "[40.0,", "54.0]", "45.0", "to", "49.0%", "(sd", "2.8)",
         "5.0%"],
        ["hh", "dpo", "yes", "sft", "1", "98", "61.0%", "[54.0,", "68.0]", "–", "0.0%"],  # one seed: no spread
        ["hh", "dpo", "yes", "dpo", "(twin)", "2", "100", "55.0%", "[48.0,", "62.0]", "52.0", "to", "58.0%", "(sd",
         "4.2)", "6.0%"],
    ]
    differences = _lines_after(out, "SPO minus its twin")
    assert differences[1] == ["dpo_spo", "−", "dpo", "chosen", "2", "100", "+5.0", "[-2.0,", "+12.0]", "+3.0", "to",
                              "+7.0", "points", "(sd", "2.8)"]
    # the per-cell comparisons follow the grid
    cells = _lines_after(out, "Each comparison")
    assert cells[1][:3] == ["dpo_spo_s0", "vs", "dpo_s0"]


def test_json_carries_the_grid_and_the_degree_heads_per_variant(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = _metrics(tmp_path / "metrics", grid=True)
    # head w of dpo_spo is right 14 and 16 times of 20 under seeds 0 and 1; "old" predates the grid's cell names
    for cell, right in (("dpo_spo_s0", 7), ("dpo_spo_s1", 8), ("old", 5)):
        (tmp_path / "policy" / cell).mkdir(parents=True)
        matrix = [[right, 10 - right], [10 - right, right]]
        (tmp_path / "policy" / cell / "degree_confusion.json").write_text(json.dumps({"w": matrix}))
    args = ["results", "--metrics-dir", str(metrics), "--policy-dir", str(tmp_path / "policy")]
    assert main([*args, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["grid"] == GRID and found["grid_differences"] == GRID_DIFFERENCES
    assert sorted(found["degrees"]) == ["dpo_spo_s0", "dpo_spo_s1", "old"]  # per cell, as before
    head = found["degrees_by_variant"]["dpo_spo"]["w"]
    assert list(found["degrees_by_variant"]) == ["dpo_spo"]
    assert head["seeds"] == [0, 1] and head["per_seed"] == {"0": 0.7, "1": 0.8}
    assert head["accuracy"] == pytest.approx(0.75) and head["seed_sd"] == pytest.approx(0.1 / 2 ** 0.5)
    assert (head["seed_min"], head["seed_max"], head["chance"]) == (0.7, 0.8, 0.5)
    assert main(args) == 0
    heads = _lines_after(capsys.readouterr().out.splitlines(), "Degree heads per variant")
    assert heads[1:] == [["dpo_spo", "chosen", "2", "75.0%", "70.0", "to", "80.0%", "(sd", "7.1)", "50%"]]


def test_another_runs_grid_joins_the_table_as_its_data_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The paper's table is loss x SPO x data set; each data set is a run of its own (its own
    prefix): ``--also`` adds the other run's grid, each row named by its data set."""
    hh = _metrics(tmp_path / "hh", grid=True)
    tldr = _metrics(tmp_path / "tldr", grid=True)
    judged = json.loads((tldr / "judge.json").read_text())
    for record in (*judged["grid"].values(), *judged["grid_differences"].values()):
        record["dataset"] = "tldr"
    judged["grid"]["dpo_spo_vs_chosen"]["win_rate"] = 0.66
    (tldr / "judge.json").write_text(json.dumps(judged))
    assert main(["results", "--metrics-dir", str(hh), "--also", str(tldr), "--policy-dir", str(tmp_path / "none")]) == 0
    rows = _lines_after(capsys.readouterr().out.splitlines(), "The grid:")[1:]
    against_chosen = [(r[0], r[1], r[2], r[6]) for r in rows if r[3] == "chosen"]
    assert against_chosen == [("hh", "dpo", "no", "42.0%"), ("tldr", "dpo", "no", "42.0%"),
                              ("hh", "dpo", "yes", "47.0%"), ("tldr", "dpo", "yes", "66.0%")]
    assert main(["results", "--metrics-dir", str(hh), "--also", str(tmp_path / "nothing")]) == 2  # named, not a trace
