"""The one Celery application: queues, routes, serialization and delivery.

- Two queues: `ingest` (event tasks) and `flush` (buffer maintenance), so
  each can get its own workers.
- JSON only: task bodies are plain JSON and pickle is never accepted.
- Ingest tasks are acknowledged late and rejected when their worker dies,
  so a killed worker's task is delivered again; the apply script skips a
  batch id (the task id) it has already applied.
- Task modules are named by string (`include`): `worker` never imports `tasks`.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

from celery import Celery
from kombu.entity import Exchange, Queue

from beat_schedule import beat_schedule
from worker.settings import Settings

INGEST_QUEUE = "ingest"
FLUSH_QUEUE = "flush"

TASK_INGEST_EVENT = "eventbuffer.ingest_event"
TASK_INGEST_EVENTS = "eventbuffer.ingest_events"
TASK_PROCESS_BUFFER = "eventbuffer.process_buffer"
TASK_SWEEP = "eventbuffer.sweep"
TASK_MODULES = ["tasks.ingest", "tasks.flush", "tasks.sweep"]


def redis_transport_options(visibility_timeout_s: int, consumer_timeout_s: int) -> dict[str, int]:
    """Redis broker: when an unacknowledged task (its worker died) is delivered again.

    The reliable transport (eventbuffer's workers, `worker.broker`) puts a
    dead worker's tasks back once its heartbeat is `consumer_timeout` old.
    kombu's stock transport sweeps for tasks unacknowledged longer than the
    visibility timeout, every `interval x throttle` seconds (100 s by
    default); sweep ten times per visibility timeout so a lost task comes
    back within ~1.1 timeouts. A worker killed during a sweep leaves the
    sweep's mutex behind: let it expire with the timeout instead of kombu's
    fixed 300 s. AMQP brokers ignore these options: they redeliver as soon
    as the dead worker's connection closes.
    """
    return {
        "consumer_timeout": consumer_timeout_s,
        "visibility_timeout": visibility_timeout_s,
        "unacked_restore_interval": max(1, visibility_timeout_s // 10),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": min(300, visibility_timeout_s),
    }


def redis_tls_options(url: str) -> dict[str, Any] | None:
    """TLS options for a `rediss://` URL that does not say how to verify the server.

    With `ssl_cert_reqs` in the URL (`?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem`,
    as redis-py, kombu and Celery all read it), the URL says it all: None.
    Without it, kombu would connect without verifying the certificate and
    Celery's result backend refuses the URL: verify against the system's CAs,
    as redis-py does for the buffer's own connection.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss" or "ssl_cert_reqs" in parse_qs(parts.query):
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration that follows from eventbuffer's settings."""
    tls: dict[str, Any] = {}
    if (broker_tls := redis_tls_options(settings.effective_broker_url)) is not None:
        tls["broker_use_ssl"] = broker_tls
    if (backend_tls := redis_tls_options(settings.effective_result_backend)) is not None:
        tls["redis_backend_use_ssl"] = backend_tls
    return dict(
        **tls,
        broker_url=settings.effective_broker_url,
        result_backend=settings.effective_result_backend,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_queues=(
            Queue(INGEST_QUEUE, Exchange(INGEST_QUEUE), routing_key=INGEST_QUEUE),
            Queue(FLUSH_QUEUE, Exchange(FLUSH_QUEUE), routing_key=FLUSH_QUEUE),
        ),
        task_default_queue=INGEST_QUEUE,
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
        broker_connection_retry_on_startup=True,
        broker_transport_options=redis_transport_options(
            settings.visibility_timeout_s, settings.consumer_timeout_s
        ),
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        # Task events cost ~5% of ingest throughput; Flower turns them on itself
        # (`celery -A worker control enable_events` does the same by hand).
        task_send_sent_event=False,
        worker_send_task_events=False,
        beat_schedule=beat_schedule(settings.flush_interval_s, settings.sweep_interval_s),
        timezone="UTC",
    )


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from `settings` (tests, tools)."""
    app = Celery("eventbuffer", include=TASK_MODULES)
    app.conf.update(celery_config(settings))
    return app


# The application `celery -A worker` runs. Celery imports its configuration
# module (worker/celeryconfig.py, built from the environment) when it first
# needs it, not at import: importing `worker` never fails, and a bad setting
# raises SettingsError where the configuration is first used.
app = Celery("eventbuffer", include=TASK_MODULES)
app.config_from_object("worker.celeryconfig")

# Structured logs and the Prometheus endpoint: Celery signal handlers.
# Workers consume a Redis broker with the reliable transport (a signal handler).
import worker.broker.selection  # noqa: E402
import worker.observability  # noqa: E402, F401
