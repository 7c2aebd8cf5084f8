"""The fault suite's load: the real `EventProducer` sending the reference model's sessions.

The reference model (`tests.support.traffic.ReferenceTraffic`): every
session is 5 screen_views with known gaps, a click after the third view
and a session_end. A view's expected duration is the gap to the next view
of its session; the last view, the click and the session_end have 0. Two
ways to send them:

- whole sessions per task (`Load(..., sessions_per_batch=k)`): the producer's
  batch size is exactly k sessions and its timer never fires, so every task
  holds complete sessions in order. Durations are then exact even when tasks
  are redelivered or run on several worker processes in any order (the
  README's "Ordering" caveat) - used wherever the ingest path is faulted;
- interleaved (`sessions_per_batch=None`): `width` sessions are open at once
  and their events interleave, with the producer's normal micro-batching, so
  a session spans many tasks and its last view waits in Redis between them.
  Exact with one ingest process and no redelivery - used where the fault is
  downstream (flusher, lock, ClickHouse).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from celery import Celery

from tests.support.polling import wait_until
from tests.support.traffic import EVENTS_PER_SESSION, ReferenceTraffic
from worker.producer import BufferFull, EventProducer, ProducerError


class _WholeSessions:
    """Units of one complete session each."""

    def __init__(self, traffic: ReferenceTraffic) -> None:
        self.traffic = traffic
        self.closing = False

    def next_unit(self) -> list[dict[str, Any]] | None:
        return None if self.closing else self.traffic.session()


class _Interleaved:
    """`width` open sessions, one event of the next session in turn; winds down on close."""

    def __init__(self, traffic: ReferenceTraffic, width: int) -> None:
        self.traffic = traffic
        self.open: deque[deque[dict[str, Any]]] = deque(
            deque(traffic.session()) for _ in range(width)
        )
        self.closing = False

    def next_unit(self) -> list[dict[str, Any]] | None:
        while self.open:
            current = self.open.popleft()
            event = current.popleft()
            if current:
                self.open.append(current)
            elif not self.closing:
                self.open.append(deque(self.traffic.session()))
            return [event]
        return None


class Load:
    """The producer client sending the reference model at a steady rate, in a thread.

    `handed` is every id that `EventProducer.send()` accepted: what the system
    owes ClickHouse. `stop()` ends the stream at a session boundary (an
    interleaved stream first finishes its open sessions), `finish()` then
    flushes the producer until nothing is held.
    """

    def __init__(
        self,
        app: Celery,
        traffic: ReferenceTraffic,
        rate: float,
        *,
        sessions_per_batch: int | None = 4,
        width: int = 20,
        max_events: int = 20_000,
    ) -> None:
        if sessions_per_batch is None:
            self.producer = EventProducer(app, batch_size=100, batch_ms=10)
            self.stream: _WholeSessions | _Interleaved = _Interleaved(traffic, width)
        else:
            # Only the size trigger seals a batch: each task is whole sessions.
            self.producer = EventProducer(
                app, batch_size=EVENTS_PER_SESSION * sessions_per_batch, batch_ms=3_600_000
            )
            self.stream = _WholeSessions(traffic)
        self.traffic = traffic
        self.rate = rate
        self.max_events = max_events
        self.handed: list[str] = []
        self.errors: list[str] = []
        self.buffer_full = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-load", daemon=True)
        self.started = 0.0
        self.stopped_at: float | None = None

    def start(self) -> Load:
        self.started = time.monotonic()
        self._thread.start()
        return self

    @property
    def count(self) -> int:
        return len(self.handed)

    def _run(self) -> None:
        try:
            while True:
                if self._stop.is_set() or len(self.handed) >= self.max_events:
                    self.stream.closing = True
                unit = self.stream.next_unit()
                if unit is None:
                    return
                for event in unit:
                    self._send(event)
                if not self.stream.closing:
                    lag = self.started + len(self.handed) / self.rate - time.monotonic()
                    if lag > 0:
                        self._stop.wait(lag)
        except Exception as exc:  # reported by finish()
            self.errors.append(repr(exc))

    def _send(self, event: dict[str, Any]) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                self.handed.append(self.producer.send(event))
                return
            except BufferFull:
                self.buffer_full += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def wait_for(self, events: int, timeout: float) -> None:
        wait(lambda: self.count >= events, timeout, f"the load to hand over {events} events")

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load thread did not stop"
        self.stopped_at = time.monotonic()

    def finish(self, timeout: float = 60) -> None:
        """Stop, then flush until the producer holds nothing (raises if it cannot)."""
        if self.stopped_at is None:
            self.stop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.producer.flush(timeout=max(1.0, deadline - time.monotonic()))
                break
            except ProducerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.producer.close(timeout=5)
        assert self.producer.stats.pending == 0
        assert not self.errors, self.errors


def wait(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    wait_until(condition, timeout, what, interval=interval)
