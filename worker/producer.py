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

The batches and the thread that sends them: worker/producer_sender.py.
"""

from __future__ import annotations

import os
import weakref
from types import TracebackType
from typing import Any

import msgspec
from celery import Celery

from worker.connection import broker_config
from worker.errors import BufferFull, ProducerClosed, ProducerError
from worker.events import Event, Limits, encode_event, parse_event
from worker.producer_sender import BatchSender, ProducerStats, register_serializer, send_at_exit
from worker.settings import Settings

DEFAULT_CLOSE_TIMEOUT_S = 5.0


__all__ = [
    "BufferFull",
    "EventProducer",
    "ProducerClosed",
    "ProducerError",
    "ProducerStats",
    "producer_app",
]


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
        self._core = BatchSender(app, batch_size, batch_ms, max_pending, send_retries)
        send_at_exit(self._core)
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
