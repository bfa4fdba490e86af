"""A GPT-4-class judge behind any OpenAI-compatible endpoint.

* The key is read only from the environment variable named by ``cfg.api_key_env``; it is sent only as
  the Authorization header (by the ``openai`` client) and scrubbed ("***") from every message we log
  or raise.
* The client's own retries are off (``max_retries=0``): we retry 429, 5xx, timeouts and connection
  errors with exponential backoff and full jitter, honouring ``Retry-After`` (capped at max_backoff).
  Other 4xx fail the request: :class:`JudgeAPIError` is raised from ``judge_many`` once in-flight
  calls are done (everything judged so far is already cached).
* An unparseable verdict is asked once more with the same prompt, then recorded as invalid
  (``winner=None``, both texts in ``raw``), with a warning, and not cached: a rerun asks again
  for it (and only for it), so it can still be recovered.
* The budget (calls, tokens, estimated cost) is checked before every HTTP call, retries included.
  When spent, the run stops cleanly: in-flight calls finish and are cached, the remaining requests
  come back as ``None`` and ``stopped_reason`` says why.  Token and cost limits can be overshot by
  the calls in flight when they are reached (at most ``concurrency`` calls); the call limit is exact.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from urllib.parse import urlparse

import openai
from tqdm.auto import tqdm

from spo.config import OpenAIJudgeConfig
from spo.errors import StageFailed
from spo.io import InputError
from spo.judging import prompts
from spo.judging.base import BudgetExhausted, JudgeRequest, Verdict
from spo.judging.cache import JudgeCache, cache_key

log = logging.getLogger(__name__)

ATTEMPT_SEPARATOR = "\n---\n"


class JudgeConfigError(InputError):
    """The judge cannot be set up (e.g. the API key variable is unset): the CLI says so and exits 2."""


class JudgeAPIError(StageFailed):
    """A judge request failed for good (a 4xx other than 429, or retries exhausted). Key-free message."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None, status_code: int | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status_code = status_code


@dataclass
class JudgeStats:
    requests: int = 0
    unique: int = 0
    cached: int = 0
    calls: int = 0
    retries: int = 0
    invalid: int = 0
    not_judged: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0


def _retry_after_seconds(headers) -> float | None:  # noqa: ANN001 - httpx Headers
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


class OpenAIJudge:
    """``judge_many`` judges pairs concurrently, through the cache, within the budget."""

    def __init__(self, cfg: OpenAIJudgeConfig, prompt_version: str, cache: JudgeCache) -> None:
        self.cfg = cfg
        self.prompt_version = prompt_version
        self.cache = cache
        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key:
            raise JudgeConfigError(
                f"the judge API key is read from the environment variable {cfg.api_key_env}, which is "
                f"unset or empty; export {cfg.api_key_env}=... (judge.openai.api_key_env names another variable)"
            )
        self._secret = key
        host = urlparse(cfg.base_url).netloc if cfg.base_url else "api.openai.com"
        self.judge_id = f"openai:{cfg.model}@{host or cfg.base_url}"
        self._client = openai.OpenAI(
            api_key=key, base_url=cfg.base_url, timeout=cfg.retry.timeout, max_retries=0
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.stopped_reason: str | None = None
        # Budget usage over the judge's lifetime (all judge_many calls).
        self.calls_made = 0
        self.tokens_used = 0
        self.cost_usd = 0.0
        self.stats = JudgeStats()

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

    # -- one HTTP call, with retries ------------------------------------------------------------
    def _call_once(self, text: str) -> tuple[str, int, int]:
        try:
            completion = self._client.chat.completions.create(
                model=self.cfg.model,
                messages=[{"role": "user", "content": text}],
                temperature=self.cfg.temperature,
                max_tokens=self.cfg.max_tokens,
            )
        except openai.APITimeoutError:
            raise _Retryable(f"timed out after {self.cfg.retry.timeout}s", None, None) from None
        except openai.APIConnectionError as err:
            raise _Retryable(f"connection error: {self._scrub(err)}", None, None) from None
        except openai.APIStatusError as err:
            code = err.status_code
            message = f"HTTP {code}: {self._scrub(err.message)}"
            if code == 429 or code >= 500 or code == 408:
                raise _Retryable(message, _retry_after_seconds(err.response.headers), code) from None
            raise JudgeAPIError(f"judge endpoint {self.judge_id} refused the request: {message}", code) from None
        except openai.APIError as err:  # e.g. an invalid response body
            raise _Retryable(f"bad response: {self._scrub(err)}", None, None) from None
        usage = completion.usage
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0) if usage else 0
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0) if usage else 0
        self._account(prompt_tokens, completion_tokens)
        content = completion.choices[0].message.content if completion.choices else None
        return content or "", prompt_tokens, completion_tokens

    def _call_with_retries(self, text: str) -> tuple[str, int, int]:
        retry = self.cfg.retry
        attempt = 0
        while True:
            self._reserve_call()  # raises BudgetExhausted
            try:
                return self._call_once(text)
            except _Retryable as err:
                if attempt >= retry.max_retries:
                    raise JudgeAPIError(
                        f"judge endpoint {self.judge_id}: giving up after {attempt + 1} attempts: {err}",
                        err.status_code,
                    ) from None
                if err.retry_after is not None:
                    delay = min(err.retry_after, retry.max_backoff)
                else:
                    delay = random.uniform(0.0, min(retry.max_backoff, retry.initial_backoff * (2**attempt)))
                attempt += 1
                with self._lock:
                    self.stats.retries += 1
                log.warning("judge call failed (%s); retry %d/%d in %.2fs", err, attempt, retry.max_retries, delay)
                if not self._stop.is_set():  # a stopped run gives up at the next reservation
                    time.sleep(delay)

    # -- one judgment (≤ 2 parse attempts) -----------------------------------------------------
    def _judge_one(self, task: str, text: str, key: str) -> Verdict | None:
        texts: list[str] = []
        prompt_tokens = completion_tokens = 0
        winner = explanation = None
        for _ in range(2):
            try:
                content, pt, ct = self._call_with_retries(text)
            except BudgetExhausted:
                return None  # not judged; nothing cached, a rerun will judge it
            texts.append(content)
            prompt_tokens += pt
            completion_tokens += ct
            winner, explanation = prompts.parse_verdict(task, content)
            if winner is not None:
                break
        verdict = Verdict(winner=winner, raw=ATTEMPT_SEPARATOR.join(texts), explanation=explanation,
                          cached=False, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        if winner is not None:  # an answer with no verdict is recorded as invalid but not cached: a rerun asks again
            self.cache.put(key, self.judge_id, self.prompt_version, verdict)
        return verdict

    # -- the batch ---------------------------------------------------------------------------
    def judge_many(self, requests: Sequence[JudgeRequest], progress: bool = True) -> list[Verdict | None]:
        """Same order as ``requests``; ``None`` where the budget stopped the run first.

        Identical requests (same rendered prompt) are judged once.  Raises :class:`JudgeAPIError`
        on a request the endpoint refuses (after in-flight calls finish; their verdicts are cached).
        """
        start = time.perf_counter()
        self.stats = JudgeStats(requests=len(requests))
        keyed: list[tuple[str, str, str]] = []  # (key, task, rendered)
        for request in requests:
            rendered = prompts.render(self.prompt_version, request)
            keyed.append((cache_key(self.judge_id, self.prompt_version, rendered), request.task, rendered))
        by_key: dict[str, Verdict | None] = {}
        todo: dict[str, tuple[str, str]] = {}
        for key, task, rendered in keyed:
            if key in by_key or key in todo:
                continue
            hit = self.cache.get(key)
            if hit is not None:
                by_key[key] = hit
            else:
                todo[key] = (task, rendered)
        self.stats.unique = len(by_key) + len(todo)
        self.stats.cached = len(by_key)

        failure: JudgeAPIError | None = None
        abort = threading.Event()

        def work(key: str, task: str, rendered: str) -> Verdict | None:
            if abort.is_set():
                return None
            return self._judge_one(task, rendered, key)

        if todo:
            bar = tqdm(total=len(todo), desc=f"judge {self.cfg.model}", unit="pair", disable=not progress)
            pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="judge")
            try:
                futures = {pool.submit(work, key, task, rendered): key for key, (task, rendered) in todo.items()}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        key = futures[future]
                        try:
                            by_key[key] = future.result()
                        except JudgeAPIError as err:
                            by_key[key] = None
                            if failure is None:
                                failure = err
                                abort.set()
                        bar.update(1)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
                bar.close()

        results: list[Verdict | None] = []
        seen: set[str] = set()
        for key, _, _ in keyed:
            verdict = by_key.get(key)
            if verdict is not None and key in seen:
                verdict = dataclasses.replace(verdict)
            seen.add(key)
            results.append(verdict)
        self.stats.invalid = sum(1 for v in results if v is not None and v.winner is None)
        if self.stats.invalid:
            log.warning("judge %s: %d answer(s) gave no verdict after 2 attempts each; they count as invalid here and "
                        "are not cached, so a rerun asks again for them (and only them)", self.judge_id, self.stats.invalid)
        self.stats.not_judged = sum(1 for v in results if v is None)
        self.stats.seconds = time.perf_counter() - start
        s = self.stats
        log.info(
            "judge %s: %d requests (%d unique), %d calls, %d cached hits, %d retries, %d invalid, "
            "%d not judged, tokens %d+%d, est. cost $%.4f, %.1fs%s",
            self.judge_id, s.requests, s.unique, s.calls, s.cached, s.retries, s.invalid, s.not_judged,
            s.prompt_tokens, s.completion_tokens, s.cost_usd, s.seconds,
            f"; stopped: {self.stopped_reason}" if self.stopped_reason else "",
        )
        if failure is not None:
            raise failure
        return results

    def close(self) -> None:
        self._client.close()
