"""eventbuffer.sweep: queue quiet sessions' last views, prune stale visitors."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from tasks.summary import keep_summary
from worker import runtime
from worker.celery import app
from worker.names import TASK_SWEEP
from worker.sweeper import Sweeper

log = logging.getLogger(__name__)


@app.task(name=TASK_SWEEP, bind=True, ignore_result=True, acks_late=False)
def sweep(self: Task) -> dict[str, Any]:
    result = Sweeper(runtime.redis_client(), runtime.settings()).sweep()
    if result.views_queued or result.visitors_pruned:
        log.info(
            "sweep: %d idle sessions' last views queued, %d stale visitors pruned",
            result.views_queued,
            result.visitors_pruned,
        )
    return keep_summary(self, result.as_dict())
