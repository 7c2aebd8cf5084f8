"""eventbuffer.process_buffer: one flush of every shard, each under its own lock."""

from __future__ import annotations

import logging
from typing import Any

from worker import runtime
from worker.celery_app import TASK_PROCESS_BUFFER, app
from worker.flush import FlushResult
from worker.lock import LockLostError
from worker.sinks import SinkError

log = logging.getLogger(__name__)


def flush_all() -> dict[str, Any]:
    """Flush each shard once; a failing shard is reported and the others still run."""
    flusher = runtime.flusher()
    runtime.redis_client().delete(flusher.keyspace.flush_pending)
    shards: list[dict[str, Any]] = []
    for shard in flusher.keyspace.all():
        try:
            result = flusher.flush_shard(shard.shard)
        except (SinkError, LockLostError) as exc:
            log.error("flush of shard %d failed, will retry next run: %s", shard.shard, exc)
            shards.append({**FlushResult(shard=shard.shard).as_dict(), "error": str(exc)})
            continue
        shards.append(result.as_dict())
        if result.batches:
            log.info(
                "flushed shard %d: %d rows, %d dead, %d batches (%d re-driven) in %.3fs",
                shard.shard,
                result.rows,
                result.dead,
                result.batches,
                result.redriven,
                result.seconds,
            )
    return {
        "rows": sum(s["rows"] for s in shards),
        "dead": sum(s["dead"] for s in shards),
        "locked": all(s["locked"] for s in shards),
        "errors": sum(1 for s in shards if "error" in s),
        "shards": shards,
    }


@app.task(name=TASK_PROCESS_BUFFER, ignore_result=False, acks_late=False)
def process_buffer() -> dict[str, Any]:
    return flush_all()
