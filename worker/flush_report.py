"""What a flush did: a result per shard, a summary per `process_buffer` run, its log lines.

Imports nothing of the flush nor of the metrics (worker/metrics.py reads these
results), so neither imports the other through it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from worker.errors import EventBufferError

# The flusher's logger: its lines keep the name they always had.
log = logging.getLogger("worker.flusher")


@dataclass
class FlushResult:
    """What one flush of one shard did."""

    shard: int
    locked: bool = True  # False: another flusher held the lock; nothing was done
    # "<host:pid>: <why>" when the lock was taken over from a dead holder.
    took_over: str | None = None
    # Seconds left of a back-off after ClickHouse failures; nothing was done.
    backoff_s: float = 0.0
    rows: int = 0  # rows sent to ClickHouse (duplicates of a re-drive are dropped there)
    # Rows queued by releasing held session events first (worker/reorder.py), and how
    # many of those events were late.
    released: int = 0
    late: int = 0
    dead: int = 0
    batches: int = 0
    redriven: int = 0
    claims: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Time spent in each phase, summed over the batches (for metrics and logs).
    claim_seconds: float = 0.0
    insert_seconds: float = 0.0
    ack_seconds: float = 0.0
    # Rows of every chunk inserted, in order.
    chunk_rows: list[int] = field(default_factory=list)
    # The run stopped at its batch limit with its last claim full: more rows wait.
    more: bool = False
    dead_reasons: Counter[str] = field(default_factory=Counter)
    # Why the flush of this shard stopped (ClickHouse, or the lock lost); None if it did not.
    error: EventBufferError | None = None

    def as_dict(self) -> dict[str, object]:
        shown: dict[str, object] = {"error": str(self.error)} if self.error is not None else {}
        if self.took_over is not None:
            shown["took_over"] = self.took_over
        return {
            **shown,
            "shard": self.shard,
            "locked": self.locked,
            "backoff_s": round(self.backoff_s, 3),
            "rows": self.rows,
            "dead": self.dead,
            "batches": self.batches,
            "redriven": self.redriven,
            "claims": list(self.claims),
            "seconds": round(self.seconds, 4),
            "phases": {
                "claim": round(self.claim_seconds, 4),
                "insert": round(self.insert_seconds, 4),
                "ack": round(self.ack_seconds, 4),
            },
        }


@dataclass
class FlushSummary:
    """One `process_buffer` run: a result per shard, failed shards included."""

    shards: list[FlushResult]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def dead(self) -> int:
        return sum(s.dead for s in self.shards)

    @property
    def more(self) -> bool:
        """A shard stopped at its batch limit with more rows waiting."""
        return any(s.more for s in self.shards)

    @property
    def errors(self) -> list[FlushResult]:
        return [s for s in self.shards if s.error is not None]

    def as_dict(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "dead": self.dead,
            "locked": all(s.locked for s in self.shards),
            "errors": len(self.errors),
            "shards": [s.as_dict() for s in self.shards],
        }


def flush_fields(result: FlushResult) -> dict[str, object]:
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


def log_flushed(result: FlushResult) -> None:
    """The line of a shard's flush that acknowledged at least one batch."""
    if not result.batches:
        return
    log.info(
        "flushed shard %d: %d rows, %d dead, %d batches (%d re-driven) in %.3fs "
        "(claim %.3fs, insert %.3fs, ack %.3fs)",
        result.shard,
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


def log_failed(shard: int, error: EventBufferError) -> None:
    """The line of a shard's flush that stopped; the next run retries it."""
    log.error(
        "flush of shard %d failed, will retry next run: %s",
        shard,
        error,
        extra={"shard": shard, "error": str(error)},
    )
