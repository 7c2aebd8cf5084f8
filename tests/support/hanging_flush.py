"""eventbuffer whose INSERTs wait longer than its settings say: a Celery app for the time
limit's test.

    celery -A tests.support.hanging_flush worker -Q flush -P prefork -c 1 ...

The sink every flush of the process opens (`worker.runtime.sink`) is the real one
the settings name, except that its insert timeout is `SINK_INSERT_TIMEOUT_S` from the
environment (e.g. 300: an INSERT into a frozen server waits as if no timeout fired), so
that only `process_buffer`'s time limit can end a run stuck in it.
"""

from __future__ import annotations

import os

from worker import runtime
from worker.celery import app
from worker.sinks import Sink, open_sink

__all__ = ["app"]


def _hanging_sink() -> Sink:
    settings = runtime.settings()
    return open_sink(
        settings.clickhouse_url,
        settings.clickhouse_table,
        connect_timeout_s=settings.clickhouse_connect_timeout_s,
        insert_timeout_s=float(os.environ["SINK_INSERT_TIMEOUT_S"]),
    )


runtime.sink = _hanging_sink  # what runtime.flusher() builds its flusher with
