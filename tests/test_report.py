"""`spo report`: numbers come straight from the metrics files, missing inputs read "not run",
and the HTML is self-contained."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_results import GRID, GRID_DIFFERENCES

from spo.config import SpoConfig
from spo.stages import STAGES, load_stage

JUDGE = {
    "dpo_spo_s0_vs_chosen": {
        "a": "dpo_spo_s0", "b": "chosen", "cached_verdicts": 0, "ci_high": 0.61, "ci_level": 0.95, "ci_low": 0.41,
        "invalid": 0, "items": 100, "judge_id": "reward:models/reward",
        "lc_model": {"intercept": 0.55, "length_diff_sd": 203.6, "slope": 1.14}, "lc_win_rate": 0.6338988127508256,
        "lengths": {"mean_chars_a": 123.81, "mean_chars_b": 217.8}, "losses": 49, "n": 100, "not_judged": 0,
        "position_consistency": 1.0, "prompt_version": None, "tie_rate": 0.0, "ties": 0, "win_rate": 0.51, "wins": 51,
    },
    "dpo_spo_s0_vs_sft": {
        "a": "dpo_spo_s0", "b": "sft", "cached_verdicts": 0, "ci_high": 0.6301249999999993, "ci_level": 0.95,
        "ci_low": 0.445, "invalid": 0, "items": 97, "judge_id": "openai:gpt-4o", "lc_win_rate": 0.4671160999926905,
        "losses": 42, "n": 97, "not_judged": 3, "position_consistency": 0.92, "prompt_version": "v1",
        "tie_rate": 0.08, "ties": 8, "win_rate": 0.5463917525773195, "wins": 49,
        "rouge": {"dpo_spo_s0": {"rouge1": 0.2512, "rouge2": 0.0731, "rougeL": 0.1802},
                  "sft": {"rouge1": 0.2399, "rouge2": 0.0655, "rougeL": 0.1713}},
    },
}


def _levels(prefix: str, values: list[float]) -> dict[str, float]:
    return {f"degree/accuracy_{prefix}/level_{i}": v for i, v in enumerate(values)}


def _train_line(step: int, split: str) -> dict:
    row = {"loss": 1.0 - step / 100, "loss_align": 0.69, "loss_degree_w": 1.38, "loss_degree_l": 1.39,
           "rewards/accuracies": 0.5 + step / 100, "rewards/margins": 0.01, "degree/accuracy_w": 0.4,
           "degree/accuracy_l": 0.3, "split": split, "step": step, "pairs": 16.0}
    row.update(_levels("w", [0.8, 0.2, 0.1, 0.5]))
    row.update(_levels("l", [0.6, 0.1, 0.5, 0.2]))
    return row


def _png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=20)
    plt.close(fig)


def _write(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def _fake_run(root: Path) -> None:
    m = root / "metrics"
    paired = {"a": "dpo_spo_s0", "twin": "dpo_s0", "b": "chosen", "n": 98, "difference": 0.031, "ci_low": -0.052,
              "ci_high": 0.118}
    _write(m / "judge.json", {**JUDGE, "paired_differences": {"dpo_spo_s0_minus_dpo_s0_vs_chosen": paired},
                              "grid": GRID, "grid_differences": GRID_DIFFERENCES})
    _write(m / "validate.json", {"bad_fraction": 0.005, "check_failures": {"not_blank:chosen": 4, "unique_id": 0},
                                 "failed": False, "max_bad_fraction": 0.05, "rows_in": 4452,
                                 "rows_quarantined_prepare": 14, "rows_quarantined_validate": 10,
                                 "rows_read_prepare": 4466, "rows_valid": 4442})
    _write(m / "keywords.json", {"method": "rake", "phrases_per_response_mean": 11.74,
                                 "phrases_per_response_median": 9.0, "covered_char_fraction_mean": 0.5,
                                 "responses": 8884, "responses_without_phrases": 43})
    audit = {"split": "train", "chance": 0.25, "train_responses": 1606, "test_responses": 1544, "judged": True,
             "max_above_chance": 0.05, "shortcuts": {"punctuation": 0.31},
             "probes": {"whitespace": {"accuracy": 0.253, "ci_low": 0.251, "ci_high": 0.254,
                                       "per_level": [0.72, 0.0, 0.02, 0.27]},
                        "punctuation": {"accuracy": 0.31, "ci_low": 0.3, "ci_high": 0.32, "per_level": [0.3] * 4},
                        "length": {"accuracy": 0.33, "ci_low": 0.321, "ci_high": 0.339, "per_level": [0.33] * 4}}}
    _write(m / "degrees.json", {"n_levels": 4, "responses": 8884, "shortcut_audit": audit, **{
        f"level_{i}": {"phrases_removed_mean": 4.0 * i, "removed_fraction_mean": 0.15 * i,
                       "removed_fraction_median": 0.15 * i} for i in range(4)}})
    _write(m / "sft.json", {"eval_loss_before": 8.3296, "eval_loss_after": 6.2540, "train_loss_first": 8.3,
                            "train_loss_last": 5.96, "steps": 80, "tokens_per_second": 764.3})
    _write(m / "reward_model.json", {"held_out_accuracy_before": 0.5319, "held_out_accuracy_after": 0.5957,
                                     "held_out_pairs": 47, "train_pairs": 153, "steps": 40})
    _write(m / "generate.json", {"dpo_spo_s0": {"prompts": 100, "samples": 100, "generated_tokens": 4482,
                                             "mean_response_tokens": 44.82, "tokens_per_second": 178.56,
                                             "empty_responses": 0}})
    _write(root / "reports/validation/validation.json", {"expectations": [
        {"check": "not_blank:chosen", "title": "chosen is not blank", "success": False, "unexpected_count": 4,
         "rows_quarantined": 4},
        {"check": "unique_id", "title": "ids are unique", "success": True, "unexpected_count": 0}],
        "totals": {"rows_in": 4452}})
    policy = root / "models/policy/dpo_spo_s0"
    policy.mkdir(parents=True)
    _write(policy / "degree_confusion.json", {"w": [[8, 2], [4, 6]], "l": [[5, 5], [5, 5]]})
    lines = [_train_line(s, "train") for s in (2, 4, 6, 8, 10)] + [_train_line(s, "eval") for s in (5, 10)]
    (policy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    _write(policy / "train_summary.json", {"eval": _train_line(10, "eval"), "loss": "dpo", "steps": 10,
                                            "total_steps": 10, "skipped_steps": 0, "degree_mode": "reencode"})
    _png(policy / "degree_confusion.png")
    _png(root / "outputs/judgments/winrates.png")
    rows = [
        {"id": "same", "n_levels": 3, "chosen": {"levels": ["a b", "a b", "a"]}},
        {"id": "r1", "n_levels": 3, "chosen": {"levels": ["The quick brown fox " * 40, "The brown fox", "The fox"],
                                               "removed_fraction": [0.0, 0.3, 0.6]}},
        {"id": "r2", "n_levels": 3, "chosen": {"levels": ["one | two", "one |", "|"], "removed_fraction": [0, .5, .9]}},
    ]
    (root / "data/degrees").mkdir(parents=True)
    (root / "data/degrees/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _write(root / "data/prepared/provenance.json", {"stage": "prepare", "config_hash": "x", "inputs": {
        "files": {"train": {"path": "hh/train.jsonl.gz", "sha256": "ab" * 32}}, "kind": "local"},
        "packages": {"pydantic": "2.0"}})


CELL = re.compile(r"\| (\S+) \| (\S+) vs (\S+) \| ([\d.]+)% \[([\d.]+), ([\d.]+)\] \(n=(\d+)\) "
                  r"\| ([\d.]+)% \| ([\d.]+)% \|")


def test_report_numbers_equal_the_judge_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert STAGES[-1] == "report"
    summary = load_stage("report").run(SpoConfig())
    assert summary["not_run"] == []
    md = (tmp_path / "reports/report.md").read_text()
    parsed = {m.group(1): m.groups() for m in CELL.finditer(md)}
    assert set(parsed) == set(JUDGE)
    for name, (_, a, b, wr, lo, hi, n, tie, lc) in parsed.items():
        rec = JUDGE[name]
        assert (a, b) == (rec["a"], rec["b"])
        assert float(wr) == round(100 * rec["win_rate"], 1)
        assert float(lo) == round(100 * rec["ci_low"], 1) and float(hi) == round(100 * rec["ci_high"], 1)
        assert int(n) == rec["n"]
        assert float(tie) == round(100 * rec["tie_rate"], 1) and float(lc) == round(100 * rec["lc_win_rate"], 1)
        assert rec["judge_id"] in md
    assert "| Comparison | Method | hh |" in md
    assert "| dpo_spo_s0 | 0.251 | 0.073 | 0.180 |" in md and "| sft | 0.240 | 0.066 | 0.171 |" in md  # ROUGE
    # the other sections carry the real values
    assert "8.330 | 6.254" in md and "0.532 | 0.596" in md and "| rake |" in md and "| 4466 | 4452 | 4442 |" in md
    assert "not_blank:chosen" in md and "178.6" in md and "abababababababab" in md and "<details>" in md
    # the paired difference of SPO and its twin, beside (not among) the comparisons
    assert "| dpo_spo_s0 − dpo_s0 | chosen | +3.1 | [-5.2, +11.8] | 98 |" in md
    # the grid, first: one row per loss x SPO x opponent pooled over seeds, SPO minus its twin, the judge's
    # accuracy and the degree heads per variant beside the shortcut audit
    grid = md[md.index("## Grid"):md.index("## Win rates")]
    rows = [line for line in grid.splitlines() if line.startswith("| hh |")]
    assert rows == ["| hh | dpo | no | chosen | 2 | 100 | 42.0% | [35.0, 49.0] | 40.0 to 44.0% (sd 2.8) | 3.0% |",
                    "| hh | dpo | yes | chosen | 2 | 100 | 47.0% | [40.0, 54.0] | 45.0 to 49.0% (sd 2.8) | 5.0% |",
                    "| hh | dpo | yes | sft | 1 | 98 | 61.0% | [54.0, 68.0] | – | 0.0% |",
                    "| hh | dpo | yes | dpo (twin) | 2 | 100 | 55.0% | [48.0, 62.0] | 52.0 to 58.0% (sd 4.2) | 6.0% |"]
    assert "| dpo_spo − dpo | chosen | 2 | 100 | +5.0 | [-2.0, +12.0] | +3.0 to +7.0 points (sd 2.8) |" in grid
    assert "held-out pair accuracy 59.6% [45.3, 72.4] on 47 pairs (chance 50%)" in grid
    assert "| dpo_spo | chosen | 1 | 70.0% | – | 50% |" in grid  # one seed: no spread
    assert "| dpo_spo | rejected | 1 | 50.0% | – | 50% |" in grid
    assert "Shortcut audit of the degree levels (1544 held-out responses" in grid and "](grid.png)" in grid
    # the shortcut audit: every probe with its kind, interval and verdict
    assert "| whitespace | formatting | 25.3% | [25.1%, 25.4%] | 0.72 0.00 0.02 0.27 | ok |" in md
    assert "| punctuation | formatting | 31.0% | [30.0%, 32.0%] | 0.30 0.30 0.30 0.30 | SHORTCUT |" in md
    assert "| length | length | 33.0% | [32.1%, 33.9%] | 0.33 0.33 0.33 0.33 | reported |" in md
    # degree examples: the row with repeated levels is skipped, long text truncated, pipes escaped
    assert "Row r1" in md and "Row r2" in md and "Row same" not in md
    assert "…" in md and "one \\| two" in md
    for image in ("grid.png", "winrates.png", "curves_dpo_spo_s0.png", "degree_accuracy_dpo_spo_s0.png",
                  "degree_confusion_dpo_spo_s0.png"):
        assert (tmp_path / "reports" / image).is_file()
        assert f"]({image})" in md
    page = (tmp_path / "reports/report.html").read_text()
    assert 'src="http' not in page and "<link" not in page and "<script" not in page
    assert page.count('src="data:image/png;base64,') == 5
    assert "51.0% [41.0, 61.0] (n=100)" in page


def test_missing_inputs_read_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    summary = load_stage("report").run(SpoConfig())
    assert set(summary["not_run"]) >= {"grid", "winrates", "validation", "keywords", "degrees", "sft", "policies",
                                       "reward_model", "generate"}
    md = (tmp_path / "reports/report.md").read_text()
    assert md.count("not run") >= 9 and "Judge (win rates): not run" in md
    assert "Grid (win rates pooled over seeds): not run" in md and not (tmp_path / "reports/grid.png").exists()
    page = (tmp_path / "reports/report.html").read_text()
    assert "not run" in page and 'src="http' not in page


def test_partial_and_broken_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics/judge.json").unlink()
    (tmp_path / "metrics/sft.json").write_text("{not json")
    (tmp_path / "models/policy/dpo_spo_s0/metrics.jsonl").write_text("garbage\n")
    summary = load_stage("report").run(SpoConfig())
    md = (tmp_path / "reports/report.md").read_text()
    assert "SFT: not run" in md and "Judge (win rates): not run" in md
    assert "winrates" in summary["not_run"] and "keywords" not in summary["not_run"]
    assert "| eval | 10 |" in md  # the policy's final eval still comes from train_summary.json


def test_plot_data_equals_the_metrics_and_dvc_draws_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CSVs behind `dvc plots show` carry the judge's and the trainer's numbers, and DVC renders
    every top-level plot of the repo's dvc.yaml from them (the custom win-rate template included)."""
    import csv
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    _fake_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    summary = load_stage("report").run(SpoConfig())
    assert sorted(Path(p).as_posix() for p in summary["plots"]) == [
        "plots/degree_accuracy/dpo_spo_s0.csv", "plots/grid.csv", "plots/loss_parts/dpo_spo_s0.csv",
        "plots/reward_accuracy/dpo_spo_s0.csv", "plots/win_rates.csv",
    ]
    win = {r["comparison"]: r for r in csv.DictReader(open("plots/win_rates.csv"))}
    assert set(win) == set(JUDGE)
    for name, rec in JUDGE.items():
        keys = ("win_rate", "ci_low", "ci_high")
        assert [float(win[name][k]) for k in keys] == [rec[k] for k in keys]
        assert int(win[name]["n"]) == rec["n"]
    loss = list(csv.DictReader(open("plots/loss_parts/dpo_spo_s0.csv")))
    assert [int(r["step"]) for r in loss] == [2, 4, 6, 8, 10]  # train lines only
    assert float(loss[-1]["loss"]) == _train_line(10, "train")["loss"]
    acc = list(csv.DictReader(open("plots/reward_accuracy/dpo_spo_s0.csv")))
    assert [(int(r["step"]), float(r["reward_accuracy"])) for r in acc] == [(5, 0.55), (10, 0.6)]  # eval lines
    grid = list(csv.DictReader(open("plots/grid.csv")))  # the rows of the results table, in its order
    assert [(r["family"], r["loss"], r["spo"], r["opponent"], r["seeds"], r["n"]) for r in grid] == [
        ("dpo_vs_chosen", "dpo", "no", "chosen", "2", "100"), ("dpo_spo_vs_chosen", "dpo", "yes", "chosen", "2", "100"),
        ("dpo_spo_vs_sft", "dpo", "yes", "sft", "1", "98"), ("dpo_spo_vs_dpo", "dpo", "yes", "dpo", "2", "100")]
    for row in grid:
        keys = ("win_rate", "ci_low", "ci_high", "tie_rate")
        assert [float(row[k]) for k in keys] == [GRID[row["family"]][k] for k in keys]
        sd = GRID[row["family"]]["seed_sd"]
        assert (row["seed_sd"] == "") if sd is None else float(row["seed_sd"]) == sd
    levels = list(csv.DictReader(open("plots/degree_accuracy/dpo_spo_s0.csv")))
    assert [(r["level"], float(r["accuracy_w"]), float(r["accuracy_l"])) for r in levels] == [
        ("0", 0.8, 0.6), ("1", 0.2, 0.1), ("2", 0.1, 0.5), ("3", 0.5, 0.2)]

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / ".dvc" / "plots", tmp_path / ".dvc" / "plots")
    shutil.copy(REPO / ".dvc" / "config", tmp_path / ".dvc" / "config")
    subprocess.run(["git", "init", "-q"], check=True)
    targets = ["plots/loss_parts", "plots/reward_accuracy", "plots/degree_accuracy", "plots/win_rates.csv",
               "plots/grid.csv"]
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", *targets, "--json"], capture_output=True,
                           text=True)
    assert shown.returncode == 0, shown.stderr
    rendered = json.loads(shown.stdout)
    assert not rendered.get("errors"), rendered.get("errors")
    data = {k.removeprefix("dvc.yaml::"): v for k, v in rendered["data"].items() if k.startswith("dvc.yaml::")}
    for plot in ("plots/loss_parts/dpo_spo_s0.csv", "plots/reward_accuracy/dpo_spo_s0.csv",
                 "plots/degree_accuracy/dpo_spo_s0.csv", "plots/win_rates.csv"):
        assert data.get(plot) and data[plot][0]["type"] == "vega", plot
    spec = data["plots/win_rates.csv"][0]["content"]
    assert [layer["mark"]["type"] for layer in spec["layer"]] == ["bar", "errorbar", "rule"]
    values = {v["comparison"]: v for v in spec["data"]["values"]}
    assert float(values["dpo_spo_s0_vs_sft"]["ci_high"]) == JUDGE["dpo_spo_s0_vs_sft"]["ci_high"]
    drawn = {v["family"]: v for v in rendered["data"]["plots/grid.csv"][0]["content"]["data"]["values"]}
    assert sorted(drawn) == sorted(r["family"] for r in grid) and float(drawn["dpo_spo_vs_dpo"]["win_rate"]) == 0.55
