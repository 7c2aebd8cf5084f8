"""EventProducer: micro-batch events in the producer, one Celery task per batch.

OpenPanel's producer collected events in-process and wrote them to Redis
every 10 ms or every 100 events. `EventProducer` does the same on the Celery
side: `send()` validates an event and adds it to a pending batch; a batch is
sent as ONE `eventbuffer.ingest_events` task when it holds `batch_size`
events, `batch_ms` after its first event, on `flush()`, on `close()`, and at
interpreter exit.

    with EventProducer() as producer:
        producer.send({"name": "screen_view", "project_id": "p", ...})

Error policy: an accepted event is never lost silently.

- `send()` raises `InvalidEvent` at once for an invalid event (nothing is
  queued), `BufferFull` when `max_pending` events are already held unsent
  (back-pressure: the caller decides what to do), and `ProducerClosed` after
  `close()`. It never waits for the broker.
- Every batch gets its task id when it is sealed and keeps it across
  re-sends, so a batch that was published but whose confirmation was lost
  is skipped by the worker's batch marker instead of being applied twice.
- Background sends (size and time triggers) that still fail after kombu's
  publish retries keep the batch in memory and retry later, with
  exponential backoff (0.5 s doubling to 30 s); batches go out in order.
- `flush(timeout)` and `close(timeout)` send everything held and raise
  `ProducerError` (its `unsent` is the number of events still held) if the
  broker is still failing when the timeout is up (`timeout=None`: at the
  first batch that still fails after kombu's retries). The events stay
  held: a later `flush()` or `close()` can send them.
- At interpreter exit, held events get one last `close()` (up to 5 s); if
  that fails the count is logged at ERROR level. A producer that is garbage collected
  hands its held events to its sender thread, which sends them and stops.
- A forked child process drops the events its parent holds (the parent
  sends them), so no event is sent twice.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import msgspec
from celery import Celery
from kombu.serialization import registry

from worker.connection import broker_config
from worker.errors import BufferFull, ProducerClosed, ProducerError
from worker.events import Event, Limits, encode_event, parse_event
from worker.headroom import BrokerNearlyFull, Headroom
from worker.names import INGEST_QUEUE, TASK_INGEST_EVENTS
from worker.settings import Settings

log = logging.getLogger(__name__)

# The longest a batch waits for the broker to fall under the headroom limit
# (worker/headroom.py) before it is sent anyway.
HEADROOM_WAIT_MAX_S = 5.0

# Background retry after a failed publish: 0.5 s doubling to 30 s.
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
# close() at interpreter exit waits at most this long for a failing broker.
EXIT_TIMEOUT_S = 5.0
DEFAULT_CLOSE_TIMEOUT_S = 5.0


__all__ = [
    "BufferFull",
    "EventProducer",
    "ProducerClosed",
    "ProducerError",
    "ProducerStats",
    "producer_app",
]


@dataclass(frozen=True)
class ProducerStats:
    sent_batches: int
    sent_events: int
    # Accepted events not yet confirmed by the broker.
    pending: int
    # Failed publish attempts (each after kombu's own retries).
    failures: int


# The producer's task bodies: plain JSON (content type application/json, as any
# sender's), encoded by msgspec so the batch's rows, JSON already, are spliced in
# as they are. Registered as an encoder only, when a producer is made
# (`register_serializer`), not on import: no decoder of the host changes.
SERIALIZER = "eventbuffer-json"


def register_serializer() -> None:
    """Register kombu's `eventbuffer-json` encoder in this process (again: no change)."""
    registry.register(
        SERIALIZER,
        msgspec.json.encode,
        None,
        content_type="application/json",
        content_encoding="utf-8",
    )


def batch_arg(rows: list[bytes]) -> msgspec.Raw:
    """The `ingest_events` argument for these rows: the JSON array of them, not re-encoded."""
    return msgspec.Raw(b"[" + b",".join(rows) + b"]")


@dataclass
class _Batch:
    seq: int
    task_id: str
    events: list[bytes]  # the events' JSON rows


class _Core:
    """The producer's state and sender thread.

    Kept apart from `EventProducer` so the thread and the exit hook never
    keep the user's object alive: when it is collected, the core sends what
    it holds and then goes away too.
    """

    def __init__(
        self,
        app: Any,
        batch_size: int,
        batch_ms: int,
        max_pending: int,
        send_retries: int,
    ) -> None:
        self.app = app
        self.batch_size = batch_size
        self.batch_s = batch_ms / 1000
        self.max_pending = max_pending
        # kombu's publish retry, per attempt: reconnects 0, 0.2, 0.4, 0.5 ... s apart.
        self.retry_policy = {
            "max_retries": send_retries,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        }
        # No publishing into a nearly full broker Redis: its last 5 % is the workers'.
        self.headroom = Headroom(str(app.conf.broker_url or ""))
        self._reset_state()

    def _reset_state(self) -> None:
        self.cond = threading.Condition()
        # One publisher at a time, always the oldest batch: batches go out in order.
        self.send_lock = threading.Lock()
        self.open: list[bytes] = []
        self.opened_at = 0.0
        self.sealed: deque[_Batch] = deque()
        self.seq = 0
        self.pending = 0
        self.sent_batches = 0
        self.sent_events = 0
        self.failures = 0
        self.failures_in_row = 0
        self.retry_at = 0.0
        # Since when the broker has been above the headroom limit (None: it is not).
        self.nearly_full_since: float | None = None
        self.closed = False
        self.abandoned = False
        self.stopping = False
        self.thread: threading.Thread | None = None

    # -- accepting --------------------------------------------------------

    def add(self, row: bytes) -> None:
        with self.cond:
            if self.closed:
                raise ProducerClosed("the producer is closed", self.pending)
            if self.pending >= self.max_pending:
                raise BufferFull(
                    f"{self.pending} events held unsent (max_pending={self.max_pending}); "
                    "is the broker down?",
                    self.pending,
                )
            if not self.open:
                self.opened_at = time.monotonic()
            self.open.append(row)
            self.pending += 1
            if len(self.open) >= self.batch_size:
                self._seal_locked()
                self.cond.notify()
            elif len(self.open) == 1:
                self.cond.notify()  # the sender thread starts this batch's timer
            if self.thread is None:
                self._start_thread_locked()

    def _seal_locked(self) -> None:
        if self.open:
            self.seq += 1
            self.sealed.append(_Batch(self.seq, str(uuid.uuid4()), self.open))
            self.open = []

    # -- publishing -------------------------------------------------------

    def _publish_oldest(self, deadline: float | None) -> BaseException | None:
        """Publish the oldest sealed batch; None when sent (or none left), else the error."""
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.send_lock.acquire(timeout=wait):
            return TimeoutError("another thread is still sending")
        try:
            with self.cond:
                if not self.sealed:
                    return None
                batch = self.sealed[0]
            try:
                if self.nearly_full_since is None or (
                    time.monotonic() - self.nearly_full_since < HEADROOM_WAIT_MAX_S
                ):
                    self.headroom.check(self.pending)
                self.app.send_task(
                    TASK_INGEST_EVENTS,
                    # The rows as a JSON array of event objects, exactly what any
                    # sender sends; the worker decodes it straight into events.
                    args=[batch_arg(batch.events)],
                    serializer=SERIALIZER,
                    task_id=batch.task_id,
                    queue=INGEST_QUEUE,
                    retry=True,
                    retry_policy=self.retry_policy,
                    # Without it the Redis result backend subscribes to every task id.
                    ignore_result=True,
                )
            except BrokerNearlyFull as exc:
                # Not a failure: the room frees as the workers apply, so look again in a
                # second (a back-off growing to 30 s would leave that room unused). A
                # courtesy, not a wait without end: after HEADROOM_WAIT_MAX_S the batch is
                # sent anyway (memory Redis holds apart from the buffer could keep the
                # ratio above the limit for good), and a refusal is then a failure.
                with self.cond:
                    if self.nearly_full_since is None:
                        self.nearly_full_since = time.monotonic()
                    self.retry_at = time.monotonic() + self.headroom.every_s
                log.debug("batch %s waits: %s", batch.task_id, exc)
                return exc
            except Exception as exc:
                with self.cond:
                    self.failures += 1
                    self.failures_in_row += 1
                    delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (self.failures_in_row - 1))
                    self.retry_at = time.monotonic() + delay
                    held = self.pending
                log.warning(
                    "batch %s (%d events) not sent, %d events held, next retry in %.1f s: %s",
                    batch.task_id,
                    len(batch.events),
                    held,
                    delay,
                    exc,
                )
                return exc
            with self.cond:
                self.sealed.popleft()
                self.pending -= len(batch.events)
                self.sent_batches += 1
                self.sent_events += len(batch.events)
                self.failures_in_row = 0
                self.retry_at = 0.0
                self.nearly_full_since = None
            return None
        finally:
            self.send_lock.release()

    def flush(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            self._seal_locked()
            target = self.seq
        delay = RETRY_MIN_S
        while True:
            error = self._publish_oldest(deadline)
            with self.cond:
                done = not self.sealed or self.sealed[0].seq > target
                held = self.pending
            if error is None:
                if done:
                    return
                continue
            remaining = 0.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise ProducerError(
                    f"{held} events not sent, still held (broker failing: {error})", held
                ) from error
            if isinstance(error, BrokerNearlyFull):  # room comes back as workers apply
                time.sleep(min(self.headroom.every_s, remaining))
                continue
            time.sleep(min(delay, remaining))
            delay = min(RETRY_MAX_S, delay * 2)

    # -- the sender thread ------------------------------------------------

    def _start_thread_locked(self) -> None:
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="EventProducer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            with self.cond:
                while True:
                    if self.stopping:
                        return
                    now = time.monotonic()
                    if self.open and (self.abandoned or now >= self.opened_at + self.batch_s):
                        self._seal_locked()
                    if self.sealed and now >= self.retry_at:
                        break
                    if self.abandoned and not self.sealed:
                        self.thread = None
                        return
                    self.cond.wait(self._wait_locked(now))
            try:
                while self._publish_oldest(None) is None:
                    with self.cond:
                        if not self.sealed or self.stopping:
                            break
            except Exception:  # a bug here must not stop the thread while events are held
                log.exception("EventProducer sender thread error")
                with self.cond:
                    self.retry_at = time.monotonic() + RETRY_MAX_S

    def _wait_locked(self, now: float) -> float | None:
        wakeups = []
        if self.open:
            wakeups.append(self.opened_at + self.batch_s)
        if self.sealed:
            wakeups.append(self.retry_at)
        return max(0.0, min(wakeups) - now) if wakeups else None

    def _stop_thread(self, timeout: float | None) -> None:
        with self.cond:
            self.stopping = True
            thread, self.thread = self.thread, None
            self.cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- lifecycle --------------------------------------------------------

    def close(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            self.closed = True
        self._stop_thread(timeout)
        self.flush(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def abandon(self) -> None:
        """The user's producer was garbage collected: send what is held, then stop."""
        with self.cond:
            self.closed = self.abandoned = True
            self.cond.notify_all()

    def stats(self) -> ProducerStats:
        with self.cond:
            return ProducerStats(self.sent_batches, self.sent_events, self.pending, self.failures)


# Every core that may hold events: the exit hook sends, a forked child forgets.
_live: weakref.WeakSet[_Core] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for core in list(_live):
        try:
            core.close(EXIT_TIMEOUT_S)
        except ProducerError as exc:
            log.error("EventProducer at exit: %d events LOST: %s", exc.unsent, exc)


def _forget_in_child() -> None:
    for core in list(_live):
        closed = core.closed
        core._reset_state()
        core.closed = closed


atexit.register(_close_all_at_exit)
os.register_at_fork(after_in_child=_forget_in_child)


# What only the producer's own app needs; a host app passed in brings its broker.
CONNECTION_VARIABLES = ("REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")


def producer_app(settings: Settings) -> Celery:
    """A Celery app of the producer's own that only sends: the broker of `settings`, JSON.

    It is never the process's current app, and it is not eventbuffer's worker
    app: no task modules, no signal handlers, nothing a host app would notice.
    """
    app = Celery("eventbuffer-producer", set_as_current=False)
    app.conf.update(broker_config(settings))
    return app


def producer_settings(app_given: bool) -> Settings:
    """The settings from the environment; without the connection ones when an app is given.

    A host app brings its own broker: its REDIS_URL (say `localhost:6379`,
    which eventbuffer's settings would refuse) is none of the producer's business.
    """
    if not app_given:
        return Settings.from_env()
    return Settings.from_env({k: v for k, v in os.environ.items() if k not in CONNECTION_VARIABLES})


class EventProducer:
    """Send events as micro-batched `eventbuffer.ingest_events` tasks (see the module doc).

    `app` is the Celery app to send with (a host app's own); without one the
    producer makes its own from `CELERY_BROKER_URL` / `REDIS_URL`. Events are
    validated with the limits of `settings` (default: the environment's), the
    same the worker applies.
    """

    def __init__(
        self,
        app: Celery | None = None,
        *,
        batch_size: int | None = None,
        batch_ms: int | None = None,
        max_pending: int = 100_000,
        send_retries: int = 3,
        settings: Settings | None = None,
    ) -> None:
        settings = settings or producer_settings(app is not None)
        app = producer_app(settings) if app is None else app
        self._limits = Limits.from_settings(settings)
        batch_size = settings.micro_batch_size if batch_size is None else batch_size
        batch_ms = settings.micro_batch_ms if batch_ms is None else batch_ms
        if batch_size < 1 or batch_ms < 0 or max_pending < 1 or send_retries < 0:
            raise ValueError("need batch_size >= 1, batch_ms >= 0, max_pending >= 1, retries >= 0")
        # Import the broker transport now: kombu imports it on first use, and
        # an import during the exit flush fails (redis-py then imports
        # concurrent.futures, which can no longer register its atexit hook).
        connection = app.connection_for_write()
        connection.get_transport_cls()
        connection.release()
        register_serializer()  # the encoder its batches are sent with
        self._core = _Core(app, batch_size, batch_ms, max_pending, send_retries)
        _live.add(self._core)
        # Collected without close(): the core still sends what it holds. Not at
        # exit: `_close_all_at_exit` does that, waiting for the broker.
        weakref.finalize(self, self._core.abandon).atexit = False

    def send(self, event: dict[str, Any] | Event) -> str:
        """Validate and queue one event; returns its id. See the module doc for errors."""
        if isinstance(event, Event):
            # Struct constructors skip type checks: validate like any other input.
            event = msgspec.to_builtins(event)
        parsed = parse_event(event, self._limits)
        self._core.add(encode_event(parsed))
        return parsed.id

    def flush(self, timeout: float | None = None) -> None:
        """Send every held event; raise `ProducerError` if some are still unsent.

        `timeout` is checked between publish attempts; one attempt (kombu's
        retries included) is not interrupted, so a flush can overrun by that.
        """
        self._core.flush(timeout)

    def close(self, timeout: float | None = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Stop accepting events and flush; safe to call again (it retries what is held)."""
        self._core.close(timeout)

    @property
    def stats(self) -> ProducerStats:
        return self._core.stats()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
