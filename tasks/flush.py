"""eventbuffer.process_buffer: one flush of every shard, each under its own lock."""

from __future__ import annotations

from typing import Any

from worker import runtime
from worker.celery import app
from worker.names import TASK_PROCESS_BUFFER


@app.task(name=TASK_PROCESS_BUFFER, ignore_result=False, acks_late=False)
def process_buffer() -> dict[str, Any]:
    return runtime.flusher().process_buffer().as_dict()
