"""The maintenance tasks' results: each run's summary, kept best effort.

`process_buffer` and `sweep` return a summary that Flower and
`AsyncResult.get()` show (kept `result_expires`, an hour). Celery stores a
task's result itself, and when that write fails (a Redis at maxmemory
refuses it) it fails the delivery, which crashes a solo worker: the very
flush that was freeing the memory. So these tasks ignore their results
and store the summary here, where a refused write is logged and forgotten.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, states

log = logging.getLogger(__name__)


def keep_summary(task: Task, summary: dict[str, Any]) -> dict[str, Any]:
    """Store `summary` as the task's result if the result backend takes it; return it."""
    if task.request.called_directly:  # a plain call: no task id, nobody waits for it
        return summary
    try:
        task.backend.store_result(task.request.id, summary, states.SUCCESS, request=task.request)
    except Exception as exc:  # the flush it summarises is done; only the summary is lost
        log.warning("%s: its summary was not kept as a result: %s", task.name, exc)
    return summary
