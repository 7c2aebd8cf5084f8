"""The prefork pool of eventbuffer's workers: a retired pool process is replaced at once.

Celery's prefork pool replaces a process that exits after
`--max-tasks-per-child` in its periodic maintenance, which runs every 5 s:
the exiting process reports its end and then pauses a second before it
exits, so the exit itself finds nobody listening, and until the next round
the worker has no process to run tasks in. The flush worker on embedded
ClickHouse retires its process every 10 flushes (chDB keeps memory for
every session it opens and closes), so at a 1 s flush interval those
gaps stalled the flush for up to 5 s every 10 s (`benchmarks/bench_e2e.py`
measures the latency; its figures are in the README's Benchmarks).

This pool is Celery's own with that maintenance every half second: the
replacement starts within ~0.5 s of the exit. The celeryconfig names it as
`worker_pool`, which `celery worker` uses for the default `-P prefork`;
other pools (`-P solo`, `-P threads`) are untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool as PreforkTaskPool

MAINTAIN_INTERVAL_S = 0.5


class PromptAsynPool(AsynPool):  # type: ignore[misc]
    """Celery's asynchronous prefork pool, maintained every MAINTAIN_INTERVAL_S."""

    @property
    def timers(self) -> dict[Callable[[], Any], float]:
        return {self.maintain_pool: MAINTAIN_INTERVAL_S}


class TaskPool(PreforkTaskPool):  # type: ignore[misc]
    """`-P prefork` with `PromptAsynPool`."""

    Pool = PromptAsynPool
