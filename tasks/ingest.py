"""eventbuffer.ingest_event / eventbuffer.ingest_events: validate, then apply in one Lua call.

What a failure does (the batch is never dropped):

- Redis unavailable in a way that heals (`worker.redis_errors`: a failover,
  or a master whose replicas have not confirmed the batch): the task is
  retried with backoff capped at a minute, for as long as it takes; the batch
  stays in the broker meanwhile.
- Anything else (a Lua error, a key of the wrong type, a bug): retried
  `UNEXPECTED_ATTEMPTS - 1` times, then the raw batch becomes one
  `ingest_failed` dead letter (`eventbuffer dlq list`; `dlq replay` once the
  cause is fixed). If even that cannot be stored, the task keeps retrying.

Every retry reuses the task id, which is the batch id: the batch markers make
a retry of a batch that was in fact applied harmless.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from celery import Task

from worker import metrics, runtime
from worker.celery import app
from worker.deadletters import REASON_INGEST_FAILED
from worker.ingest import IngestResult, batch_bytes, dead_letter_batch, ingest
from worker.names import FLUSH_QUEUE, TASK_INGEST_EVENT, TASK_INGEST_EVENTS, TASK_PROCESS_BUFFER
from worker.redis_errors import is_transient

log = logging.getLogger(__name__)

# Unexpected failures of one batch before it is dead-lettered (deliveries count).
UNEXPECTED_ATTEMPTS = 3
# Counts them across retries, in the retried message's headers.
FAILURES_HEADER = "eventbuffer_failures"
RETRY_MAX_S = 60

DELIVERY = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "max_retries": None,
    # A message whose arguments do not fit the task becomes a dead letter (worker/consumer.py).
    "Strategy": "worker.consumer:ingest_strategy",
}


def backoff_s(retries: int) -> float:
    """1 s, 2 s, 4 s ... capped at a minute, with jitter so retries do not come in step."""
    return float(random.uniform(0.5, 1.0) * min(RETRY_MAX_S, 2**retries))


def _failures(task: Task) -> int:
    headers = task.request.headers or {}
    try:
        return int(headers.get(FAILURES_HEADER, 0))
    except (TypeError, ValueError):
        return 0


def _run(task: Task, payload: Any, batch_id: str | None) -> dict[str, Any]:
    batch = batch_id or task.request.id
    started = time.perf_counter()
    try:
        result = ingest(runtime.buffer(), payload, batch)
    except Exception as exc:
        if not is_transient(exc):
            return _unexpected(task, payload, batch, exc)
        metrics.record_ingest_failure("transient")
        delay = backoff_s(task.request.retries)
        log.warning(
            "batch %s: Redis unavailable (%s: %s); retry in %.0f s",
            batch,
            type(exc).__name__,
            exc,
            delay,
        )
        raise task.retry(exc=exc, countdown=delay) from None
    metrics.record_ingest(result, time.perf_counter() - started)
    if result.invalid:
        log.warning("batch %s: %d invalid event(s) dead-lettered", result.batch_id, result.invalid)
    if result.duplicate:
        log.info("batch %s was applied before: skipped", result.batch_id)
    _maybe_request_flush(result)
    return result.as_dict()


def _unexpected(task: Task, payload: Any, batch: str, exc: Exception) -> dict[str, Any]:
    """Retry a few times; then keep the raw batch as a dead letter (never drop it)."""
    failures = _failures(task) + 1
    metrics.record_ingest_failure("unexpected")
    error = f"{type(exc).__name__}: {exc}"
    if failures < UNEXPECTED_ATTEMPTS:
        log.warning(
            "batch %s failed (%d of %d attempts): %s; retrying",
            batch,
            failures,
            UNEXPECTED_ATTEMPTS,
            error,
        )
        headers = {FAILURES_HEADER: failures}
        raise task.retry(exc=exc, countdown=backoff_s(failures - 1), headers=headers) from None
    try:
        stored = dead_letter_batch(
            runtime.buffer(),
            batch_bytes(payload),
            batch,
            reason=REASON_INGEST_FAILED,
            error=error,
            task=task.name,
        )
    except Exception as store_exc:
        log.error(
            "batch %s failed %d times (%s) and could not be dead-lettered (%s); retrying",
            batch,
            failures,
            error,
            store_exc,
        )
        headers = {FAILURES_HEADER: failures}
        raise task.retry(exc=exc, countdown=RETRY_MAX_S, headers=headers) from None
    if stored:
        metrics.record_batch_dead_lettered(REASON_INGEST_FAILED)
    log.error(
        "batch %s failed %d times: dead-lettered whole as %s (eventbuffer dlq list)",
        batch,
        failures,
        REASON_INGEST_FAILED,
        exc_info=exc,
    )
    return {"batch_id": batch, "dead_lettered": True, "error": error}


def _maybe_request_flush(result: IngestResult) -> None:
    """Back-pressure: past the high-water mark, ask for a flush now (one pending at most)."""
    settings = runtime.settings()
    if result.max_queue_length <= settings.high_water:
        return
    pending = runtime.buffer().keyspace.flush_pending
    if runtime.redis_client().set(pending, result.batch_id, nx=True, ex=settings.lock_ttl_s):
        app.send_task(TASK_PROCESS_BUFFER, queue=FLUSH_QUEUE)


@app.task(name=TASK_INGEST_EVENTS, bind=True, **DELIVERY)
def ingest_events(self: Task, events: list[dict[str, Any]], batch_id: str | None = None) -> Any:
    return _run(self, events, batch_id)


@app.task(name=TASK_INGEST_EVENT, bind=True, **DELIVERY)
def ingest_event(self: Task, event: dict[str, Any], batch_id: str | None = None) -> Any:
    return _run(self, [event], batch_id)
