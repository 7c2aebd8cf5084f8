"""Celery Beat's schedule: plain data, read by the Celery app.

- `process_buffer` every `EVENT_BUFFER_FLUSH_INTERVAL_S` seconds (OpenPanel's
  cron interval, 10 s by default);
- `sweep` every `EVENT_BUFFER_SWEEP_INTERVAL_S` seconds: quiet sessions' last
  views are queued before they expire, stale visitors are pruned.

Both run on the `flush` queue. Run exactly one Beat; a second one by mistake
only doubles the ticks, and the per-shard lock turns the extra flushes into
no-ops (an extra sweep finds nothing left to do). Each tick expires after one
interval, so ticks that pile up while no flush worker runs are dropped
instead of running in a burst.
"""

from __future__ import annotations

from typing import Any

from worker.names import FLUSH_QUEUE, TASK_PROCESS_BUFFER, TASK_SWEEP


def beat_schedule(flush_interval_s: int, sweep_interval_s: int = 60) -> dict[str, dict[str, Any]]:
    return {
        "process-buffer": {
            "task": TASK_PROCESS_BUFFER,
            "schedule": float(flush_interval_s),
            "options": {"queue": FLUSH_QUEUE, "expires": float(flush_interval_s)},
        },
        "sweep": {
            "task": TASK_SWEEP,
            "schedule": float(sweep_interval_s),
            "options": {"queue": FLUSH_QUEUE, "expires": float(sweep_interval_s)},
        },
    }
