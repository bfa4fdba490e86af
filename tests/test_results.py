"""``spo results``: the win-rate table `make demo` ends with, and the judge accuracy interval under it."""

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


def _metrics(folder: Path, judge_id: str = "reward:models/reward") -> Path:
    folder.mkdir(parents=True)
    row = {"a": "dpo_spo", "b": "dpo", "n": 300, "win_rate": 0.57, "ci_low": 0.512, "ci_high": 0.627,
           "tie_rate": 0.04, "lc_win_rate": 0.518, "judge_id": judge_id}
    (folder / "judge.json").write_text(json.dumps({"dpo_spo_vs_dpo": row, "note": "not a comparison"}))
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
    assert out[3].split() == ["dpo_spo", "vs", "dpo", "300", "57.0%", "[51.2,", "62.7]", "4.0%", "51.8%"]
    assert len(out) == 6 and out[-1] == f"Report: {tmp_path / 'reports' / 'report.md'}"


def test_an_api_judge_has_no_accuracy_line_and_json_is_there_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = _metrics(tmp_path / "metrics", judge_id="openai:gpt-4o@api.openai.com")
    assert main(["results", "--metrics-dir", str(metrics), "--json", "--policy-dir", str(tmp_path / "none")]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["judge"] == {"id": "openai:gpt-4o@api.openai.com"} and list(found["win_rates"]) == ["dpo_spo_vs_dpo"]
    assert found["degrees"] == {}


def test_degree_heads_are_shown_per_head_and_level_against_chance(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    metrics = _metrics(tmp_path / "metrics")
    (tmp_path / "policy" / "dpo_spo").mkdir(parents=True)
    # 4 levels, 10 eval variants per true level: head w gets 10, 5, 3, 2 right (20 of 40); head l always says 0
    w = [[10, 0, 0, 0], [3, 5, 2, 0], [1, 3, 3, 3], [0, 2, 6, 2]]
    l_ = [[10, 0, 0, 0]] * 4
    (tmp_path / "policy" / "dpo_spo" / "degree_confusion.json").write_text(json.dumps({"l": l_, "w": w}))
    # the 40 predictions are 10 responses x 4 levels: five responses all right, five all wrong
    rows = [[f"e{i}", 4 if i < 5 else 0, 4] for i in range(10)]
    (tmp_path / "policy" / "dpo_spo" / "degree_responses.json").write_text(json.dumps({"n_levels": 4, "w": rows}))
    assert main(["results", "--metrics-dir", str(metrics), "--policy-dir", str(tmp_path / "policy")]) == 0
    out = capsys.readouterr().out.splitlines()
    at = out.index(next(line for line in out if line.startswith("Degree heads")))
    assert "bootstrap interval over responses" in out[at]
    assert out[at + 2].split() == ["policy", "head", "n", "accuracy", "95%", "interval", "chance", "per", "level"]
    low, high = bootstrap_ci(np.array([1.0] * 5 + [0.0] * 5), 2000, 0)
    assert out[at + 3].split() == ["dpo_spo", "chosen", "40", "50.0%", f"[{100 * low:.1f},", f"{100 * high:.1f}]",
                                   "25%", "1.00", "0.50", "0.30", "0.20"]
    # ten correlated responses are not forty trials: the interval is much wider than Wilson's over 40
    wilson_low, wilson_high = wilson_interval(20, 40)
    assert high - low > 1.5 * (wilson_high - wilson_low)
    assert out[at + 4].split()[:5] == ["dpo_spo", "rejected", "40", "25.0%", "–"]  # no responses file for it
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
