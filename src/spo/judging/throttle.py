"""How many judge calls may be in flight: fewer when the endpoint says it is overloaded.

A rate-limited endpoint answers 429.  Retrying at full concurrency spends every item's retries
against the same limit, so one unlucky item runs out of attempts while the endpoint is still
saying "slow down".  :class:`AdaptiveLimit` is the classic answer (TCP's AIMD, as used by
adaptive-concurrency limiters such as Netflix's ``concurrency-limits``):

* **multiplicative decrease** — a 429 halves the limit (never below 1), once per window: a 429
  from a call that was sent before the last decrease was already answered by it, so a burst of
  429s from one window of calls halves the limit once, not eight times;
* **additive increase** — after ``limit`` successes in a row the limit grows by one, up to the
  configured concurrency;
* **Retry-After** — the endpoint's own pause applies to every new call, not only to the retry of
  the call that received it.

The clock and the sleep are parameters so that tests run it on a fake clock, deterministically.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class AdaptiveLimit:
    """At most :attr:`limit` calls in flight; ``acquire`` before a call, ``release`` after it."""

    def __init__(self, ceiling: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if ceiling < 1:
            raise ValueError(f"concurrency must be at least 1, got {ceiling}")
        self.ceiling = ceiling
        self.limit = ceiling
        self.lowest = ceiling  # the lowest limit reached, for the summary line
        self.decreases = 0
        self._clock, self._sleep = clock, sleep
        self._cond = threading.Condition()
        self._in_flight = 0
        self._window = 0  # bumped at every decrease: which calls were sent under the current limit
        self._successes = 0
        self._paused_until = float("-inf")

    def acquire(self) -> int:
        """Wait for a free slot and for any Retry-After pause to pass; returns the call's window."""
        while True:
            with self._cond:
                while self._in_flight >= self.limit:
                    self._cond.wait()
                wait = self._paused_until - self._clock()
                if wait <= 0:
                    self._in_flight += 1
                    return self._window
            self._sleep(wait)

    def release(self, window: int, *, throttled: bool = False, ok: bool = False,
                retry_after: float | None = None) -> None:
        """The call sent in ``window`` ended: ``throttled`` (a 429), ``ok`` (an answer) or neither
        (another failure, which says nothing about the endpoint's capacity)."""
        with self._cond:
            self._in_flight -= 1
            if throttled:
                if window == self._window:
                    if self.limit > 1:
                        self.limit //= 2
                        self.lowest = min(self.lowest, self.limit)
                        self.decreases += 1
                    self._window += 1
                    self._successes = 0
                if retry_after is not None and retry_after > 0:
                    self._paused_until = max(self._paused_until, self._clock() + retry_after)
            elif ok:
                self._successes += 1
                if self._successes >= self.limit and self.limit < self.ceiling:
                    self.limit += 1
                    self._successes = 0
            self._cond.notify_all()
