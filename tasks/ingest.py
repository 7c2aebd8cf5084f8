"""eventbuffer.ingest_event / eventbuffer.ingest_events: validate, then apply in one Lua call."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task
from redis.exceptions import RedisError

from worker import metrics, runtime
from worker.celery import app
from worker.ingest import IngestResult, ingest
from worker.names import FLUSH_QUEUE, TASK_INGEST_EVENT, TASK_INGEST_EVENTS, TASK_PROCESS_BUFFER

log = logging.getLogger(__name__)

# A Redis failure is retried (same task id, so the same batch id) with
# exponential backoff capped at a minute, for as long as it takes: events
# are never dropped because Redis was away.
RETRY = {
    "autoretry_for": (RedisError,),
    "retry_backoff": 1,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": None,
    "acks_late": True,
    "reject_on_worker_lost": True,
}


def _run(task: Task, payload: Any, batch_id: str | None) -> dict[str, Any]:
    started = time.perf_counter()
    result = ingest(runtime.buffer(), payload, batch_id or task.request.id)
    metrics.record_ingest(result, time.perf_counter() - started)
    if result.invalid:
        log.warning("batch %s: %d invalid event(s) dead-lettered", result.batch_id, result.invalid)
    if result.duplicate:
        log.info("batch %s was applied before: skipped", result.batch_id)
    _maybe_request_flush(result)
    return result.as_dict()


def _maybe_request_flush(result: IngestResult) -> None:
    """Back-pressure: past the high-water mark, ask for a flush now (one pending at most)."""
    settings = runtime.settings()
    if result.max_queue_length <= settings.high_water:
        return
    pending = runtime.buffer().keyspace.flush_pending
    if runtime.redis_client().set(pending, result.batch_id, nx=True, ex=settings.lock_ttl_s):
        app.send_task(TASK_PROCESS_BUFFER, queue=FLUSH_QUEUE)


@app.task(name=TASK_INGEST_EVENTS, bind=True, **RETRY)
def ingest_events(self: Task, events: list[dict[str, Any]], batch_id: str | None = None) -> Any:
    return _run(self, events, batch_id)


@app.task(name=TASK_INGEST_EVENT, bind=True, **RETRY)
def ingest_event(self: Task, event: dict[str, Any], batch_id: str | None = None) -> Any:
    return _run(self, [event], batch_id)
