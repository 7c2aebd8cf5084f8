"""eventbuffer.ingest_event / eventbuffer.ingest_events: validate, then apply in one Lua call.

What a failure does (the batch is never dropped, and no failure publishes a
new message: the broker may be the very Redis that is full, and Celery's
`Task.retry()` loses the task when its publish is refused):

- Redis refuses the batch in a way that heals (`worker.redis_errors`: full
  at maxmemory, a failover, a master whose replicas have not confirmed the
  batch): the task waits in place, its message unacknowledged, and tries
  again with backoff capped at `worker.pause.MAX_WAIT_S`, for as long as it
  takes. Its worker fetches nothing more meanwhile (`worker/pause.py`: one
  log line when the pause starts, one when it ends). A worker told to stop
  gives the message back to its queue.
- Anything else (a Lua error, a key of the wrong type, a bug): tried
  `UNEXPECTED_ATTEMPTS` times in all, then the raw batch becomes one
  `ingest_failed` dead letter (`eventbuffer dlq list`; `dlq replay` once the
  cause is fixed). If even that cannot be stored, it waits as above
  (`worker/dead_batches.py`: the same policy as the consumer's).

A redelivered task keeps its id, which is the batch id: the batch markers
make a redelivery of a batch that was in fact applied harmless.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task
from celery.exceptions import Reject

from worker import metrics, runtime
from worker.bodies import batch_bytes
from worker.celery import app
from worker.dead_batches import keep_batch
from worker.deadletters import REASON_INGEST_FAILED
from worker.ingestion import IngestResult, ingest
from worker.names import FLUSH_QUEUE, TASK_INGEST_EVENT, TASK_INGEST_EVENTS, TASK_PROCESS_BUFFER
from worker.pause import PAUSE, ShutdownRequested, wait_s
from worker.redis_errors import is_transient

log = logging.getLogger(__name__)

# Attempts at a batch that fails unexpectedly before it is dead-lettered.
UNEXPECTED_ATTEMPTS = 3

DELIVERY = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "max_retries": None,
    # A message whose arguments do not fit the task becomes a dead letter (worker/consumer.py).
    "Strategy": "worker.consumer:ingest_strategy",
}


def _run(task: Task, payload: Any, batch_id: str | None) -> dict[str, Any]:
    batch = batch_id or task.request.id
    failures = 0
    waits = 0
    while True:
        started = time.perf_counter()
        try:
            result = ingest(runtime.buffer(), payload, batch)
        except Exception as exc:
            if is_transient(exc):
                metrics.record_ingest_failure("transient")
                _wait(task, batch, exc, waits)
                waits += 1
                continue
            failures += 1
            metrics.record_ingest_failure("unexpected")
            if failures >= UNEXPECTED_ATTEMPTS:
                return _dead_letter(task, payload, batch, exc, failures)
            log.warning(
                "batch %s failed (%d of %d attempts): %s: %s; retrying",
                batch,
                failures,
                UNEXPECTED_ATTEMPTS,
                type(exc).__name__,
                exc,
            )
            time.sleep(wait_s(failures - 1))
            continue
        PAUSE.succeeded()
        break
    metrics.record_ingest(result, time.perf_counter() - started)
    if result.invalid:
        log.warning("batch %s: %d invalid event(s) dead-lettered", result.batch_id, result.invalid)
    if result.duplicate:
        log.info("batch %s was applied before: skipped", result.batch_id)
    _maybe_request_flush(result)
    return result.as_dict()


def _wait(task: Task, batch: str, exc: Exception, attempt: int) -> None:
    """Wait before the next attempt; a stopping worker gives the message back instead."""
    try:
        PAUSE.wait(batch, exc, attempt)
    except ShutdownRequested:
        log.warning("batch %s: the worker is stopping; its task goes back to its queue", batch)
        raise Reject(f"Redis refused batch {batch}: {exc}", requeue=True) from None


def _dead_letter(
    task: Task, payload: Any, batch: str, exc: Exception, failures: int
) -> dict[str, Any]:
    """Keep the raw batch as one dead letter (never drop it); wait while Redis refuses
    (`worker.dead_batches`: the failure policy the consumer follows too)."""
    error = f"{type(exc).__name__}: {exc}"
    raw = batch_bytes(payload)
    waits = 0
    while True:
        kept = keep_batch(
            runtime.buffer, raw, batch, reason=REASON_INGEST_FAILED, error=error, task=task.name
        )
        if kept.failed is not None:
            raise kept.failed
        if kept.retry is None:
            break
        if not waits:
            log.error(
                "batch %s failed %d times (%s) and could not be dead-lettered (%s); "
                "waiting until it can be",
                batch,
                failures,
                error,
                kept.retry,
            )
        _wait(task, batch, kept.retry, waits)
        waits += 1
    PAUSE.succeeded()
    log.error(
        "batch %s failed %d times: dead-lettered whole as %s (eventbuffer dlq list)",
        batch,
        failures,
        REASON_INGEST_FAILED,
        exc_info=exc,
    )
    return {"batch_id": batch, "dead_lettered": True, "error": error}


def _maybe_request_flush(result: IngestResult) -> None:
    """Back-pressure: past the high-water mark, ask for a flush now (one pending at most).

    Best effort: the batch is applied whatever happens here, so a failure is
    logged, never raised (the task must not fail, or run again, for it).
    The request expires with the pending marker, so requests sent while no
    flush worker runs do not pile up for it: Beat's schedule flushes anyway.
    """
    settings = runtime.settings()
    if result.max_queue_length <= settings.high_water:
        return
    pending = runtime.buffer().keyspace.flush_pending
    try:
        if runtime.redis_client().set(pending, result.batch_id, nx=True, ex=settings.lock_ttl_s):
            app.send_task(TASK_PROCESS_BUFFER, queue=FLUSH_QUEUE, expires=settings.lock_ttl_s)
    except Exception as exc:  # Redis full or away, the broker too: Beat's flush comes anyway
        log.info("batch %s: could not request an early flush: %s", result.batch_id, exc)


@app.task(name=TASK_INGEST_EVENTS, bind=True, **DELIVERY)
def ingest_events(self: Task, events: list[dict[str, Any]], batch_id: str | None = None) -> Any:
    return _run(self, events, batch_id)


@app.task(name=TASK_INGEST_EVENT, bind=True, **DELIVERY)
def ingest_event(self: Task, event: dict[str, Any], batch_id: str | None = None) -> Any:
    return _run(self, [event], batch_id)
