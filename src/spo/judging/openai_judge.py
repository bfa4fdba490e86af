"""A GPT-4-class judge behind any OpenAI-compatible endpoint, careful with a paid API.

* **The key** is read only from the environment variable named by ``cfg.api_key_env``; it is sent
  only as the Authorization header (by the ``openai`` client) and scrubbed ("***") from every
  message we log or raise.
* **Retries.** The client's own retries are off (``max_retries=0``): we retry 429, 408, 5xx,
  timeouts and connection errors with exponential backoff and full jitter, honouring
  ``Retry-After`` (capped at max_backoff).  On 429s the number of calls in flight is halved and
  regained one by one (:class:`~spo.judging.throttle.AdaptiveLimit`), and a Retry-After pauses
  every new call, so sustained rate limiting slows the client down instead of spending every
  item's retries at full concurrency.
* **One item never stops the others.** A request that exhausts its retries, or that the endpoint
  refuses alone (HTTP 400, 413, 422: e.g. a context too long), comes back as a
  :class:`~spo.judging.base.NotJudged` with its reason; the other requests are judged.  Refusals
  that concern every request (401, 403, 404, any other 4xx, a 429 for an exhausted quota) raise
  :class:`JudgeAPIError` once in-flight calls are done.
* **Fail fast.** The first ``fail_fast_after`` new requests are judged before any other; from then
  on, when more than ``fail_fast_fraction`` of the new requests ended without a verdict (an answer
  with none, a refusal, retries exhausted), the judge stops asking and raises
  :class:`JudgeCannotJudge` naming the judge, the prompt version and one example: a judge that
  cannot judge costs those requests, not the whole run.
* **Never pay twice, never lose a paid answer.** Every answer is cached the moment it arrives —
  one without a verdict too (asked once more with the same prompt first, then recorded as invalid,
  ``winner=None``, both texts in ``raw``): a rerun reuses it unless ``cfg.retry_invalid``
  (``spo judge --retry-invalid``).  Invalid answers count in the cost and the budget like any other.
* **The budget** (calls, tokens, estimated cost) is checked before every HTTP call, retries
  included.  When spent, the run stops cleanly: in-flight calls finish and are cached, the
  remaining requests come back as ``NotJudged(budget=True)`` and ``stopped_reason`` says why.
  Token and cost limits can be overshot by the calls in flight (at most ``concurrency``); the call
  limit is exact.
* **Quiet logs.** The HTTP client's one line per request goes to DEBUG; retries are counted, logged
  at DEBUG, and summed up in one line per batch and one when the judge is closed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from urllib.parse import urlparse

import openai
from tqdm.auto import tqdm

from spo.config import OpenAIJudgeConfig
from spo.errors import BudgetExhausted, JudgeAPIError, JudgeCannotJudge, JudgeConfigError, StageFailed
from spo.judging import prompts
from spo.judging.base import JudgeRequest, NotJudged, Verdict
from spo.judging.cache import JudgeCache, cache_key
from spo.judging.throttle import AdaptiveLimit

log = logging.getLogger(__name__)

ATTEMPT_SEPARATOR = "\n---\n"
ITEM_REFUSALS = frozenset({400, 413, 422})  # the endpoint refuses this one request (its size, its content)
RETRYABLE = frozenset({408, 429})  # and every 5xx
HTTP_CLIENT_LOGGERS = ("httpx2", "httpx")  # the openai client's HTTP layer logs every request at INFO
EXAMPLE_CHARS = 200
STOPPED = "stopped"  # the reason of a request never asked because the judge stopped first
NO_VERDICT = "answers without a verdict"


class _DemoteToDebug(logging.Filter):
    """The HTTP client's per-request INFO lines become DEBUG lines: shown only when DEBUG is on."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_http_client_logs() -> None:
    """Install :class:`_DemoteToDebug` on the HTTP client's loggers (once)."""
    for name in HTTP_CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DemoteToDebug) for f in logger.filters):
            logger.addFilter(_DemoteToDebug())


class _Retryable(Exception):
    def __init__(self, reason: str, message: str, retry_after: float | None = None,
                 status_code: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason  # short, for counting: "HTTP 429", "timed out", ...
        self.retry_after = retry_after
        self.status_code = status_code


class _Refused(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class _GaveUp(Exception):
    def __init__(self, reason: str, message: str, attempts: int) -> None:
        super().__init__(message)
        self.reason, self.message, self.attempts = reason, message, attempts


@dataclass
class JudgeStats:
    """One batch (``judge_many`` call), or the judge's lifetime (``OpenAIJudge.totals``)."""

    requests: int = 0
    unique: int = 0
    cached: int = 0
    cached_invalid: int = 0
    calls: int = 0
    retries: int = 0
    retry_reasons: Counter[str] = field(default_factory=Counter)
    invalid: int = 0
    not_judged: int = 0
    not_judged_reasons: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0


@dataclass
class _FailFast:
    """New requests that ended with an answer or without a verdict, over the judge's lifetime."""

    settled: int = 0
    without_verdict: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    example: str | None = None


def _retry_after_seconds(headers) -> float | None:  # noqa: ANN001 - httpx2 Headers
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue  # an HTTP date: fall back to our own backoff
        if seconds >= 0:
            return seconds
    return None


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in counter.most_common())


class OpenAIJudge:
    """``judge_many`` judges pairs concurrently, through the cache, within the budget.

    ``clock`` and ``sleep`` are the time source of the backoff and of Retry-After; tests pass a
    fake clock so that no assertion depends on how fast the machine is.
    """

    def __init__(self, cfg: OpenAIJudgeConfig, prompt_version: str, cache: JudgeCache, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = cfg
        self.prompt_version = prompt_version
        self.cache = cache
        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key:
            raise JudgeConfigError(
                f"the judge API key is read from the environment variable {cfg.api_key_env}, which is "
                f"unset or empty; export {cfg.api_key_env}=... (judge.openai.api_key_env names another variable; on "
                "a cluster it comes from the platform file's judge_api_key Secret, the chart's "
                "judge.apiKey.existingSecret: check that Secret exists in the run's namespace and has that key)"
            )
        self._secret = key
        host = urlparse(cfg.base_url).netloc if cfg.base_url else "api.openai.com"
        self.judge_id = f"openai:{cfg.model}@{host or cfg.base_url}"
        quiet_http_client_logs()
        self._client = openai.OpenAI(
            api_key=key, base_url=cfg.base_url, timeout=cfg.retry.timeout, max_retries=0
        )
        self._sleep = sleep
        self.limit = AdaptiveLimit(cfg.concurrency, clock=clock, sleep=sleep)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.stopped_reason: str | None = None
        # Budget usage over the judge's lifetime (all judge_many calls).
        self.calls_made = 0
        self.tokens_used = 0
        self.cost_usd = 0.0
        self.stats = JudgeStats()
        self.totals = JudgeStats()
        self._fail_fast = _FailFast()

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIJudge({self.judge_id!r}, prompt_version={self.prompt_version!r})"

    # -- secrets -----------------------------------------------------------------------------
    def _scrub(self, text: object) -> str:
        text = str(text)
        return text.replace(self._secret, "***") if self._secret else text

    # -- budget ------------------------------------------------------------------------------
    def _reserve_call(self) -> None:
        budget = self.cfg.budget
        with self._lock:
            if self._stop.is_set():
                raise BudgetExhausted(self.stopped_reason or "stopped")
            reason = None
            if budget.max_calls is not None and self.calls_made >= budget.max_calls:
                reason = f"budget: max_calls={budget.max_calls} reached"
            elif budget.max_tokens is not None and self.tokens_used >= budget.max_tokens:
                reason = f"budget: max_tokens={budget.max_tokens} reached ({self.tokens_used} used)"
            elif budget.max_cost_usd is not None and self.cost_usd >= budget.max_cost_usd:
                reason = f"budget: max_cost_usd={budget.max_cost_usd} reached (${self.cost_usd:.4f} spent)"
            if reason is not None:
                self.stopped_reason = reason
                self._stop.set()
                raise BudgetExhausted(reason)
            self.calls_made += 1
            self.stats.calls += 1

    def _account(self, prompt_tokens: int, completion_tokens: int) -> None:
        budget = self.cfg.budget
        cost = (prompt_tokens * budget.usd_per_1k_prompt_tokens
                + completion_tokens * budget.usd_per_1k_completion_tokens) / 1000.0
        with self._lock:
            self.tokens_used += prompt_tokens + completion_tokens
            self.cost_usd += cost
            self.stats.prompt_tokens += prompt_tokens
            self.stats.completion_tokens += completion_tokens
            self.stats.cost_usd += cost

    # -- one HTTP call -------------------------------------------------------------------------
    def _call_once(self, text: str) -> tuple[str, int, int]:
        try:
            completion = self._client.chat.completions.create(
                model=self.cfg.model,
                messages=[{"role": "user", "content": text}],
                temperature=self.cfg.temperature,
                max_tokens=self.cfg.max_tokens,
            )
        except openai.APITimeoutError:
            raise _Retryable("timed out", f"timed out after {self.cfg.retry.timeout}s") from None
        except openai.APIConnectionError as err:
            raise _Retryable("connection error", f"connection error: {self._scrub(err)}") from None
        except openai.APIStatusError as err:
            code = err.status_code
            message = f"HTTP {code}: {self._scrub(err.message)}"
            if code == 429 and getattr(err, "code", None) == "insufficient_quota":
                raise JudgeAPIError(f"judge endpoint {self.judge_id}: the account's quota is exhausted "
                                    f"(retrying cannot help): {message}", code) from None
            if code in RETRYABLE or code >= 500:
                raise _Retryable(f"HTTP {code}", message, _retry_after_seconds(err.response.headers), code) from None
            if code in ITEM_REFUSALS:
                raise _Refused(code, message) from None
            raise JudgeAPIError(f"judge endpoint {self.judge_id} refused the request: {message}", code) from None
        except openai.APIError as err:  # e.g. an invalid response body
            raise _Retryable("bad response", f"bad response: {self._scrub(err)}") from None
        usage = completion.usage
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0) if usage else 0
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0) if usage else 0
        self._account(prompt_tokens, completion_tokens)
        content = completion.choices[0].message.content if completion.choices else None
        return content or "", prompt_tokens, completion_tokens

    # -- one call with retries, within the adaptive limit -------------------------------------------
    def _call_with_retries(self, text: str) -> tuple[str, int, int, int]:
        """(content, prompt tokens, completion tokens, attempts); raises _GaveUp, _Refused, BudgetExhausted."""
        retry = self.cfg.retry
        attempts = 0
        while True:
            window = self.limit.acquire()
            try:
                self._reserve_call()  # raises BudgetExhausted
                attempts += 1
                result = self._call_once(text)
            except _Retryable as err:
                pause = None if err.retry_after is None else min(err.retry_after, retry.max_backoff)
                self.limit.release(window, throttled=err.status_code == 429, retry_after=pause)
                if attempts > retry.max_retries:
                    raise _GaveUp(err.reason, f"giving up after {attempts} attempts: {err}", attempts) from None
                if pause is not None:
                    delay = pause
                else:
                    delay = random.uniform(0.0, min(retry.max_backoff, retry.initial_backoff * (2 ** (attempts - 1))))
                with self._lock:
                    self.stats.retries += 1
                    self.stats.retry_reasons[err.reason] += 1
                log.debug("judge call failed (%s); retry %d/%d in %.2fs", err, attempts, retry.max_retries, delay)
                if not self._stop.is_set():  # a stopped run gives up at the next reservation
                    self._sleep(delay)
                continue
            except BaseException:
                self.limit.release(window)
                raise
            self.limit.release(window, ok=True)
            return (*result, attempts)

    # -- one judgment (≤ 2 asks) -------------------------------------------------------------------
    def _judge_one(self, task: str, text: str, key: str) -> Verdict | NotJudged:
        texts: list[str] = []
        prompt_tokens = completion_tokens = attempts = 0
        winner = explanation = None
        gave_up: NotJudged | None = None
        for _ in range(2):
            try:
                content, pt, ct, n = self._call_with_retries(text)
            except BudgetExhausted as err:
                gave_up = NotJudged("budget", str(err), attempts, budget=True)
                break
            except _GaveUp as err:
                gave_up = NotJudged(err.reason, f"judge endpoint {self.judge_id}: {err.message}",
                                    attempts + err.attempts)
                break
            except _Refused as err:
                gave_up = NotJudged(f"refused: HTTP {err.status_code}",
                                    f"judge endpoint {self.judge_id} refused the request: {err}", attempts + 1)
                break
            attempts += n
            texts.append(content)
            prompt_tokens += pt
            completion_tokens += ct
            winner, explanation = prompts.parse_verdict(task, content)
            if winner is not None:
                break
        if not texts:  # nothing paid for: a rerun asks again
            assert gave_up is not None
            return gave_up
        # An answer was paid for: it is kept, even without a verdict (asked once more first when possible).
        verdict = Verdict(winner=winner, raw=ATTEMPT_SEPARATOR.join(texts), explanation=explanation,
                          cached=False, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        self.cache.put(key, self.judge_id, self.prompt_version, verdict)
        return verdict

    # -- fail fast -----------------------------------------------------------------------------
    def _settle(self, outcome: Verdict | NotJudged, fresh_total: int) -> str | None:
        """Count one new request's outcome; the reason to stop, if the judge cannot judge."""
        if isinstance(outcome, NotJudged) and (outcome.budget or outcome.reason == STOPPED):
            return None  # the user's own limit, or never asked: nothing learnt about the judge
        ff = self._fail_fast
        with self._lock:
            ff.settled += 1
            if isinstance(outcome, Verdict):
                kind = None if outcome.winner is not None else NO_VERDICT
                example = outcome.raw
            else:
                kind, example = outcome.reason, outcome.detail
            if kind is not None:
                ff.without_verdict += 1
                ff.kinds[kind] += 1
                if ff.example is None:
                    ff.example = example
            needed = min(self.cfg.fail_fast_after, fresh_total)
            if ff.settled < needed or ff.without_verdict <= self.cfg.fail_fast_fraction * ff.settled:
                return None
            example_text = " ".join((ff.example or "").split())[:EXAMPLE_CHARS]
            hint = "Check the endpoint, the model and the prompt version"
            if ff.kinds[NO_VERDICT]:
                hint += "; `spo judge --retry-invalid` asks again for the cached answers without a verdict"
            return (
                f"judge {self.judge_id} with prompt version {self.prompt_version} cannot judge: {ff.without_verdict} "
                f"of the first {ff.settled} new requests ended without a verdict ({_counts(ff.kinds)}; "
                f"judge.openai.fail_fast_fraction {self.cfg.fail_fast_fraction}); stopped after {self.calls_made} "
                f"calls, the answers paid for are cached; e.g. {self._scrub(example_text)!r}. {hint}"
            )

    # -- the batch ---------------------------------------------------------------------------
    def judge_many(self, requests: Sequence[JudgeRequest], progress: bool = True) -> list[Verdict | NotJudged]:
        """Same order as ``requests``; a :class:`NotJudged` for each request the judge gave up on.

        Identical requests (same rendered prompt) are judged once.  Raises :class:`JudgeAPIError` on a
        refusal that concerns every request and :class:`JudgeCannotJudge` when too many requests end
        without a verdict (after in-flight calls finish; their answers are cached).
        """
        start = time.perf_counter()
        self.stats = JudgeStats(requests=len(requests))
        keyed: list[tuple[str, str, str]] = []  # (key, task, rendered)
        for request in requests:
            rendered = prompts.render(self.prompt_version, request)
            keyed.append((cache_key(self.judge_id, self.prompt_version, rendered), request.task, rendered))
        by_key: dict[str, Verdict | NotJudged] = {}
        todo: dict[str, tuple[str, str]] = {}
        for key, task, rendered in keyed:
            if key in by_key or key in todo:
                continue
            hit = self.cache.get(key)
            if hit is not None and (hit.winner is not None or not self.cfg.retry_invalid):
                by_key[key] = hit
                self.stats.cached += 1
                self.stats.cached_invalid += hit.winner is None
            else:
                todo[key] = (task, rendered)
        self.stats.unique = len(by_key) + len(todo)

        failure: StageFailed | None = None
        if todo:
            failure = self._run(todo, by_key, progress)

        results: list[Verdict | NotJudged] = []
        seen: set[str] = set()
        for key, _, _ in keyed:
            verdict = by_key.get(key) or NotJudged(STOPPED, "not asked: the judge stopped first")
            if isinstance(verdict, Verdict) and key in seen:
                verdict = dataclasses.replace(verdict)
            seen.add(key)
            results.append(verdict)
        self._finish_batch(results, start)
        if failure is not None:
            raise failure
        return results

    def _run(self, todo: dict[str, tuple[str, str]], by_key: dict[str, Verdict | NotJudged],
             progress: bool) -> StageFailed | None:
        """Judge ``todo`` into ``by_key``: the first ``fail_fast_after`` (while the judge is unproven) alone,
        then the rest; returns the error that stopped it, if any."""
        failure: StageFailed | None = None
        abort = threading.Event()
        items = list(todo.items())
        unproven = max(0, self.cfg.fail_fast_after - self._fail_fast.settled)
        phases = [items[:unproven], items[unproven:]] if unproven else [items]
        bar = tqdm(total=len(items), desc=f"judge {self.cfg.model}", unit="req", disable=not progress)
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="judge")
        try:
            for phase in phases:
                if abort.is_set() or not phase:
                    continue
                futures: dict[Future[Verdict | NotJudged], str] = {
                    pool.submit(self._judge_unless, abort, key, task, rendered): key for key, (task, rendered) in phase
                }
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        key = futures[future]
                        bar.update(1)
                        try:
                            outcome = future.result()
                        except JudgeAPIError as err:
                            if failure is None:
                                failure = err
                                abort.set()
                            continue
                        by_key[key] = outcome
                        stop = self._settle(outcome, len(items))
                        if stop is not None and failure is None:
                            failure = JudgeCannotJudge(stop)
                            abort.set()
                        bar.set_postfix(in_flight_limit=self.limit.limit, retries=self.stats.retries, refresh=False)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return failure

    def _judge_unless(self, abort: threading.Event, key: str, task: str, rendered: str) -> Verdict | NotJudged:
        if abort.is_set():
            return NotJudged(STOPPED, "not asked: the judge stopped first")
        try:
            return self._judge_one(task, rendered, key)
        except JudgeAPIError:
            abort.set()  # here, not when the main thread gets to it: no worker starts another request
            raise

    def _finish_batch(self, results: list[Verdict | NotJudged], start: float) -> None:
        s = self.stats
        s.invalid = sum(1 for v in results if isinstance(v, Verdict) and v.winner is None)
        missing = [v for v in results if isinstance(v, NotJudged)]
        s.not_judged = len(missing)
        s.not_judged_reasons = Counter(v.reason for v in missing)
        s.seconds = time.perf_counter() - start
        t = self.totals
        for name in ("requests", "unique", "cached", "cached_invalid", "calls", "retries", "invalid", "not_judged",
                     "prompt_tokens", "completion_tokens", "cost_usd", "seconds"):
            setattr(t, name, getattr(t, name) + getattr(s, name))
        t.retry_reasons.update(s.retry_reasons)
        t.not_judged_reasons.update(s.not_judged_reasons)
        if s.cached_invalid:
            log.info("judge %s: %d cached answers without a verdict reused (paid once); `spo judge --retry-invalid` "
                     "asks again for them", self.judge_id, s.cached_invalid)
        log.debug("judge %s: %s", self.judge_id, self.describe(s))

    def describe(self, s: JudgeStats) -> str:
        """One line: requests, calls, cache, retries, outcomes, tokens and cost."""
        parts = [f"{s.requests} requests ({s.unique} unique, {s.cached} cached)", f"{s.calls} calls"]
        if s.retries:
            parts.append(f"{s.retries} retries ({_counts(s.retry_reasons)})")
        if self.limit.decreases:
            parts.append(f"in flight lowered {self.limit.decreases}x on 429s (to {self.limit.lowest} at least, "
                         f"{self.limit.limit} now, of {self.limit.ceiling})")
        parts.append(f"{s.invalid} invalid")
        if s.not_judged:
            parts.append(f"{s.not_judged} not judged ({_counts(s.not_judged_reasons)})")
        parts.append(f"tokens {s.prompt_tokens}+{s.completion_tokens}, est. cost ${s.cost_usd:.4f}, {s.seconds:.1f}s")
        if self.stopped_reason:
            parts.append(f"stopped: {self.stopped_reason}")
        return ", ".join(parts)

    def close(self) -> None:
        """Close the HTTP client and the cache; log the judge's totals in one line."""
        log.info("judge %s: %s", self.judge_id, self.describe(self.totals))
        self._client.close()
        self.cache.close()
