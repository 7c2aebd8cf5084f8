"""The names eventbuffer's tasks and queues are known by.

These are public: producer apps (in any language) send tasks by these
names, and Beat schedules them. The Celery app, the producer client and
`beat_schedule.py` all take them from here, and this module imports nothing,
so a producer app can use them without loading eventbuffer's Celery app.
"""

from __future__ import annotations

INGEST_QUEUE = "ingest"
FLUSH_QUEUE = "flush"
# Celery's own default queue: where a task sent by name without `queue=` lands
# when the sending app has no routes. Ingest workers consume it too.
DEFAULT_QUEUE = "celery"

TASK_INGEST_EVENT = "eventbuffer.ingest_event"
TASK_INGEST_EVENTS = "eventbuffer.ingest_events"
TASK_PROCESS_BUFFER = "eventbuffer.process_buffer"
TASK_SWEEP = "eventbuffer.sweep"
# Every task name this project registers starts with this.
TASK_PREFIX = "eventbuffer."
