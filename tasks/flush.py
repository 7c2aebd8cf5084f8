"""eventbuffer.process_buffer: one flush of every shard, each under its own lock."""

from __future__ import annotations

import logging
from typing import Any

from worker import metrics, runtime
from worker.celery import app
from worker.flush import FlushResult
from worker.lock import LockLostError
from worker.names import TASK_PROCESS_BUFFER
from worker.sinks import SinkError

log = logging.getLogger(__name__)


def flush_fields(result: FlushResult) -> dict[str, Any]:
    """The structured fields of a shard's flush line (JSON logs)."""
    return {
        "shard": result.shard,
        "rows": result.rows,
        "dead": result.dead,
        "batches": result.batches,
        "redriven": result.redriven,
        "chunks": len(result.chunk_rows),
        "seconds": round(result.seconds, 4),
        "claim_seconds": round(result.claim_seconds, 4),
        "insert_seconds": round(result.insert_seconds, 4),
        "ack_seconds": round(result.ack_seconds, 4),
    }


def flush_all() -> dict[str, Any]:
    """Flush each shard once; a failing shard is reported and the others still run."""
    flusher = runtime.flusher()
    runtime.redis_client().delete(flusher.keyspace.flush_pending)
    shards: list[dict[str, Any]] = []
    for shard in flusher.keyspace.all():
        try:
            result = flusher.flush_shard(shard.shard)
        except (SinkError, LockLostError) as exc:
            metrics.record_flush_error()
            log.error(
                "flush of shard %d failed, will retry next run: %s",
                shard.shard,
                exc,
                extra={"shard": shard.shard, "error": str(exc)},
            )
            shards.append({**FlushResult(shard=shard.shard).as_dict(), "error": str(exc)})
            continue
        except Exception:
            metrics.record_flush_error()
            raise
        metrics.record_flush(result)
        shards.append(result.as_dict())
        if result.batches:
            log.info(
                "flushed shard %d: %d rows, %d dead, %d batches (%d re-driven) in %.3fs "
                "(claim %.3fs, insert %.3fs, ack %.3fs)",
                shard.shard,
                result.rows,
                result.dead,
                result.batches,
                result.redriven,
                result.seconds,
                result.claim_seconds,
                result.insert_seconds,
                result.ack_seconds,
                extra=flush_fields(result),
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
