"""eventbuffer's worker app with a fault injected into ingest, for tests of unexpected failures.

Run as `celery -A tests.support.faulty_worker worker`. A batch whose first
event has project_id:

- `fail-always` raises redis-py's `RedisClusterException` (not a RedisError)
  on every attempt;
- `fail-once` raises it on its first attempt only (counted in Redis).

Everything else is ingested as usual.
"""

from __future__ import annotations

from typing import Any

import msgspec
from redis.exceptions import RedisClusterException

import tasks.ingest as ingest_tasks
from worker import runtime
from worker.buffer import EventBuffer
from worker.celery import app
from worker.ingestion import IngestResult

__all__ = ["app"]

_real_ingest = ingest_tasks.ingest


def _first_project(payload: Any) -> str:
    if isinstance(payload, msgspec.Raw):  # the worker leaves task arguments raw
        payload = msgspec.json.decode(payload)
    if isinstance(payload, list) and payload and isinstance(payload[0], dict):
        return str(payload[0].get("project_id", ""))
    return ""


def _faulty_ingest(buffer: EventBuffer, payload: Any, batch_id: str, *a: Any) -> IngestResult:
    project = _first_project(payload)
    if project == "fail-always":
        raise RedisClusterException("injected: fails every time")
    if project == "fail-once" and runtime.redis_client().incr(f"test:attempts:{batch_id}") == 1:
        raise RedisClusterException("injected: fails the first time")
    return _real_ingest(buffer, payload, batch_id, *a)


ingest_tasks.ingest = _faulty_ingest  # type: ignore[assignment]
