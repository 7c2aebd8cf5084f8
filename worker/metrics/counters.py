"""Prometheus counters and histograms: what the workers did.

They are recorded by the Celery tasks (`tasks/`) and the flusher from their
result objects (`IngestResult` and `FlushResult`, read as an `IngestOutcome` and
a `FlushOutcome`: this module imports neither the ingest nor the flush), through
`record_ingest()`, `record_flush()` and the other `record_*` functions. Under
the prefork pool every pool process counts in its own files in
`PROMETHEUS_MULTIPROC_DIR` (prometheus-client's multiprocess mode, set up by
`worker/observability.py` before the pool forks) and the worker's HTTP endpoint
sums them (`worker.metrics.exposition`). Each series' meaning is its help text
below; the README's Observability section lists them all.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, values

from worker.deadletters import (
    REASON_BATCH_ID_CONFLICT,
    REASON_INGEST_FAILED,
    REASON_INVALID_EVENT,
    REASON_UNDELIVERABLE,
    REASONS,
)
from worker.events import KIND_NAMES

PREFIX = "eventbuffer"
DEAD_LETTER_REASONS = REASONS
INGEST_OUTCOMES = ("applied", "duplicate", "dead_lettered", REASON_BATCH_ID_CONFLICT)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

FLUSH_SUCCESS = "success"
FLUSH_ERROR = "error"
FLUSH_LOCKED = "locked"
FLUSH_BACKOFF = "backoff"
PHASES = ("claim", "insert", "ack")

APPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHUNK_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class Metrics:
    """The counters and histograms, in `registry` (each process has its own set)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=registry)

        def histogram(
            name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
        ) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, labels, registry=registry, buckets=buckets)

        self.events_applied = counter(
            "events_applied", "Events applied to the buffer, by kind.", ("kind",)
        )
        self.ingest_batches = counter(
            "ingest_batches",
            "Ingest batches: applied, duplicate (skipped), dead_lettered (after failures), "
            "batch_id_conflict (id applied before with other content: kept whole).",
            ("outcome",),
        )
        self.batch_id_conflicts = counter(
            "batch_id_conflicts",
            "Batches whose id had been applied before with other content (a producer reusing "
            "batch ids), kept whole as batch_id_conflict dead letters.",
        )
        self.ingest_failures = counter(
            "ingest_failures",
            "Failed ingest attempts: transient (retried), unexpected (dead-lettered at the end).",
            ("kind",),
        )
        self.ingest_pauses = counter(
            "ingest_pauses",
            "Times an ingest process paused because Redis refused writes (full, or away).",
        )
        self.ingest_paused_seconds = counter(
            "ingest_paused_seconds",
            "Seconds ingest tasks spent waiting for Redis to take writes again.",
        )
        self.apply_seconds = histogram(
            "apply_seconds", "Time to validate and apply one ingest batch.", APPLY_BUCKETS
        )
        self.events_late = counter(
            "events_late",
            "Session events that reached their session after the reorder window had passed "
            "their place (queued at once; see EVENT_BUFFER_REORDER_WINDOW_MS).",
        )
        self.events_flushed = counter("events_flushed", "Rows written to ClickHouse.")
        self.dead_letters = counter("dead_letters", "Dead letters stored, by reason.", ("reason",))
        self.flush_runs = counter(
            "flush_runs",
            "Shard flushes, by result: success, error, locked, backoff.",
            ("result",),
        )
        self.flush_lock_skips = counter(
            "flush_lock_skips", "Shard flushes skipped because another flusher held the lock."
        )
        self.flush_lock_takeovers = counter(
            "flush_lock_takeovers",
            "Flush locks taken over from a dead holder (process gone, or heartbeat stale).",
        )
        self.flush_stalls = counter(
            "flush_stalls",
            "Flushes that made no progress for EVENT_BUFFER_FLUSH_STALL_S and gave their lock up.",
        )
        self.flush_batches = counter("flush_batches", "Claims flushed and acknowledged.")
        self.flush_redriven = counter(
            "flush_redriven", "Claims re-driven after a flush left them open."
        )
        self.flush_phase_seconds = histogram(
            "flush_phase_seconds",
            "Time in each flush phase (claim, insert, ack), per shard flush.",
            PHASE_BUCKETS,
            ("phase",),
        )
        self.flush_seconds = histogram(
            "flush_seconds", "Time of one shard flush, lock to release.", PHASE_BUCKETS
        )
        self.insert_chunk_rows = histogram(
            "insert_chunk_rows", "Rows per ClickHouse INSERT.", CHUNK_BUCKETS
        )
        # Every known label value exists from the start, at 0: rates work from the first scrape.
        for kind in KIND_NAMES.values():
            self.events_applied.labels(kind)
        for outcome in INGEST_OUTCOMES:
            self.ingest_batches.labels(outcome)
        for kind in ("transient", "unexpected"):
            self.ingest_failures.labels(kind)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason)
        for result in (FLUSH_SUCCESS, FLUSH_ERROR, FLUSH_LOCKED, FLUSH_BACKOFF):
            self.flush_runs.labels(result)
        for phase in PHASES:
            self.flush_phase_seconds.labels(phase)

    def collectors(self) -> list[Counter | Histogram]:
        return [m for m in vars(self).values() if isinstance(m, Counter | Histogram)]


_lock = threading.Lock()
_metrics: Metrics | None = None


def metrics() -> Metrics:
    """This process's metrics, created on first use (after the pool forked)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = Metrics(CollectorRegistry())
        return _metrics


def multiprocess_dir() -> str | None:
    path = os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())
    return path or None


def enable_multiprocess(path: str) -> None:
    """Count in files under `path` from now on, in this process and the ones it forks.

    prometheus-client picks its value class when it is imported, which in a
    worker is before `worker_init` (the task modules import this module):
    pick it again now, and forget metrics created with the old one.
    """
    global _metrics
    os.environ[MULTIPROC_ENV] = path
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    with _lock:
        _metrics = None


# -- recording (called by tasks/) -------------------------------------------------------


class IngestOutcome(Protocol):
    """What `record_ingest` reads of one batch's ingest (`worker.ingestion.IngestResult`).

    Described here rather than imported: the ingest records into this module,
    so this module does not depend on the ingest.
    """

    @property
    def duplicate(self) -> bool: ...
    @property
    def undeliverable(self) -> bool: ...
    @property
    def conflict(self) -> bool: ...
    @property
    def invalid(self) -> int: ...
    @property
    def kinds(self) -> Mapping[str, int]: ...


def record_ingest(result: IngestOutcome, seconds: float) -> None:
    m = metrics()
    m.apply_seconds.observe(seconds)
    if result.duplicate:
        m.ingest_batches.labels("duplicate").inc()
        return
    if result.undeliverable:  # its batch_id was no string: kept whole, as a task body
        m.dead_letters.labels(REASON_UNDELIVERABLE).inc()
        return
    if result.conflict:  # kept whole as a dead letter: its invalid items are in it
        m.ingest_batches.labels(REASON_BATCH_ID_CONFLICT).inc()
        m.batch_id_conflicts.inc()
        m.dead_letters.labels(REASON_BATCH_ID_CONFLICT).inc()
    else:
        m.ingest_batches.labels("applied").inc()
    for kind, count in result.kinds.items():
        if count:
            m.events_applied.labels(kind).inc(count)
    if result.invalid and not result.conflict:
        m.dead_letters.labels(REASON_INVALID_EVENT).inc(result.invalid)


def record_ingest_failure(kind: str) -> None:
    metrics().ingest_failures.labels(kind).inc()


def record_ingest_pause() -> None:
    """An ingest process paused: Redis refused a batch for a reason that heals by waiting."""
    metrics().ingest_pauses.inc()


def record_ingest_paused_seconds(seconds: float) -> None:
    metrics().ingest_paused_seconds.inc(seconds)


def record_batch_dead_lettered(reason: str) -> None:
    """A whole batch (or task message) was kept as one dead letter."""
    m = metrics()
    m.dead_letters.labels(reason).inc()
    if reason == REASON_INGEST_FAILED:
        m.ingest_batches.labels("dead_lettered").inc()


def record_late(count: int) -> None:
    """Held session events released after their place had passed (by a flush's release)."""
    metrics().events_late.inc(count)


class FlushOutcome(Protocol):
    """What `record_flush` reads of one shard's flush (`worker.flusher.FlushResult`).

    Described here rather than imported: the flusher records into this module,
    so this module does not depend on the flusher.
    """

    @property
    def locked(self) -> bool: ...
    @property
    def took_over(self) -> str | None: ...
    @property
    def backoff_s(self) -> float: ...
    @property
    def rows(self) -> int: ...
    @property
    def batches(self) -> int: ...
    @property
    def redriven(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def claim_seconds(self) -> float: ...
    @property
    def insert_seconds(self) -> float: ...
    @property
    def ack_seconds(self) -> float: ...
    @property
    def chunk_rows(self) -> Sequence[int]: ...
    @property
    def dead_reasons(self) -> Mapping[str, int]: ...


def record_flush(result: FlushOutcome) -> None:
    m = metrics()
    if result.backoff_s > 0:
        m.flush_runs.labels(FLUSH_BACKOFF).inc()
        return
    if not result.locked:
        m.flush_runs.labels(FLUSH_LOCKED).inc()
        m.flush_lock_skips.inc()
        return
    m.flush_runs.labels(FLUSH_SUCCESS).inc()
    if result.took_over is not None:
        m.flush_lock_takeovers.inc()
    m.flush_seconds.observe(result.seconds)
    m.flush_phase_seconds.labels("claim").observe(result.claim_seconds)
    if result.chunk_rows or result.ack_seconds:  # the shard had something to flush
        m.flush_phase_seconds.labels("insert").observe(result.insert_seconds)
        m.flush_phase_seconds.labels("ack").observe(result.ack_seconds)
    for rows in result.chunk_rows:
        m.insert_chunk_rows.observe(rows)
    if result.rows:
        m.events_flushed.inc(result.rows)
    if result.batches:
        m.flush_batches.inc(result.batches)
    if result.redriven:
        m.flush_redriven.inc(result.redriven)
    for reason, count in result.dead_reasons.items():
        if count:
            m.dead_letters.labels(reason).inc(count)


def record_flush_error() -> None:
    metrics().flush_runs.labels(FLUSH_ERROR).inc()


def record_flush_stall() -> None:
    """A flush's lock watchdog gave the lock up: no progress for the stall bound."""
    metrics().flush_stalls.inc()
