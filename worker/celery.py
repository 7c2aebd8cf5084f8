"""The one Celery application: queues, routes, serialization and delivery.

`celery -A worker` finds the app here (`worker.celery:app`, Celery's own
convention), so importing `worker` or the producer client never creates it.

- Two queues: `ingest` (event tasks) and `flush` (buffer maintenance), so
  each can get its own workers. Ingest workers also consume Celery's default
  queue `celery`, where a foreign app's `send_task` without `queue=` lands.
- JSON only: task bodies are plain JSON and pickle is never accepted.
- Ingest tasks are acknowledged late and rejected when their worker dies,
  so a killed worker's task is delivered again; the apply script skips a
  batch id (the task id) it has already applied.
- Task modules are named by string (`include`): `worker` never imports `tasks`.
"""

from __future__ import annotations

import gc
from functools import partial
from typing import Any

from celery import Celery, signals
from kombu.entity import Exchange, Queue

from beat_schedule import beat_schedule
from worker.connection import broker_config, redis_tls_options
from worker.names import (
    DEFAULT_QUEUE,
    FLUSH_QUEUE,
    INGEST_QUEUE,
    TASK_INGEST_EVENT,
    TASK_INGEST_EVENTS,
    TASK_PROCESS_BUFFER,
    TASK_SWEEP,
)
from worker.settings import Settings

TASK_MODULES = ["tasks.ingest", "tasks.flush", "tasks.sweep"]
# eventbuffer's own logging setup (redaction, JSON): a Logging class of this
# app only, not a global Celery signal that would reach a host app's loggers.
LOGGING_CLASS = "worker.observability:AppLogging"


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration that follows from eventbuffer's settings."""
    tls: dict[str, Any] = {}
    if (backend_tls := redis_tls_options(settings.effective_result_backend)) is not None:
        tls["redis_backend_use_ssl"] = backend_tls
    return dict(
        **broker_config(settings),
        **tls,
        result_backend=settings.effective_result_backend,
        result_serializer="json",
        result_accept_content=["json"],
        event_serializer="json",
        task_queues=(
            Queue(INGEST_QUEUE, Exchange(INGEST_QUEUE), routing_key=INGEST_QUEUE),
            Queue(FLUSH_QUEUE, Exchange(FLUSH_QUEUE), routing_key=FLUSH_QUEUE),
            Queue(DEFAULT_QUEUE, Exchange(DEFAULT_QUEUE), routing_key=DEFAULT_QUEUE),
        ),
        task_default_queue=INGEST_QUEUE,
        # A process_buffer run stuck past every INSERT's timeouts is interrupted, then
        # its process killed (Settings.flush_time_limit_s).
        task_annotations={
            TASK_PROCESS_BUFFER: dict(
                zip(("soft_time_limit", "time_limit"), settings.flush_time_limit_s, strict=True)
            )
        },
        task_routes={
            TASK_INGEST_EVENT: {"queue": INGEST_QUEUE},
            TASK_INGEST_EVENTS: {"queue": INGEST_QUEUE},
            TASK_PROCESS_BUFFER: {"queue": FLUSH_QUEUE},
            TASK_SWEEP: {"queue": FLUSH_QUEUE},
        },
        # Results: only process_buffer keeps one (its summary), for an hour.
        task_ignore_result=True,
        result_expires=3600,
        # Delivery: at least once, made exactly once by the batch markers.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=4,
        # Messages for the ingest tasks that Celery cannot run become dead letters.
        worker_consumer="worker.consumer:Consumer",
        # `-P prefork` (the default), replacing a retired pool process at once.
        worker_pool="worker.prefork:TaskPool",
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        # Task events cost ingest throughput; Flower turns them on itself
        # (`celery -A worker control enable_events` does the same by hand).
        task_send_sent_event=False,
        worker_send_task_events=False,
        beat_schedule=beat_schedule(settings.flush_interval_s, settings.sweep_interval_s),
        # Beat writes its schedule file after every task it sends: the file's age
        # is its healthcheck (worker/beat_health.py).
        beat_sync_every=1,
        timezone="UTC",
    )


def _new_app() -> Celery:
    # Not the process's current app: a host app that imports this module keeps
    # its own (a Celery worker running this app makes it current itself).
    return Celery("eventbuffer", include=TASK_MODULES, log=LOGGING_CLASS, set_as_current=False)


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from `settings` (tests, tools)."""
    app = _new_app()
    app.conf.update(celery_config(settings))
    return app


def _decode_task_bodies_lazily(app: Celery, sender: Any = None, **_: Any) -> None:
    """In eventbuffer's workers, task arguments stay raw JSON until a task decodes them."""
    if getattr(sender, "app", None) is app:
        from worker import bodies

        bodies.install()


def _process_settings() -> Settings:
    """This process's settings (`worker.runtime`), imported when a hook first asks."""
    from worker import runtime

    return runtime.settings()


# A worker's young objects are collected after this many allocations instead of
# Python's 700. An ingest task of 500 events allocates thousands of objects that live
# until it ends: at 700, each is traversed by several collections and moved up the
# generations, which then triggers full collections of the whole heap (~7% of an ingest
# worker's CPU). The garbage is freed by reference counting all the same; only cycles
# wait for a collection, and the code that runs tasks makes few.
GC_YOUNG_THRESHOLD = 20_000


_gc_tuned = False  # this process runs one of eventbuffer's workers (or is its pool's)


def _tune_garbage_collector(app: Celery, sender: Any = None, **_: Any) -> None:
    """In eventbuffer's workers: collect the young generation less often (the thresholds
    are inherited by a pool's processes)."""
    global _gc_tuned
    if getattr(sender, "app", None) is app:
        young, older, oldest = gc.get_threshold()
        gc.set_threshold(max(GC_YOUNG_THRESHOLD, young), older, oldest)
        _gc_tuned = True


def _freeze_start_up_objects(**_: Any) -> None:
    """One of eventbuffer's workers ready (or its pool's process started): what start-up
    made stays, so it is left out of every collection from now on (`gc.freeze`)."""
    if _gc_tuned:
        gc.freeze()


def set_up(app: Celery) -> None:
    """Wire `app`'s process-wide hooks: nothing of this is done on importing a module.

    - its workers and Beat consume a Redis broker with the reliable transport
      (`worker.broker.selection`);
    - its workers serve Prometheus metrics (`worker.observability`);
    - its workers keep task arguments raw until a task decodes them (`worker.bodies`);
    - its workers collect garbage less often, leaving start-up's objects out.
    """
    from worker import observability
    from worker.broker import selection

    selection.install(app, _process_settings)
    observability.install(app)
    signals.worker_init.connect(
        partial(_decode_task_bodies_lazily, app),
        weak=False,
        dispatch_uid=f"eventbuffer-bodies-{id(app)}",
    )
    signals.worker_init.connect(
        partial(_tune_garbage_collector, app),
        weak=False,
        dispatch_uid=f"eventbuffer-gc-{id(app)}",
    )
    signals.worker_ready.connect(
        _freeze_start_up_objects, weak=False, dispatch_uid="eventbuffer-gc-freeze"
    )
    signals.worker_process_init.connect(
        _freeze_start_up_objects, weak=False, dispatch_uid="eventbuffer-gc-freeze-child"
    )


# The application `celery -A worker` runs. Celery imports its configuration
# module (worker/celeryconfig.py, built from the environment) when it first
# needs it, not at import: importing this module never fails, and a bad
# setting stops the worker with one line where the configuration is first used.
app = _new_app()
app.config_from_object("worker.celeryconfig")
set_up(app)
