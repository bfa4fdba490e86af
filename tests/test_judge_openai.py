"""The OpenAI-compatible judge against a scripted loopback server (no network beyond 127.0.0.1).

No assertion here depends on how fast the machine is: the judge's backoffs and Retry-After
pauses run on a :class:`~fake_clock.FakeClock` (recorded, not waited for), a timeout is a
reply that hangs until the client gives up, and parallelism is shown with a barrier that only
opens when every call is in flight at once.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from fake_clock import FakeClock
from judge_server import (
    JudgeServer,
    Reply,
    echo_key_401,
    garbage,
    hang,
    prefers_position_a,
    quota_exhausted,
    rate_limited,
    server_error,
    verdict,
)

from spo.config import BudgetConfig, OpenAIJudgeConfig, RetryConfig
from spo.errors import JudgeAPIError, JudgeCannotJudge, JudgeConfigError
from spo.judging import prompts
from spo.judging.base import Judge, JudgeRequest, NotJudged, Verdict
from spo.judging.cache import JudgeCache
from spo.judging.openai_judge import OpenAIJudge
from spo.judging.throttle import AdaptiveLimit

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
        retry=RetryConfig(**{"max_retries": 3, "initial_backoff": 0.01, "max_backoff": 2.0, "timeout": 30.0, **retry}),
        budget=BudgetConfig(**budget), **kw,
    )


def make_judge(server, tmp_path: Path, cache_name: str = "cache.sqlite", clock: FakeClock | None = None,
               **kw) -> OpenAIJudge:
    clock = FakeClock() if clock is None else clock
    return OpenAIJudge(make_cfg(server, **kw), "v1", JudgeCache(tmp_path / cache_name), clock=clock,
                       sleep=clock.sleep)


def reqs(n: int, task: str = "dialogue") -> list[JudgeRequest]:
    return [JudgeRequest(f"\n\nHuman: question {i}?\n\nAssistant:", f"answer a{i}", f"answer b{i}", task)
            for i in range(n)]


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


def test_a_refusal_of_one_request_is_not_retried_and_stops_nothing_else(server, tmp_path):
    """HTTP 400 (e.g. a context too long) concerns that request alone: not retried, recorded with its
    reason, the others judged; nothing was paid for, so nothing is cached for it."""
    server.push(Reply(status=400, body={"error": {"message": "context too long"}}))
    judge = make_judge(server, tmp_path, concurrency=1)
    out = judge.judge_many(reqs(3), progress=False)
    assert isinstance(out[0], NotJudged) and out[0].reason == "refused: HTTP 400" and out[0].attempts == 1
    assert "context too long" in out[0].detail and not out[0].budget
    assert [v.winner for v in out[1:]] == ["A", "A"] and server.calls == 3
    assert len(JudgeCache(tmp_path / "cache.sqlite")) == 2


@pytest.mark.parametrize(("reply", "expected"), [
    (Reply(status=404, body={"error": {"message": "The model `judge-test` does not exist"}}), "HTTP 404"),
    (quota_exhausted(), "quota is exhausted"),
])
def test_a_refusal_of_every_request_fails_clearly_without_retry(server, tmp_path, reply, expected):
    """A wrong model (404) or an account out of credit (429 insufficient_quota) would refuse every
    request: the judge stops at once instead of asking for each item, and says why."""
    server.push(reply)
    judge = make_judge(server, tmp_path, concurrency=1)
    with pytest.raises(JudgeAPIError, match=expected):
        judge.judge_many(reqs(3), progress=False)
    assert server.calls == 1


# -- retries -----------------------------------------------------------------------------------

def test_retry_after_on_429_is_honoured(server, tmp_path):
    server.push(rate_limited(1))
    clock = FakeClock()
    judge = make_judge(server, tmp_path, clock=clock, retry={"initial_backoff": 0.0})
    out = judge.judge_many(reqs(1), progress=False)
    assert out[0].winner == "A" and server.calls == 2 and judge.stats.retries == 1
    assert clock.sleeps == [1.0]  # Retry-After, not the (zero) backoff


def test_retry_after_capped_by_max_backoff(server, tmp_path):
    server.push(rate_limited(30))
    clock = FakeClock()
    judge = make_judge(server, tmp_path, clock=clock, retry={"max_backoff": 0.2})
    assert judge.judge_many(reqs(1), progress=False)[0].winner == "A"
    assert server.calls == 2 and clock.sleeps == [0.2]


def test_backoff_doubles_with_full_jitter_up_to_max_backoff(server, tmp_path):
    server.push(*[server_error(503)] * 5)
    clock = FakeClock()
    judge = make_judge(server, tmp_path, clock=clock, concurrency=1,
                       retry={"max_retries": 5, "initial_backoff": 1.0, "max_backoff": 4.0})
    assert judge.judge_many(reqs(1), progress=False)[0].winner == "A"
    assert len(clock.sleeps) == 5 and server.calls == 6
    for attempt, delay in enumerate(clock.sleeps):
        assert 0.0 <= delay <= min(4.0, 2.0**attempt)


def test_retries_5xx_and_gives_up_on_that_item_alone(server, tmp_path):
    server.push(server_error(500), server_error(503))
    judge = make_judge(server, tmp_path)
    assert judge.judge_many(reqs(1), progress=False)[0].winner == "A"
    assert server.calls == 3 and judge.stats.retries == 2
    assert judge.stats.retry_reasons == {"HTTP 500": 1, "HTTP 503": 1}

    # question 1 always fails: it is given up after 3 attempts, the other two are judged, nothing raises
    server.default = lambda rec: (server_error(502) if "question 1?" in rec.body["messages"][0]["content"]
                                  else verdict("B"))
    judge2 = make_judge(server, tmp_path, cache_name="c2.sqlite", concurrency=1, retry={"max_retries": 2})
    out = judge2.judge_many(reqs(3), progress=False)
    assert [getattr(v, "winner", None) for v in out] == ["B", None, "B"]
    assert isinstance(out[1], NotJudged) and (out[1].reason, out[1].attempts) == ("HTTP 502", 3)
    assert "giving up after 3 attempts: HTTP 502" in out[1].detail and judge2.judge_id in out[1].detail
    assert server.calls == 3 + 5 and judge2.stats.not_judged == 1
    # a rerun asks only for the one left, and gets it once the endpoint is healthy
    server.default = verdict("A")
    again = make_judge(server, tmp_path, cache_name="c2.sqlite").judge_many(reqs(3), progress=False)
    assert [v.winner for v in again] == ["B", "A", "B"] and [v.cached for v in again] == [True, False, True]
    assert server.calls == 9


def test_retries_on_timeout(server, tmp_path):
    """The first reply hangs until the server stops, so the client's timeout ends that call whatever
    the load; the retry is judged."""
    server.push(hang())
    judge = make_judge(server, tmp_path, retry={"timeout": 3.0, "max_retries": 5})  # 3 s: only a hang outlasts it
    out = judge.judge_many(reqs(1), progress=False)
    assert out[0].winner == "A" and judge.stats.retries == server.calls - 1 >= 1
    assert judge.stats.retry_reasons["timed out"] >= 1
    assert server.wait_idle()  # the hanging reply ends once the client has given up ...
    assert server.requests[0].client_gone and server.served_after_client_gave_up >= 1  # ... and is counted as such


def test_garbage_is_asked_once_more_then_invalid_and_paid_once(server, tmp_path):
    server.push(garbage("hmm"), verdict("B"))
    judge = make_judge(server, tmp_path, concurrency=1)
    v = judge.judge_many(reqs(1), progress=False)[0]
    assert v.winner == "B" and v.raw.startswith("hmm\n---\n") and server.calls == 2
    assert v.prompt_tokens == 200
    server.default = garbage("no idea")
    v2 = judge.judge_many(reqs(2)[1:], progress=False)[0]
    assert v2.winner is None and v2.raw == "no idea\n---\nno idea" and server.calls == 4
    assert judge.stats.invalid == 1
    assert judge.tokens_used == 4 * 120  # the invalid answers count in the budget like any other
    # an invalid answer was paid for: it is cached, and a rerun does not pay for it again ...
    server.default = verdict("A")
    again = make_judge(server, tmp_path).judge_many(reqs(2), progress=False)
    assert again[1].winner is None and again[1].cached and server.calls == 4
    # ... unless asked to (spo judge --retry-invalid), which recovers it
    retried = make_judge(server, tmp_path, retry_invalid=True).judge_many(reqs(2), progress=False)
    assert retried[0].cached and retried[1].winner == "A" and not retried[1].cached and server.calls == 5
    assert make_judge(server, tmp_path).judge_many(reqs(2), progress=False)[1].winner == "A"  # the new answer is kept


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
    other = OpenAIJudge(make_cfg(server).model_copy(update={"model": "other"}), "v1",
                        JudgeCache(tmp_path / "cache.sqlite"))
    other.judge_many(batch[:1], progress=False)
    assert server.calls == 10


def budget_stopped(v: Verdict | NotJudged) -> bool:
    return isinstance(v, NotJudged) and v.budget


def test_budget_stops_cleanly(server, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    judge = make_judge(server, tmp_path, concurrency=4, budget={"max_calls": 3})
    out = judge.judge_many(reqs(10), progress=False)
    assert server.calls == 3
    assert sum(isinstance(v, Verdict) for v in out) == 3 and sum(budget_stopped(v) for v in out) == 7
    assert judge.stopped_reason and "max_calls=3" in judge.stopped_reason
    assert len(JudgeCache(tmp_path / "cache.sqlite")) == 3
    judge.close()
    assert "3 calls" in caplog.text and "stopped: budget: max_calls=3" in caplog.text


def test_token_and_cost_budgets(server, tmp_path):
    judge = make_judge(server, tmp_path, concurrency=1, budget={"max_tokens": 250})  # 120 per call
    out = judge.judge_many(reqs(5), progress=False)
    assert server.calls == 3 and sum(budget_stopped(v) for v in out) == 2 and "max_tokens" in judge.stopped_reason
    judge2 = make_judge(server, tmp_path, cache_name="c2.sqlite", concurrency=1,
                        budget={"max_cost_usd": 0.001, "usd_per_1k_prompt_tokens": 5.0,
                                "usd_per_1k_completion_tokens": 0.0})
    out2 = judge2.judge_many(reqs(5), progress=False)  # 0.5 $ per call: one call then stop
    assert server.calls == 4 and isinstance(out2[0], Verdict) and all(budget_stopped(v) for v in out2[1:])
    assert "max_cost_usd" in judge2.stopped_reason


def test_resume_after_stop_judges_only_the_missing(server, tmp_path):
    batch = reqs(10)
    first = make_judge(server, tmp_path, budget={"max_calls": 4}).judge_many(batch, progress=False)
    assert server.calls == 4
    judged_first = [i for i, v in enumerate(first) if isinstance(v, Verdict)]
    second = make_judge(server, tmp_path).judge_many(batch, progress=False)
    assert server.calls == 10 and all(isinstance(v, Verdict) for v in second)
    assert [i for i, v in enumerate(second) if v.cached] == judged_first


# -- concurrency -------------------------------------------------------------------------------

def test_concurrency_is_parallel(server, tmp_path):
    """Every reply waits at a barrier that opens only when all 8 calls are in flight at once: a
    client that sent them one after another would break it (and get 500s) instead."""
    gate = threading.Barrier(8, timeout=120)  # a hang guard: opens at once when the client is parallel

    def together(record) -> Reply:  # noqa: ANN001
        try:
            gate.wait()
        except threading.BrokenBarrierError:
            return server_error(500)
        return verdict("A")

    server.default = together
    judge = make_judge(server, tmp_path, concurrency=8, retry={"max_retries": 0})
    out = judge.judge_many(reqs(8), progress=False)
    assert all(isinstance(v, Verdict) and v.winner == "A" for v in out)
    assert server.max_in_flight == 8 and server.calls == 8


# -- sustained rate limits: fewer calls in flight, Retry-After for everyone -------------------------------

def test_adaptive_limit_halves_once_per_window_and_regains_one_by_one():
    clock = FakeClock()
    limit = AdaptiveLimit(8, clock=clock, sleep=clock.sleep)
    windows = [limit.acquire() for _ in range(8)]
    assert windows == [0] * 8 and limit.limit == 8
    limit.release(windows[0], throttled=True)
    assert limit.limit == 4  # halved
    for w in windows[1:4]:  # 429s of calls sent before the decrease: already answered by it
        limit.release(w, throttled=True)
    assert (limit.limit, limit.decreases) == (4, 1)
    for w in windows[4:]:
        limit.release(w)  # other failures say nothing about capacity
    w = limit.acquire()
    limit.release(w, throttled=True)
    assert (limit.limit, limit.lowest, limit.decreases) == (2, 2, 2)
    for _ in range(2):  # after `limit` successes in a row: one more
        limit.release(limit.acquire(), ok=True)
    assert limit.limit == 3
    for _ in range(3 + 4 + 5 + 6 + 7 + 8):
        limit.release(limit.acquire(), ok=True)
    assert limit.limit == 8  # never above the configured concurrency
    with pytest.raises(ValueError):
        AdaptiveLimit(0)


def test_adaptive_limit_blocks_at_the_limit_and_honours_retry_after_for_every_call():
    clock = FakeClock()
    limit = AdaptiveLimit(2, clock=clock, sleep=clock.sleep)
    first, second = limit.acquire(), limit.acquire()
    third_in = threading.Event()
    waiter = threading.Thread(target=lambda: (limit.acquire(), third_in.set()))
    waiter.start()
    assert not third_in.wait(0.2)  # two in flight: the third waits (a missing wait would set it at once)
    limit.release(first, throttled=True, retry_after=5.0)  # limit 1, and a pause of 5 s for everyone
    assert limit.limit == 1 and not third_in.is_set()  # one still in flight: at the new limit
    # (both checks of third_in are one-sided: they never fail a correct limit, however slow the machine)
    limit.release(second)
    waiter.join(timeout=60)
    assert third_in.is_set() and clock.sleeps == [5.0]  # it waited out the endpoint's pause, not its own


def test_sustained_429s_lower_the_calls_in_flight(server, tmp_path):
    """The first 8 calls answer 429 with Retry-After 1 s: the judge lowers its limit, pauses every
    call for the endpoint's second, judges every item, and regains its limit as calls succeed.

    Which items get the 429s depends on the order the server receives the calls in: on a busy
    machine one item's retries could meet four of them in a row.  8 retries per item let every
    item outlast all 8, whatever the order (a stressed run of the suite gave one item up with 3)."""
    server.push(*[rate_limited(1)] * 8)
    clock = FakeClock()
    judge = make_judge(server, tmp_path, clock=clock, concurrency=8, retry={"max_retries": 8})
    out = judge.judge_many(reqs(40), progress=False)
    assert all(isinstance(v, Verdict) for v in out)
    assert judge.stats.retries == 8 and server.calls == 48
    # halved at the first 429 (and again only for 429s of calls sent after that: the workers start
    # one after another, so some of the first 8 may be sent at 4 already)
    assert judge.limit.decreases >= 1 and judge.limit.lowest <= 4
    assert clock.sleeps and max(clock.sleeps) == pytest.approx(1.0)
    assert judge.limit.limit > judge.limit.lowest  # regained one by one as the 40 calls succeeded


# -- a judge that cannot judge fails fast --------------------------------------------------------------

def test_a_judge_that_never_gives_a_verdict_fails_fast(server, tmp_path):
    """Issue 21: every answer lacked a verdict, and the stage paid for every item twice and exited 0.
    Now the first 20 requests are judged alone; all without a verdict, the judge stops, names itself,
    the prompt version and an example, having paid for those 20 (asked twice each) and no more."""
    server.default = garbage("As an AI, I think both answers have merit.")
    judge = make_judge(server, tmp_path, concurrency=4)
    with pytest.raises(JudgeCannotJudge) as caught:
        judge.judge_many(reqs(60), progress=False)
    message = str(caught.value)
    assert server.calls == 40 and judge.calls_made == 40
    assert judge.judge_id in message and "prompt version v1" in message and "both answers have merit" in message
    assert "20 of the first 20 new requests ended without a verdict" in message and "--retry-invalid" in message
    assert "\n" not in message and SECRET not in message
    assert len(JudgeCache(tmp_path / "cache.sqlite")) == 20  # paid for: kept, never paid again
    # a rerun against the same broken judge pays for no answer twice (20 new ones, then stops again)
    with pytest.raises(JudgeCannotJudge):
        make_judge(server, tmp_path, concurrency=4).judge_many(reqs(60), progress=False)
    assert server.calls == 80


def test_an_unreachable_endpoint_fails_fast_not_item_by_item(tmp_path):
    """Nothing listens: the first 20 requests exhaust their retries, then the judge stops (it does
    not try the other 80 items, each with its retries and backoff)."""
    import socket

    with socket.socket() as held:  # bound, never listening: refused, and no other process can take the port
        held.bind(("127.0.0.1", 0))
        dead = SimpleNamespace(base_url=f"http://127.0.0.1:{held.getsockname()[1]}/v1")
        clock = FakeClock()
        judge = OpenAIJudge(make_cfg(dead, retry={"max_retries": 1}), "v1", JudgeCache(tmp_path / "c.sqlite"),
                            clock=clock, sleep=clock.sleep)
        with pytest.raises(JudgeCannotJudge, match="connection error: 20") as caught:
            judge.judge_many(reqs(100), progress=False)
    assert judge.calls_made == 40 and "giving up after 2 attempts: connection error" in str(caught.value)


def test_a_moderate_share_of_invalid_answers_does_not_stop_the_judge(server, tmp_path):
    def question(rec) -> int:
        return int(rec.body["messages"][0]["content"].split("question ")[1].split("?")[0])

    server.default = lambda rec: garbage() if question(rec) % 3 == 0 else verdict("A")
    judge = make_judge(server, tmp_path, concurrency=4)
    out = judge.judge_many(reqs(30), progress=False)
    assert sum(v.winner is None for v in out) == 10 and judge.stats.invalid == 10


# -- quiet logs ------------------------------------------------------------------------------------

def test_the_http_clients_per_request_lines_are_debug_only(server, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    judge = make_judge(server, tmp_path)
    judge.judge_many(reqs(3), progress=False)
    assert not [r for r in caplog.records if "HTTP Request" in r.getMessage()]
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    judge.judge_many(reqs(5)[3:], progress=False)
    lines = [r for r in caplog.records if r.name == "httpx2" and r.getMessage().startswith("HTTP Request: POST")]
    assert len(lines) == 2 and {r.levelname for r in lines} == {"DEBUG"}
