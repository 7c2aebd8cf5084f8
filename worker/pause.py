"""Ingest waiting out a Redis that refuses writes, in place, one pause per process.

When the buffer's Redis refuses a batch for a reason that heals by waiting
(full at `maxmemory`, a failover, replicas not confirming it:
`worker.redis_errors.is_transient`), the ingest task keeps its message
unacknowledged and tries again in the same process after a growing wait.
Nothing is published meanwhile: the broker is often that same full Redis,
and Celery's `Task.retry()` publishes a new message, which a full broker
refuses, and Celery then acknowledges the original (the task is lost).

While a task waits, its worker fetches nothing more (the solo pool runs one
task at a time; each prefork process holds its one), so a full Redis pauses
ingest instead of spinning: the backlog waits in the broker, and in the
consumer's keeping for the few messages it had prefetched.

A process logs the pause twice: one WARNING when its first attempt fails,
one INFO when an attempt succeeds again (brief pauses soon after a resume,
at the edge of maxmemory, are counted, not announced: `Pause`). Metrics
count pauses and the seconds spent waiting (`eventbuffer_ingest_pauses_total`,
`eventbuffer_ingest_paused_seconds_total`).

A worker told to stop (warm shutdown) while a task waits gives the message
back to its queue (`Reject(requeue=True)`) instead of waiting on: the
reliable transport's requeue runs on a full broker, and kombu's stock
transport leaves a requeue it cannot write in its unacknowledged set, which
it restores after the visibility timeout. No path drops the message.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from worker import metrics
from worker.errors import ShutdownRequested as ShutdownRequested
from worker.logs import one_line

log = logging.getLogger("worker.ingestion")

#: The longest wait between two attempts: a drain that made room is seen this quickly.
MAX_WAIT_S = 10.0
#: How often a waiting task looks for a shutdown request.
SHUTDOWN_POLL_S = 0.5


def wait_s(attempt: int, cap_s: float = MAX_WAIT_S) -> float:
    """1 s, 2 s, 4 s ... capped, with jitter so the workers of a fleet do not retry in step."""
    return float(random.uniform(0.5, 1.0) * min(cap_s, 2.0 ** max(0, attempt)))


@dataclass
class Pause:
    """One process's ingest pause: started by a failed attempt, ended by a successful one.

    At the edge of `maxmemory` Redis takes some batches and refuses others
    (each applied task frees its broker message), so a process may pause
    and resume every few seconds. A pause that starts within `quiet_s` of
    the last resume is not announced unless it lasts `quiet_s`: one pause
    line and one resume line per episode, the brief ones counted in the next.
    """

    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    # Polled while waiting: True once the worker should stop (Celery's shutdown flags).
    stopping: Callable[[], bool] = lambda: False
    quiet_s: float = 60.0
    since: float | None = None
    announced: bool = False
    resumed_at: float | None = None
    brief: int = 0  # pauses not announced since the last announced one
    kind: str = ""  # the error of the last announced pause
    waiting: int = 0  # tasks of this process waiting now (more than one on a thread pool)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def paused(self) -> bool:
        return self.since is not None

    def wait(self, batch_id: str, exc: BaseException, attempt: int) -> None:
        """After a transient failure of `batch_id`'s attempt number `attempt` (0 first):
        wait before the next one. Raises ShutdownRequested if the worker stops meanwhile."""
        with self._lock:
            now = self.clock()
            if self.since is None:
                self.since, self.announced = now, False
                metrics.record_ingest_pause()
                recent = self.resumed_at is not None and now - self.resumed_at < self.quiet_s
                if recent and type(exc).__name__ == self.kind:
                    self.brief += 1  # the same failure again, right after a resume
                else:
                    self._announce(batch_id, exc)
            elif not self.announced and now - self.since >= self.quiet_s:
                self.brief -= 1  # this one turned out not to be brief
                self._announce(batch_id, exc)
            elif self.announced and type(exc).__name__ != self.kind:
                # Another cause in the same pause (a failover's connection errors, then its
                # promoted master without replicas): one line per change, not per attempt.
                self.kind = type(exc).__name__
                log.info(
                    "ingest still paused, now: Redis refuses writes (%s: %s)",
                    self.kind,
                    one_line(exc),
                    extra={"batch_id": batch_id, "error": one_line(exc)},
                )
            self.waiting += 1
        try:
            self._sleep(wait_s(attempt))
        finally:
            with self._lock:
                self.waiting -= 1

    def _announce(self, batch_id: str, exc: BaseException) -> None:
        brief = f" ({self.brief} brief pause(s) before this one)" if self.brief else ""
        self.announced, self.brief, self.kind = True, 0, type(exc).__name__
        log.warning(
            "ingest paused: Redis refuses writes (%s: %s)%s. Tasks wait unacknowledged "
            "in the broker and are retried in place; nothing is lost. A full Redis frees "
            "memory as the flush writes the buffer to ClickHouse",
            type(exc).__name__,
            one_line(exc),
            brief,
            extra={"batch_id": batch_id, "error": one_line(exc)},
        )

    def _sleep(self, seconds: float) -> None:
        deadline = self.clock() + seconds
        while True:
            if self.stopping():
                raise ShutdownRequested()
            left = deadline - self.clock()
            if left <= 0:
                break
            step = min(left, SHUTDOWN_POLL_S)
            self.sleep(step)
            metrics.record_ingest_paused_seconds(step)

    def succeeded(self) -> None:
        """An attempt went through: end the pause, if there was one."""
        if self.since is None:
            return
        with self._lock:
            if self.since is None:
                return
            now = self.clock()
            paused_s, announced = now - self.since, self.announced
            self.since, self.resumed_at = None, now
        if announced:
            log.info(
                "ingest resumed: Redis takes writes again, after %.0f s paused",
                paused_s,
                extra={"paused_seconds": round(paused_s, 3)},
            )


def _celery_stopping() -> bool:
    """True once this worker process was told to stop (Celery sets these flags in the
    process that handles the signal: the solo pool's, or a thread pool's)."""
    from celery.worker import state

    return bool(state.should_stop is not None or state.should_terminate is not None)


#: The pause of this process's ingest tasks.
PAUSE = Pause(stopping=_celery_stopping)
