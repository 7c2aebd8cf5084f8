"""eventbuffer.process_buffer: one flush of every shard, each under its own lock.

A run that stopped at `EVENT_BUFFER_MAX_BATCHES_PER_FLUSH` after a full claim
(more rows wait behind it) asks for another run at once, as ingest's
back-pressure does (one request pending at most), instead of leaving the rest
for Beat's next tick: a backlog drains at the flush's own pace, in runs of
bounded length, even once no ingest is left to ask for it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from tasks.summary import keep_summary
from worker import runtime
from worker.celery import app
from worker.names import FLUSH_QUEUE, TASK_PROCESS_BUFFER

log = logging.getLogger(__name__)


# Its summary is kept by keep_summary, not by Celery (whose failure to store it on a
# full Redis would fail the delivery).
@app.task(name=TASK_PROCESS_BUFFER, bind=True, ignore_result=True, acks_late=False)
def process_buffer(self: Task) -> dict[str, Any]:
    summary = runtime.flusher().process_buffer()
    if summary.more:
        _flush_again()
    return keep_summary(self, summary.as_dict())


def _flush_again() -> None:
    """Ask for another run now; best effort (Beat's tick comes anyway)."""
    settings = runtime.settings()
    pending = runtime.flusher().keyspace.flush_pending
    try:
        if runtime.redis_client().set(pending, "more", nx=True, ex=settings.lock_ttl_s):
            app.send_task(TASK_PROCESS_BUFFER, queue=FLUSH_QUEUE, expires=settings.lock_ttl_s)
    except Exception as exc:  # Redis full or away, the broker too
        log.info("could not ask for another flush at once: %s", exc)
