"""The OpenAI-compatible judge against a scripted loopback server (no network beyond 127.0.0.1)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from judge_server import (JudgeServer, Reply, echo_key_401, garbage, prefers_position_a, rate_limited,
                          server_error, slow, verdict)
from spo.config import BudgetConfig, OpenAIJudgeConfig, RetryConfig
from spo.judging import prompts
from spo.judging.base import Judge, JudgeRequest, Verdict
from spo.judging.cache import JudgeCache
from spo.judging.openai_judge import JudgeAPIError, JudgeConfigError, OpenAIJudge

SECRET = "sk-test-SECRET123"
KEY_ENV = "SPO_TEST_JUDGE_KEY"


@pytest.fixture
def server():
    srv = JudgeServer().start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def make_cfg(server: JudgeServer, **kw) -> OpenAIJudgeConfig:
    retry = kw.pop("retry", {})
    budget = kw.pop("budget", {})
    return OpenAIJudgeConfig(
        base_url=server.base_url, model="judge-test", api_key_env=KEY_ENV, concurrency=kw.pop("concurrency", 4),
        retry=RetryConfig(**{"max_retries": 3, "initial_backoff": 0.01, "max_backoff": 2.0, "timeout": 5.0, **retry}),
        budget=BudgetConfig(**budget), **kw,
    )


def make_judge(server, tmp_path: Path, cache_name: str = "cache.sqlite", **kw) -> OpenAIJudge:
    return OpenAIJudge(make_cfg(server, **kw), "v1", JudgeCache(tmp_path / cache_name))


def reqs(n: int, task: str = "dialogue") -> list[JudgeRequest]:
    return [JudgeRequest(f"\n\nHuman: question {i}?\n\nAssistant:", f"answer a{i}", f"answer b{i}", task) for i in range(n)]


# -- prompts -----------------------------------------------------------------------------------

def test_render_and_parse():
    text = prompts.render("v1", JudgeRequest("Q {response_b}", "first", "second", "dialogue"))
    assert text.startswith("For the following query to a chatbot, which response is more helpful?")
    assert "Q {response_b}" in text and text.index("first") < text.index("second")
    assert text.rstrip().endswith('More helpful: <"A" or "B">')
    summ = prompts.render("v1", JudgeRequest("post", "s1", "s2", "summarization"))
    assert "A good summary is both precise and concise." in summ and 'Preferred: <"A" or "B">' in summ
    p = prompts.parse_verdict
    assert p("dialogue", "Comparison: A is clearer.\nMore helpful: A") == ("A", "A is clearer.")
    assert p("dialogue", '**More helpful:** "b".')[0] == "B"
    assert p("dialogue", "more helpful: 'A'")[0] == "A"
    assert p("dialogue", "More helpful: **B**")[0] == "B"
    assert p("summarization", "Comparison: x\nPreferred: A!")[0] == "A"
    for bad in ("", "A", "More helpful: A and B", "More helpful: neither", "Preferred: A"):
        assert p("dialogue", bad)[0] is None, bad
    with pytest.raises(ValueError):
        prompts.render("v999", reqs(1)[0])


# -- happy path, key handling ---------------------------------------------------------------------

def test_judges_in_order_and_sends_key_only_as_authorization(server, tmp_path):
    server.default = lambda rec: verdict("B" if "answer a1" in rec.body["messages"][0]["content"] else "A")
    judge = make_judge(server, tmp_path)
    assert isinstance(judge, Judge)
    out = judge.judge_many(reqs(5), progress=False)
    assert [v.winner for v in out] == ["A", "B", "A", "A", "A"]
    assert all(not v.cached and v.prompt_tokens == 100 and v.completion_tokens == 20 for v in out)
    assert server.calls == 5
    for rec in server.requests:
        assert rec.path == "/v1/chat/completions"
        assert rec.headers["authorization"] == f"Bearer {SECRET}"
        others = {k: v for k, v in rec.headers.items() if k.lower() != "authorization"}
        assert SECRET not in repr(others) and SECRET.encode() not in rec.raw_body
        assert rec.body["model"] == "judge-test" and rec.body["temperature"] == 0.0
    assert judge.judge_id == f"openai:judge-test@{server.base_url.split('//')[1].split('/')[0]}"


def test_missing_env_var_names_the_variable(server, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeConfigError, match=KEY_ENV):
        make_judge(server, tmp_path)


def test_key_never_leaks(server, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    server.push(rate_limited(0.01), server_error(), garbage(), garbage())
    judge = make_judge(server, tmp_path)
    out = judge.judge_many(reqs(3), progress=True)
    assert judge.stats.retries == 2 and out[0] is not None
    server.default = echo_key_401
    with pytest.raises(JudgeAPIError) as info:
        judge.judge_many(reqs(1, "summarization"), progress=True)
    assert info.value.status_code == 401
    assert "***" in str(info.value) and SECRET not in str(info.value)
    assert SECRET not in repr(info.value.args) and SECRET not in repr(judge)
    captured = capsys.readouterr()
    assert SECRET not in caplog.text and SECRET not in captured.out and SECRET not in captured.err
    judge.cache.close()
    for f in tmp_path.iterdir():
        assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in repr(out)


def test_other_4xx_fails_clearly_without_retry(server, tmp_path):
    server.push(Reply(status=400, body={"error": {"message": "context too long"}}))
    judge = make_judge(server, tmp_path, concurrency=1)
    with pytest.raises(JudgeAPIError, match="HTTP 400.*context too long"):
        judge.judge_many(reqs(1), progress=False)
    assert server.calls == 1


# -- retries -----------------------------------------------------------------------------------

def test_retry_after_on_429_is_honoured(server, tmp_path):
    server.push(rate_limited(1))
    judge = make_judge(server, tmp_path, retry={"initial_backoff": 0.0})
    out = judge.judge_many(reqs(1), progress=False)
    assert out[0].winner == "A" and server.calls == 2 and judge.stats.retries == 1
    gap = server.requests[1].t - server.requests[0].t
    assert 0.95 <= gap < 2.0


def test_retry_after_capped_by_max_backoff(server, tmp_path):
    server.push(rate_limited(30))
    judge = make_judge(server, tmp_path, retry={"max_backoff": 0.2})
    t0 = time.monotonic()
    assert judge.judge_many(reqs(1), progress=False)[0].winner == "A"
    assert time.monotonic() - t0 < 2.0 and server.calls == 2


def test_retries_5xx_and_gives_up(server, tmp_path):
    server.push(server_error(500), server_error(503))
    judge = make_judge(server, tmp_path)
    assert judge.judge_many(reqs(1), progress=False)[0].winner == "A"
    assert server.calls == 3 and judge.stats.retries == 2
    server.default = server_error(502)
    judge2 = make_judge(server, tmp_path, cache_name="c2.sqlite", retry={"max_retries": 2})
    with pytest.raises(JudgeAPIError, match="giving up after 3 attempts"):
        judge2.judge_many(reqs(1), progress=False)
    assert server.calls == 3 + 3


def test_retries_on_timeout(server, tmp_path):
    server.push(slow(1.5))
    judge = make_judge(server, tmp_path, retry={"timeout": 0.5})
    t0 = time.monotonic()
    out = judge.judge_many(reqs(1), progress=False)
    assert out[0].winner == "A" and server.calls == 2 and judge.stats.retries == 1
    assert time.monotonic() - t0 < 3.0  # calls == 2 already proves the first one timed out


def test_garbage_is_retried_once_then_invalid(server, tmp_path):
    server.push(garbage("hmm"), verdict("B"))
    judge = make_judge(server, tmp_path, concurrency=1)
    v = judge.judge_many(reqs(1), progress=False)[0]
    assert v.winner == "B" and v.raw.startswith("hmm\n---\n") and server.calls == 2
    assert v.prompt_tokens == 200
    server.default = garbage("no idea")
    v2 = judge.judge_many(reqs(2)[1:], progress=False)[0]
    assert v2.winner is None and v2.raw == "no idea\n---\nno idea" and server.calls == 4
    assert judge.stats.invalid == 1
    # an invalid answer is not cached as final: a rerun asks again for it alone, and can recover it
    server.default = verdict("A")
    again = judge.judge_many(reqs(2), progress=False)
    assert again[0].cached and again[1].winner == "A" and not again[1].cached and server.calls == 5


# -- cache, budget, resumption --------------------------------------------------------------------

def test_cache_rerun_makes_no_call_and_order_matters(server, tmp_path):
    server.default = prefers_position_a
    judge = make_judge(server, tmp_path)
    batch = reqs(4)
    first = judge.judge_many(batch, progress=False)
    assert server.calls == 4 and all(v.winner == "A" for v in first)
    again = make_judge(server, tmp_path).judge_many(batch, progress=False)
    assert server.calls == 4 and all(v.cached for v in again)
    assert [(v.winner, v.raw) for v in again] == [(v.winner, v.raw) for v in first]
    swapped = [JudgeRequest(r.prompt, r.response_b, r.response_a, r.task) for r in batch]
    out = judge.judge_many(swapped, progress=False)
    assert server.calls == 8 and not any(v.cached for v in out)
    # duplicates within a batch are judged once, returned for each position
    dup = judge.judge_many([reqs(6)[5]] * 3, progress=False)
    assert server.calls == 9 and [v.winner for v in dup] == ["A"] * 3
    assert len(JudgeCache(tmp_path / "cache.sqlite")) == 9
    # another model is another cache entry
    other = OpenAIJudge(make_cfg(server).model_copy(update={"model": "other"}), "v1", JudgeCache(tmp_path / "cache.sqlite"))
    other.judge_many(batch[:1], progress=False)
    assert server.calls == 10


def test_budget_stops_cleanly(server, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    judge = make_judge(server, tmp_path, concurrency=4, budget={"max_calls": 3})
    out = judge.judge_many(reqs(10), progress=False)
    assert server.calls == 3
    assert sum(v is not None for v in out) == 3 and sum(v is None for v in out) == 7
    assert judge.stopped_reason and "max_calls=3" in judge.stopped_reason
    assert len(JudgeCache(tmp_path / "cache.sqlite")) == 3
    assert "3 calls" in caplog.text and "stopped" in caplog.text


def test_token_and_cost_budgets(server, tmp_path):
    judge = make_judge(server, tmp_path, concurrency=1, budget={"max_tokens": 250})  # 120 per call
    out = judge.judge_many(reqs(5), progress=False)
    assert server.calls == 3 and sum(v is None for v in out) == 2 and "max_tokens" in judge.stopped_reason
    judge2 = make_judge(server, tmp_path, cache_name="c2.sqlite", concurrency=1,
                        budget={"max_cost_usd": 0.001, "usd_per_1k_prompt_tokens": 5.0, "usd_per_1k_completion_tokens": 0.0})
    out2 = judge2.judge_many(reqs(5), progress=False)  # 0.5 $ per call: one call then stop
    assert server.calls == 4 and out2[0] is not None and out2[1:] == [None] * 4 and "max_cost_usd" in judge2.stopped_reason


def test_resume_after_stop_judges_only_the_missing(server, tmp_path):
    batch = reqs(10)
    first = make_judge(server, tmp_path, budget={"max_calls": 4}).judge_many(batch, progress=False)
    assert server.calls == 4
    judged_first = [i for i, v in enumerate(first) if v is not None]
    second = make_judge(server, tmp_path).judge_many(batch, progress=False)
    assert server.calls == 10 and all(isinstance(v, Verdict) for v in second)
    assert [i for i, v in enumerate(second) if v.cached] == judged_first


# -- concurrency -------------------------------------------------------------------------------

def test_concurrency_is_parallel(server, tmp_path):
    server.default = slow(0.5)
    judge = make_judge(server, tmp_path, concurrency=8)
    t0 = time.monotonic()
    out = judge.judge_many(reqs(8), progress=False)
    elapsed = time.monotonic() - t0
    assert all(v.winner == "A" for v in out)
    assert elapsed < 2.5, elapsed  # serial would take 4 s
    assert server.max_in_flight == 8
