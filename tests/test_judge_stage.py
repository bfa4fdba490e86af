"""The ``judge`` stage end to end with a fake judge on hand-written rows and generation files."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from spo.config import ComparisonConfig, SpoConfig
from spo.errors import StageFailed
from spo.io import read_jsonl, write_jsonl
from spo.judging.base import Judge, JudgeRequest, NotJudged, Verdict
from spo.judging.comparisons import build_comparison, load_rows, requests_for
from spo.stages import judge as judge_stage

WINRATE_FIELDS = {
    "win_rate", "ci_low", "ci_high", "tie_rate", "invalid", "not_judged", "n", "position_consistency",
    "lc_win_rate", "lengths", "judge_id", "prompt_version",
}


class LongerWins:
    """Prefers the longer response; 'garbage' responses make it answer unparseably; stops after `budget`;
    gives up on the requests whose response a contains one of `fails_on` (as after exhausted retries)."""

    judge_id = "fake:longer"

    def __init__(self, budget: int | None = None, fails_on: tuple[str, ...] = ()) -> None:
        self.budget = budget
        self.fails_on = fails_on
        self.calls = 0
        self.seen: list[JudgeRequest] = []

    def judge_many(self, requests: Sequence[JudgeRequest], progress: bool = True) -> list[Verdict | NotJudged]:
        out: list[Verdict | NotJudged] = []
        for request in requests:
            self.seen.append(request)
            if self.budget is not None and self.calls >= self.budget:
                out.append(NotJudged("budget", f"budget: max_calls={self.budget} reached", budget=True))
                continue
            if any(marker in request.prompt for marker in self.fails_on):
                self.calls += 6
                out.append(NotJudged("HTTP 429", "giving up after 6 attempts: HTTP 429: Rate limit reached", 6))
                continue
            self.calls += 1
            if "garbage" in request.response_a + request.response_b:
                out.append(Verdict(None, "I cannot decide", None))
            else:
                winner = "A" if len(request.response_a) >= len(request.response_b) else "B"
                out.append(Verdict(winner, f"[[{winner}]]", "longer is better", prompt_tokens=10, completion_tokens=2))
        return out


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    rows = [
        {"id": f"h{i}", "source": "hh", "split": "test", "prompt": f"\n\nHuman: question {i}?\n\nAssistant:",
         "chosen": " a fine answer", "rejected": " no"} for i in range(6)
    ] + [
        {"id": f"t{i}", "source": "tldr", "split": "test", "prompt": f"POST: a story number {i}\nTL;DR:",
         "chosen": " the cat sat on the mat", "rejected": " dog"} for i in range(4)
    ]
    write_jsonl(tmp_path / "data/validated/test.jsonl", rows)
    gens = tmp_path / "outputs/generations"
    long = [{"id": r["id"], "prompt": r["prompt"], "response": " a much longer and detailed answer here", "sample": 0,
             "model": "dpo_spo_s0"} for r in rows]
    long[9]["response"] = " the cat sat on the mat"  # identical to the reference: ROUGE 1 on this item
    long[0]["response"] = " garbage"  # invalid verdicts for h0
    extra = {"id": "zz", "prompt": "\n\nHuman: orphan\n\nAssistant:", "response": " x", "sample": 0,
             "model": "dpo_spo_s0"}
    second_sample = {**long[1], "sample": 1, "response": " IGNORED"}
    write_jsonl(gens / "dpo_spo_s0.jsonl", [*long, extra, second_sample])
    short = [{"id": r["id"], "prompt": r["prompt"], "response": " ok", "sample": 0, "model": "sft"} for r in rows[:5]]
    write_jsonl(gens / "sft.jsonl", short)
    return tmp_path


def _cfg(root: Path) -> SpoConfig:
    cfg = SpoConfig()
    jc = cfg.judge
    jc.rows_dir = str(root / "data/validated")
    jc.generations_dir = str(root / "outputs/generations")
    jc.out_dir = str(root / "outputs/judgments")
    jc.metrics_file = str(root / "metrics/judge.json")
    jc.cache_file = str(root / "outputs/judge_cache.sqlite")
    jc.bootstrap_samples = 200
    jc.auto_comparisons = False
    jc.comparisons = [
        ComparisonConfig(name="dpo_spo_s0_vs_chosen", a="dpo_spo_s0", b="chosen"),
        ComparisonConfig(name="dpo_spo_s0_vs_sft", a="dpo_spo_s0", b="sft"),
    ]
    return cfg


def test_fake_judge_satisfies_protocol() -> None:
    assert isinstance(LongerWins(), Judge)


def test_requests_are_built_in_both_orders(workspace: Path) -> None:
    cfg = _cfg(workspace)
    rows, _ = load_rows(cfg.judge.rows_dir)
    comp = build_comparison(cfg.judge.comparisons[0], cfg.judge, rows, "hh")
    assert [it.id for it in comp.items] == [f"h{i}" for i in range(6)] + [f"t{i}" for i in range(4)]
    assert comp.only_a == 1 and comp.only_b == 0  # "zz" has no dataset row
    reqs = requests_for(comp.items)
    assert len(reqs) == 20
    assert reqs[2].response_a == reqs[3].response_b == comp.items[1].response_a  # sample 0, not sample 1
    assert reqs[2].response_b == " a fine answer" and reqs[2].task == "dialogue" and reqs[-1].task == "summarization"


def test_stage_end_to_end(workspace: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fake = LongerWins()
    monkeypatch.setattr(judge_stage, "make_judge", lambda cfg: (fake, None))
    caplog.set_level(logging.INFO, logger="spo.judge")
    summary = judge_stage.run(_cfg(workspace))

    out = workspace / "outputs/judgments"
    for name in ("dpo_spo_s0_vs_chosen.jsonl", "dpo_spo_s0_vs_sft.jsonl", "winrates.json", "winrates.png",
                 "provenance.json"):
        assert (out / name).is_file(), name
    assert (workspace / "outputs/judge_cache.sqlite").is_file(), "the persistent DVC output exists for every backend"
    assert (out / "winrates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    winrates = json.loads((out / "winrates.json").read_text())
    assert json.loads((workspace / "metrics/judge.json").read_text()) == winrates
    assert set(winrates) == {"dpo_spo_s0_vs_chosen", "dpo_spo_s0_vs_sft", "grid", "grid_differences"}
    assert set(winrates["grid"]) == {"dpo_spo_vs_chosen", "dpo_spo_vs_sft"} and winrates["grid_differences"] == {}
    vs_chosen = winrates["dpo_spo_s0_vs_chosen"]
    assert WINRATE_FIELDS <= set(vs_chosen)
    # h0 is garbage -> invalid; t3's generation equals chosen (equal length: A wins both orders -> tie);
    # every other generation is longer than chosen -> win.
    assert (vs_chosen["invalid"], vs_chosen["n"], vs_chosen["ties"], vs_chosen["wins"]) == (1, 9, 1, 8)
    assert vs_chosen["win_rate"] == pytest.approx(8.5 / 9)
    assert vs_chosen["ci_low"] <= vs_chosen["win_rate"] <= vs_chosen["ci_high"]
    assert vs_chosen["judge_id"] == "fake:longer" and vs_chosen["not_judged"] == 0
    # ROUGE over the 4 TL;DR items: t3 copies the reference (1.0), t0-t2 share one long answer.
    assert set(vs_chosen["rouge"]) == {"dpo_spo_s0"}  # the chosen side is the reference itself
    assert vs_chosen["rouge"]["dpo_spo_s0"]["rouge1"] == pytest.approx((1.0 + 3 * _r1_long()) / 4)
    assert "rouge" not in winrates["dpo_spo_s0_vs_sft"]  # HH items only
    assert vs_chosen["lengths"]["mean_chars_a"] > vs_chosen["lengths"]["mean_chars_b"]
    vs_sft = winrates["dpo_spo_s0_vs_sft"]
    assert vs_sft["only_a"] == 6 and vs_sft["n"] == 4 and vs_sft["win_rate"] == 1.0  # h5, t0-t3, zz only in dpo_spo_s0

    lines = read_jsonl(out / "dpo_spo_s0_vs_chosen.jsonl")
    assert len(lines) == 10
    first = lines[1]
    assert {"id", "outcome", "chars_a", "chars_b", "ab", "ba", "judge_id", "prompt_version"} <= set(first)
    assert first["outcome"] == "win" and first["ab"]["raw"] == "[[A]]" and first["ba"]["prefers"] == "a"
    assert lines[0]["outcome"] == "invalid"
    assert any(r.message.startswith("dpo_spo_s0_vs_chosen: win 94.4% [") and "n=9" in r.message for r in caplog.records)
    assert summary["not_judged"] == 0


def test_spo_against_its_twin_is_a_paired_difference_on_the_same_prompts(
        workspace: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture) -> None:
    """Issue 22: DPO and DPO+SPO are judged against the same opponent on the same prompts; their
    difference gets a paired bootstrap over those prompts (not two independent intervals)."""
    import numpy as np

    from spo.cli import main
    from spo.judging.statistics import bootstrap_ci

    rows = read_jsonl(workspace / "data/validated/test.jsonl")
    write_jsonl(workspace / "outputs/generations/dpo_s0.jsonl",
                [{"id": r["id"], "prompt": r["prompt"], "response": " ok", "sample": 0, "model": "dpo_s0"}
                 for r in rows])
    cfg = _cfg(workspace)
    cfg.judge.comparisons = [*cfg.judge.comparisons, ComparisonConfig(name="dpo_s0_vs_chosen", a="dpo_s0", b="chosen")]
    monkeypatch.setattr(judge_stage, "make_judge", lambda cfg: (LongerWins(), None))
    caplog.set_level(logging.INFO, logger="spo.judge")
    judge_stage.run(cfg)
    judged = json.loads((workspace / "metrics/judge.json").read_text())
    paired = judged["paired_differences"]
    assert list(paired) == ["dpo_spo_s0_minus_dpo_s0_vs_chosen"]  # dpo_spo_s0_vs_sft has no twin judged against sft
    diff = paired["dpo_spo_s0_minus_dpo_s0_vs_chosen"]
    # dpo's " ok" loses every item; dpo_spo wins 8, ties t3, and h0 is invalid: dropped from both arms
    assert (diff["a"], diff["twin"], diff["b"], diff["n"]) == ("dpo_spo_s0", "dpo_s0", "chosen", 9)
    assert diff["difference"] == pytest.approx(8.5 / 9)
    assert (diff["ci_low"], diff["ci_high"]) == bootstrap_ci(np.array([1.0] * 8 + [0.5]), 200, cfg.seed)
    assert diff["comparisons"] == ["dpo_spo_s0_vs_chosen", "dpo_s0_vs_chosen"]
    assert "dpo_spo_s0_minus_dpo_s0_vs_chosen: +94.4 points [" in caplog.text
    assert "on 9 prompts (paired bootstrap)" in caplog.text
    assert set(judged) - {"paired_differences", "grid", "grid_differences"} == {
        "dpo_spo_s0_vs_chosen", "dpo_spo_s0_vs_sft", "dpo_s0_vs_chosen"}
    pooled = judged["grid_differences"]["dpo_spo_minus_dpo_vs_chosen"]  # one seed: the same difference
    assert (pooled["n"], pooled["seeds"], pooled["seed_sd"]) == (9, [0], None)
    assert pooled["difference"] == pytest.approx(diff["difference"])
    assert main(["results", "--metrics-dir", str(workspace / "metrics"), "--policy-dir", str(workspace / "none")]) == 0
    assert "  dpo_spo_s0_minus_dpo_s0_vs_chosen: +94.4 points [" in capsys.readouterr().out


def _r1_long() -> float:
    from spo.judging.statistics import rouge_scores

    return rouge_scores([" a much longer and detailed answer here"], [" the cat sat on the mat"])["rouge1"]


def test_budget_stop_writes_partial_results(workspace: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    fake = LongerWins(budget=7)  # 3 items fully judged, the 4th half-judged
    monkeypatch.setattr(judge_stage, "make_judge", lambda cfg: (fake, None))
    caplog.set_level(logging.INFO, logger="spo.judge")
    judge_stage.run(_cfg(workspace))
    winrates = json.loads((workspace / "outputs/judgments/winrates.json").read_text())
    vs_chosen = winrates["dpo_spo_s0_vs_chosen"]
    assert vs_chosen["not_judged"] == 7 and vs_chosen["invalid"] == 1 and vs_chosen["n"] == 2
    assert winrates["dpo_spo_s0_vs_sft"]["not_judged"] == 5 and winrates["dpo_spo_s0_vs_sft"]["win_rate"] is None
    assert (workspace / "outputs/judgments/winrates.png").is_file()
    assert (vs_chosen["not_judged_budget"], vs_chosen["not_judged_failed"]) == (7, 0)
    assert (workspace / "outputs/judgments/winrates.png").is_file()
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert any("budget stopped the run" in m and "12 of 15 items" in m for m in warnings)
    line = read_jsonl(workspace / "outputs/judgments/dpo_spo_s0_vs_chosen.jsonl")[3]
    assert line["outcome"] == "not_judged" and line["ab"]["winner"] == "A"
    assert line["ba"] == {"not_judged": "budget", "detail": "budget: max_calls=7 reached", "attempts": 0,
                          "budget": True}


def test_items_the_judge_fails_on_do_not_stop_the_others(workspace: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Issue 21: one unlucky item used to fail the whole stage, and the comparisons after it never
    started. Now every item and comparison is judged, the failed ones are written with their reason,
    and the stage then fails in one line saying how many are left (a rerun asks only for those)."""
    fake = LongerWins(fails_on=("question 2?", "question 4?"))
    monkeypatch.setattr(judge_stage, "make_judge", lambda cfg: (fake, None))
    caplog.set_level(logging.INFO, logger="spo.judge")
    cfg = _cfg(workspace)
    with pytest.raises(StageFailed) as caught:
        judge_stage.run(cfg)
    message = str(caught.value)
    assert message.startswith("judge: 4 of 15 items not judged after 6 attempts (HTTP 429: 8): rerun to retry only "
                              "those"), message
    assert "judge.max_unjudged_fraction 0.0" in message and "\n" not in message
    winrates = json.loads((workspace / "outputs/judgments/winrates.json").read_text())
    assert json.loads((workspace / "metrics/judge.json").read_text()) == winrates
    for name, n in (("dpo_spo_s0_vs_chosen", 7), ("dpo_spo_s0_vs_sft", 2)):  # both judged the rest (h0: invalid)
        stats = winrates[name]
        assert (stats["not_judged_failed"], stats["not_judged_budget"], stats["n"]) == (2, 0, n)
        assert stats["not_judged_reasons"] == {"HTTP 429": 4}
    lines = {r["id"]: r for r in read_jsonl(workspace / "outputs/judgments/dpo_spo_s0_vs_chosen.jsonl")}
    assert lines["h2"]["outcome"] == "not_judged" and lines["h2"]["ab"]["not_judged"] == "HTTP 429"
    assert lines["h2"]["ab"]["attempts"] == 6 and "Rate limit" in lines["h2"]["ab"]["detail"]

    cfg.judge.max_unjudged_fraction = 0.3  # a small share accepted: the stage ends normally, and says so
    caplog.clear()
    summary = judge_stage.run(cfg)
    assert summary["not_judged"] == 4
    assert any(r.levelno == logging.WARNING and r.getMessage().startswith("judge: 4 of 15 items not judged")
               for r in caplog.records)


def test_rows_are_read_only_until_the_needed_ids_are_found(workspace: Path) -> None:
    rows_dir = workspace / "data/validated"
    (rows_dir / "train.jsonl").write_text("not json\n")  # would raise if it were read
    rows, files = load_rows(rows_dir, {"h0", "t3"})
    assert files == [rows_dir / "test.jsonl"] and "h0" in rows


def test_a_missing_key_or_an_unreachable_endpoint_is_a_message_and_exit_2(
        workspace: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Found by a new user: both ended in a traceback."""
    import socket

    import yaml

    from spo.cli import main

    cfg = _cfg(workspace)
    cfg.judge.backend = "openai"
    cfg.judge.openai.api_key_env = "SPO_TEST_JUDGE_KEY"
    held = socket.socket()  # bound, never listening: refused, and no other process can take the port
    held.bind(("127.0.0.1", 0))
    try:
        cfg.judge.openai.base_url = f"http://127.0.0.1:{held.getsockname()[1]}/v1"
        cfg.judge.openai.retry.max_retries = 1
        cfg.judge.openai.retry.initial_backoff = 0.01
        params = workspace / "params.yaml"
        params.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True)))
        monkeypatch.delenv("SPO_TEST_JUDGE_KEY", raising=False)
        assert main(["judge", "-p", str(params)]) == 2
        assert "environment variable SPO_TEST_JUDGE_KEY, which is unset or empty" in caplog.text
        caplog.clear()
        monkeypatch.setenv("SPO_TEST_JUDGE_KEY", "sk-test-not-a-real-key")
        assert main(["judge", "-p", str(params)]) == 2
    finally:
        held.close()
    assert "giving up after 2 attempts" in caplog.text and "sk-test-not-a-real-key" not in caplog.text
