"""The producer's batches and the thread that sends them (`EventProducer`'s core).

`BatchSender` holds the open batch and the sealed ones, seals a batch on its
size or age, and publishes the oldest first, one `eventbuffer.ingest_events`
task each, from its own thread or from `flush()`/`close()`; a batch that
fails stays and is retried with backoff, and waits a while when the broker
is nearly full (worker/headroom.py). The error policy it keeps:
worker/producer.py. At interpreter exit every live sender gets one last
`close()`; a forked child forgets what its parent holds.
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
from typing import Any

import msgspec
from kombu.serialization import registry

from worker.errors import BufferFull, ProducerClosed, ProducerError
from worker.headroom import BrokerNearlyFull, Headroom
from worker.names import INGEST_QUEUE, TASK_INGEST_EVENTS

# Logged as the producer's (the module users know and configure).
log = logging.getLogger("worker.producer")

# The longest a batch waits for the broker to fall under the headroom limit
# (worker/headroom.py) before it is sent anyway.
HEADROOM_WAIT_MAX_S = 5.0

# Background retry after a failed publish: 0.5 s doubling to 30 s.
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
# close() at interpreter exit waits at most this long for a failing broker.
EXIT_TIMEOUT_S = 5.0


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


class BatchSender:
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
_live: weakref.WeakSet[BatchSender] = weakref.WeakSet()


_hooks_installed = False
_hooks_lock = threading.Lock()


def send_at_exit(sender: BatchSender) -> None:
    """Give `sender` one last `close()` at interpreter exit (and forget it in a forked child).

    The process hooks are installed by the first producer made, not on import."""
    global _hooks_installed
    with _hooks_lock:
        if not _hooks_installed:
            atexit.register(_close_all_at_exit)
            os.register_at_fork(after_in_child=_forget_in_child)
            _hooks_installed = True
        _live.add(sender)


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
