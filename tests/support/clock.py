"""A clock that moves only when told to: timing logic tested without sleeping."""

from __future__ import annotations

import threading

from tests.support.dates import BASE_MS


class ManualClock:
    """A `worker.clock.Clock` whose time is set by the test (it starts at `dates.BASE_MS`)."""

    def __init__(self, start_ms: int = BASE_MS) -> None:
        self._now = start_ms
        self._lock = threading.Lock()

    def now_ms(self) -> int:
        with self._lock:
            return self._now

    def advance(self, ms: int) -> None:
        with self._lock:
            self._now += ms

    def set(self, ms: int) -> None:
        with self._lock:
            self._now = ms
