"""A fake monotonic clock for code that takes ``clock`` and ``sleep`` callables.

Time moves only when the code under test sleeps, by exactly what it asked for, so a test of a
timeout, a deadline or a backoff asserts what the code promised (how many polls, which delays)
and never how fast or how loaded the machine running it is.

Not a test module: imported as ``from fake_clock import FakeClock`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class FakeClock:
    """``clock()`` reads the fake time; ``clock.sleep(s)`` records ``s`` and moves the time on by it.

    ``on_sleep`` (optional) is called with the number of sleeps so far (1 for the first) after
    each one: a test's way to make something happen at an exact point of the code's waiting
    (a token rotated between two polls, a signal while a job runs) instead of racing a thread.

    Thread-safe (the judge's workers share one clock): sleeps from several threads each move the
    time on by their own length, one after the other.
    """

    now: float = 0.0
    sleeps: list[float] = field(default_factory=list)
    on_sleep: Callable[[int], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += max(0.0, seconds)
            count = len(self.sleeps)
        if self.on_sleep is not None:
            self.on_sleep(count)
