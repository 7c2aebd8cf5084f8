"""eventbuffer.process_buffer: one flush of every shard, each under its own lock."""

from __future__ import annotations

from typing import Any

from celery import Task

from tasks.summary import keep_summary
from worker import runtime
from worker.celery import app
from worker.names import TASK_PROCESS_BUFFER


# Its summary is kept by keep_summary, not by Celery (whose failure to store it on a
# full Redis would fail the delivery).
@app.task(name=TASK_PROCESS_BUFFER, bind=True, ignore_result=True, acks_late=False)
def process_buffer(self: Task) -> dict[str, Any]:
    return keep_summary(self, runtime.flusher().process_buffer().as_dict())
