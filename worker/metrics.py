"""Prometheus metrics: what the workers did (counters) and what the buffer holds (gauges).

Two sources, one `eventbuffer_` namespace:

- **Counters and histograms** are recorded by the Celery tasks (`tasks/`)
  from the result objects (`IngestResult`, `FlushResult`), through
  `record_ingest()`, `record_flush()` and `record_flush_error()`. Under the
  prefork pool every pool process counts in its own files in
  `PROMETHEUS_MULTIPROC_DIR` (prometheus-client's multiprocess mode, set up
  by `worker/observability.py` before the pool forks) and the worker's HTTP
  endpoint sums them.
- **Gauges** are read from Redis when scraped (`RedisCollector`), so they
  are true whichever process serves them, the one-shot `eventbuffer metrics`
  included.

Gauges (from Redis, at scrape time):

    eventbuffer_redis_up                            1 if Redis answered the scrape
    eventbuffer_buffer_depth{shard}                 rows in the queue (LLEN, claimed rows included)
    eventbuffer_claimed_in_flight{shard}            rows of the open claim (a flush in progress
                                                    or one left open by a failure), 0 if none
    eventbuffer_claim_age_seconds{shard}            age of the open claim, 0 if none
    eventbuffer_oldest_event_age_seconds{shard}     now - created_at of the row at the head of
                                                    the queue (the next row a flush claims);
                                                    0 when the queue is empty
    eventbuffer_dead_letter_depth{shard}            dead letters stored (LLEN)
    eventbuffer_held_sessions{shard}                sessions with screen_views or session_ends
                                                    held by the reorder window
                                                    (EVENT_BUFFER_REORDER_WINDOW_MS)
    eventbuffer_flush_lock_held{shard}              1 while a flusher holds the shard's lock
    eventbuffer_flush_lock_heartbeat_age_seconds{shard}
                                                    time since the lock's holder last extended
                                                    it (its watchdog's heartbeat); absent while
                                                    the lock is free or its holder does not say
    eventbuffer_flush_lock_stale{shard}             1 while the lock's heartbeat is stale (no
                                                    extension for two thirds of its TTL: the
                                                    holder looks dead, the next flush takes the
                                                    lock over), else 0
    eventbuffer_flush_backoff_seconds{shard}        time left of the shard's back-off after
                                                    ClickHouse failures, 0 if none
    eventbuffer_last_flush_timestamp_seconds{shard} when the shard's last batch was acknowledged
    eventbuffer_replicas{shard}                     replicas in sync with the master holding the
                                                    shard (on a cluster, or with
                                                    EVENT_BUFFER_MIN_REPLICAS; absent otherwise)
    eventbuffer_waiting_for_replicas{shard}         1 while that master has fewer replicas than
                                                    EVENT_BUFFER_MIN_REPLICAS: ingest of the shard
                                                    waits (tasks retry) and so do its flushes
    eventbuffer_flush_pending                       1 while a back-pressure flush is requested
    eventbuffer_flush_interval_seconds              EVENT_BUFFER_FLUSH_INTERVAL_S (for alerts)
    eventbuffer_active_visitors{project}            active visitors of the top
                                                    EVENT_BUFFER_METRICS_TOP_PROJECTS projects;
                                                    the rest summed under project="__other__"
    eventbuffer_active_projects                     projects with at least one active visitor
    eventbuffer_redis_used_memory_bytes{redis,node} INFO memory's used_memory of each master of
                                                    the buffer (redis="buffer") and of the
                                                    broker's Redis (redis="broker"; absent for
                                                    an AMQP broker or one that did not answer)
    eventbuffer_redis_maxmemory_bytes{redis,node}   its maxmemory; 0: no limit
    eventbuffer_redis_maxmemory_policy{redis,node,policy}
                                                    1, labelled with its maxmemory-policy
                                                    (anything but noeviction loses events
                                                    at maxmemory)

Gauges of a Redis broker's reliable transport (absent for RabbitMQ, or when
the broker does not answer; see worker/broker/holdings.py):

    eventbuffer_broker_tasks_held{consumer}         tasks fetched and not acknowledged, in no
                                                    queue: consumer="live" (being run or
                                                    prefetched), "dead" (their worker's heartbeat
                                                    deadline passed: waiting to be put back)
    eventbuffer_broker_recovery_due_seconds         until the dead workers' tasks are all due
                                                    back in their queues (deadline + one beat
                                                    of a live worker); 0 when none, or overdue
    eventbuffer_broker_parked_messages              messages kombu cannot deliver, kept in
                                                    _eventbuffer.broker.unparsable

`eventbuffer_oldest_event_age_seconds` is event-time age, not queue wait: a
screen_view waits as its session's last view until the next view (or the
end of the session) queues it with its own `created_at`, and imported or
late events carry old timestamps too. Alert on it over a window (see
`monitoring/prometheus-alerts.yml`), not on a single sample.

Counters and histograms (recorded by the tasks):

    eventbuffer_events_applied_total{kind}        events applied to the buffer: regular,
                                                  screen_view, session_end
    eventbuffer_ingest_batches_total{outcome}     ingest batches: applied, duplicate (skipped),
                                                  dead_lettered (kept whole after failures),
                                                  batch_id_conflict (kept whole: its id was
                                                  applied before with other content)
    eventbuffer_batch_id_conflicts_total          batches whose id had been applied with other
                                                  content (kept as batch_id_conflict dead letters)
    eventbuffer_ingest_failures_total{kind}       failed ingest attempts: transient (Redis
                                                  away; retried until it is back), unexpected
                                                  (retried a few times, then dead-lettered)
    eventbuffer_ingest_pauses_total               ingest pauses: a process's batch refused by
                                                  Redis (full at maxmemory, or away); its tasks
                                                  wait in place (worker/pause.py)
    eventbuffer_ingest_paused_seconds_total       seconds ingest tasks spent waiting for Redis
                                                  (a rate above 0: ingest is paused)
    eventbuffer_apply_seconds                     histogram: one ingest apply (validate + Lua)
    eventbuffer_events_late_total                 session events that reached their session after
                                                  the reorder window had passed their place
                                                  (queued at once, see worker/reorder.py)
    eventbuffer_events_flushed_total              rows written to ClickHouse
    eventbuffer_dead_letters_total{reason}        dead letters: invalid_event, ingest_failed,
                                                  undeliverable_task, batch_id_conflict
                                                  (ingest), invalid_json,
                                                  rejected_by_clickhouse (flush)
    eventbuffer_flush_runs_total{result}          shard flushes: success, error, locked (another
                                                  flusher held the lock), backoff (skipped while
                                                  the shard backs off after ClickHouse failures)
    eventbuffer_flush_lock_skips_total            shard flushes skipped: another flusher held
                                                  the lock
    eventbuffer_flush_lock_takeovers_total        locks taken over from a provably dead holder
                                                  (its process gone, or its heartbeat stale)
    eventbuffer_flush_stalls_total                flushes that made no progress for
                                                  EVENT_BUFFER_FLUSH_STALL_S (a hung INSERT)
                                                  and gave their lock up
    eventbuffer_flush_batches_total               claims acknowledged
    eventbuffer_flush_redriven_total              claims re-driven (left open by a failure)
    eventbuffer_flush_phase_seconds{phase}        histogram: claim, insert, ack time per shard
                                                  flush
    eventbuffer_flush_seconds                     histogram: one shard flush, lock to release
    eventbuffer_insert_chunk_rows                 histogram: rows per ClickHouse INSERT
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from redis import Redis
from redis.exceptions import ResponseError

from worker.broker.holdings import Holdings, broker_holdings
from worker.clock import SYSTEM_CLOCK, Clock
from worker.deadletters import (
    REASON_BATCH_ID_CONFLICT,
    REASON_INGEST_FAILED,
    REASON_INVALID_EVENT,
    REASON_UNDELIVERABLE,
    REASONS,
)
from worker.events import KIND_NAMES
from worker.keys import Keyspace
from worker.redis_errors import REDIS_FAILURES
from worker.redis_memory import RedisMemory, broker_client, broker_memory, buffer_memory
from worker.settings import Settings
from worker.state import BufferState, read_state
from worker.topology import Client, connect

if TYPE_CHECKING:  # the ingest module records here: no import cycle at run time
    from worker.flush_report import FlushResult
    from worker.ingest import IngestResult

PREFIX = "eventbuffer"
DEAD_LETTER_REASONS = REASONS
INGEST_OUTCOMES = ("applied", "duplicate", "dead_lettered", REASON_BATCH_ID_CONFLICT)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER_PROJECTS = "__other__"

FLUSH_SUCCESS = "success"
FLUSH_ERROR = "error"
FLUSH_LOCKED = "locked"
FLUSH_BACKOFF = "backoff"
PHASES = ("claim", "insert", "ack")

APPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHUNK_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 50000)


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


def record_ingest(result: IngestResult, seconds: float) -> None:
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


def record_flush(result: FlushResult) -> None:
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


# -- gauges read from Redis at scrape time ----------------------------------------------


@dataclass
class _Gauges:
    up: GaugeMetricFamily
    depth: GaugeMetricFamily
    claimed: GaugeMetricFamily
    claim_age: GaugeMetricFamily
    oldest_age: GaugeMetricFamily
    dead: GaugeMetricFamily
    held: GaugeMetricFamily
    lock_held: GaugeMetricFamily
    lock_heartbeat_age: GaugeMetricFamily
    lock_stale: GaugeMetricFamily
    backoff: GaugeMetricFamily
    last_flush: GaugeMetricFamily
    replicas: GaugeMetricFamily
    waiting_for_replicas: GaugeMetricFamily
    flush_pending: GaugeMetricFamily
    flush_interval: GaugeMetricFamily
    visitors: GaugeMetricFamily
    projects: GaugeMetricFamily
    used_memory: GaugeMetricFamily
    maxmemory: GaugeMetricFamily
    policy: GaugeMetricFamily
    broker: _BrokerGauges

    def all(self) -> list[Metric]:
        return [g for g in vars(self).values() if isinstance(g, Metric)] + self.broker.all()


@dataclass
class _BrokerGauges:
    """A Redis broker's reliable transport: tasks in workers' keeping, parked messages."""

    held: GaugeMetricFamily
    recovery_due: GaugeMetricFamily
    parked: GaugeMetricFamily

    def all(self) -> list[Metric]:
        return list(vars(self).values())

    def add(self, holdings: Holdings) -> None:
        self.held.add_metric(["live"], holdings.held_by_live)
        self.held.add_metric(["dead"], holdings.held_by_dead)
        self.recovery_due.add_metric([], holdings.recovery_due_s)
        self.parked.add_metric([], holdings.parked)


def _broker_gauges() -> _BrokerGauges:
    return _BrokerGauges(
        held=GaugeMetricFamily(
            f"{PREFIX}_broker_tasks_held",
            "Tasks fetched and not acknowledged, in no queue: by live workers, or by dead "
            "ones (waiting to be put back).",
            labels=["consumer"],
        ),
        recovery_due=GaugeMetricFamily(
            f"{PREFIX}_broker_recovery_due_seconds",
            "Until the dead workers' tasks are all due back in their queues (0: none, or overdue).",
        ),
        parked=GaugeMetricFamily(
            f"{PREFIX}_broker_parked_messages",
            "Messages kombu cannot deliver, kept in _eventbuffer.broker.unparsable.",
        ),
    )


def _gauges() -> _Gauges:
    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))

    return _Gauges(
        up=gauge("redis_up", "1 if Redis answered this scrape, else 0."),
        depth=gauge(
            "buffer_depth", "Rows in the shard's queue (claimed rows included).", ("shard",)
        ),
        claimed=gauge("claimed_in_flight", "Rows of the shard's open claim (0: none).", ("shard",)),
        claim_age=gauge(
            "claim_age_seconds", "Age of the shard's open claim (0: none).", ("shard",)
        ),
        oldest_age=gauge(
            "oldest_event_age_seconds",
            "now - created_at of the row at the head of the shard's queue (0: empty).",
            ("shard",),
        ),
        dead=gauge("dead_letter_depth", "Dead letters stored in the shard.", ("shard",)),
        held=gauge(
            "held_sessions",
            "Sessions with events held by the reorder window, not yet given to them.",
            ("shard",),
        ),
        lock_held=gauge("flush_lock_held", "1 while a flusher holds the shard's lock.", ("shard",)),
        lock_heartbeat_age=gauge(
            "flush_lock_heartbeat_age_seconds",
            "Time since the lock's holder last extended it (absent: free, or holder unnamed).",
            ("shard",),
        ),
        lock_stale=gauge(
            "flush_lock_stale",
            "1 while the lock's heartbeat is stale: its holder looks dead and will be taken over.",
            ("shard",),
        ),
        backoff=gauge(
            "flush_backoff_seconds",
            "Time left of the shard's back-off after ClickHouse failures (0: none).",
            ("shard",),
        ),
        last_flush=gauge(
            "last_flush_timestamp_seconds",
            "When the shard's last batch was acknowledged (unix time; absent: never).",
            ("shard",),
        ),
        replicas=gauge(
            "replicas", "Replicas in sync with the master holding the shard.", ("shard",)
        ),
        waiting_for_replicas=gauge(
            "waiting_for_replicas",
            "1 while the shard's master has fewer replicas than EVENT_BUFFER_MIN_REPLICAS: "
            "its ingest and flushes wait.",
            ("shard",),
        ),
        flush_pending=gauge("flush_pending", "1 while a back-pressure flush is requested."),
        flush_interval=gauge(
            "flush_interval_seconds", "How often Beat runs process_buffer (setting)."
        ),
        visitors=gauge(
            "active_visitors",
            "Active visitors per project: the top projects by visitors, the rest as __other__.",
            ("project",),
        ),
        projects=gauge("active_projects", "Projects with at least one active visitor."),
        used_memory=gauge(
            "redis_used_memory_bytes",
            "INFO memory used_memory of the buffer's masters and the broker's Redis.",
            ("redis", "node"),
        ),
        maxmemory=gauge(
            "redis_maxmemory_bytes",
            "maxmemory of the buffer's masters and the broker's Redis (0: no limit).",
            ("redis", "node"),
        ),
        policy=gauge(
            "redis_maxmemory_policy",
            "1, labelled with the server's maxmemory-policy (any but noeviction loses events).",
            ("redis", "node", "policy"),
        ),
        broker=_broker_gauges(),
    )


def top_projects(counts: dict[str, int], top: int) -> dict[str, int]:
    """The `top` projects by count (ties by name) and the rest summed as `OTHER_PROJECTS`."""
    ranked = sorted(((n, p) for p, n in counts.items() if n > 0), key=lambda x: (-x[0], x[1]))
    shown = {project: n for n, project in ranked[:top]}
    shown[OTHER_PROJECTS] = sum(n for n, _ in ranked[top:])
    return shown


class RedisCollector:
    """The buffer's gauges, read from Redis on every scrape (a prometheus-client Collector).

    Reads only: one pipelined round trip for the shards, a SCAN for the
    projects with visitors (it walks the keyspace: cheap at a scrape every
    few seconds), one more round trip for their counts. If Redis does not
    answer, only `eventbuffer_redis_up 0` (and the interval) is reported.
    Memory: one `INFO memory` per master of the buffer, and one of the broker's
    Redis (its own client; a broker that does not answer only leaves its
    memory gauges out).
    A Redis broker is read apart (two more round trips, `broker_reader`):
    its gauges are reported whether or not the buffer answered.
    """

    def __init__(
        self,
        settings: Settings,
        redis_factory: Callable[[], Client],
        clock: Clock = SYSTEM_CLOCK,
        broker_factory: Callable[[], Redis | None] | None = None,
        broker_reader: Callable[[], Holdings | None] | None = None,
    ) -> None:
        self.settings = settings
        self.keyspace = Keyspace(settings.key_prefix, settings.shards)
        self._redis_factory = redis_factory
        self._redis: Client | None = None
        self._broker_factory = broker_factory or (lambda: broker_client(settings, 5.0))
        self._broker: Redis | None = None
        self.clock = clock
        self._broker_reader = broker_reader or (
            lambda: broker_holdings(settings.effective_broker_url, settings.consumer_timeout_s)
        )
        self._lock = threading.Lock()
        # Whether Redis answered the last collect (None before the first).
        self.up: bool | None = None

    def describe(self) -> Iterable[Metric]:
        return _gauges().all()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            gauges = _gauges()
            gauges.flush_interval.add_metric([], self.settings.flush_interval_s)
            self._read_broker(gauges.broker)
            try:
                self._read(gauges)
            except REDIS_FAILURES:
                self.up = False
                empty = _gauges()
                empty.up.add_metric([], 0)
                empty.flush_interval.add_metric([], self.settings.flush_interval_s)
                return [empty.up, empty.flush_interval, *gauges.broker.all()]
            gauges.up.add_metric([], 1)
            self.up = True
            return gauges.all()

    def _client(self) -> Client:
        if self._redis is None:
            self._redis = self._redis_factory()
        return self._redis

    def _read(self, g: _Gauges) -> None:
        state = read_state(
            self._client(),
            self.keyspace,
            self.clock.now_ms(),
            self.settings.active_visitor_window_s,
            self.settings.effective_min_replicas,
        )
        self.add(g, state)
        with suppress(ResponseError):  # INFO refused (an ACL): no memory gauges
            self.add_memory(g, buffer_memory(self._client()))
        broker = self._broker_client()
        if broker is not None:
            with suppress(*REDIS_FAILURES):  # the broker is not the buffer: up stays 1
                self.add_memory(g, [broker_memory(broker)])

    def _broker_client(self) -> Redis | None:
        if self._broker is None:
            self._broker = self._broker_factory()
        return self._broker

    def add_memory(self, g: _Gauges, servers: Iterable[RedisMemory]) -> None:
        """The memory gauges of each server read (one INFO memory each)."""
        for server in servers:
            labels = [server.redis, server.node]
            g.used_memory.add_metric(labels, server.used_bytes)
            g.maxmemory.add_metric(labels, server.maxmemory_bytes)
            g.policy.add_metric([*labels, server.policy], 1)

    def _read_broker(self, g: _BrokerGauges) -> None:
        """The broker's gauges; none when it is not a Redis or does not answer (never raises:
        the buffer's gauges do not depend on the broker)."""
        try:
            holdings = self._broker_reader()
        except Exception:
            return
        if holdings is not None:
            g.add(holdings)

    def add(self, g: _Gauges, state: BufferState) -> None:
        """The gauges of one buffer state."""
        for shard in state.shards:
            label = [str(shard.shard)]
            g.depth.add_metric(label, shard.queued)
            g.claimed.add_metric(label, shard.claimed.count if shard.claimed else 0)
            g.claim_age.add_metric(label, max(0.0, shard.claimed.age_s) if shard.claimed else 0.0)
            g.oldest_age.add_metric(label, shard.oldest_event_age_s)
            g.dead.add_metric(label, shard.dead_letters)
            g.held.add_metric(label, shard.held_sessions)
            g.lock_held.add_metric(label, 1 if shard.lock else 0)
            g.lock_stale.add_metric(label, 1 if shard.lock and shard.lock.stale else 0)
            if shard.lock is not None and shard.lock.heartbeat_age_ms is not None:
                g.lock_heartbeat_age.add_metric(label, shard.lock.heartbeat_age_ms / 1000)
            g.backoff.add_metric(label, shard.backoff_s)
            if shard.last_flush is not None:
                g.last_flush.add_metric(label, shard.last_flush.at_ms / 1000)
        for master in state.masters:
            for shard_no in master.shards:
                g.replicas.add_metric([str(shard_no)], master.replicas)
                g.waiting_for_replicas.add_metric([str(shard_no)], 1 if master.short else 0)
        g.flush_pending.add_metric([], 1 if state.flush_pending else 0)
        counts = state.active_visitors
        g.projects.add_metric([], sum(1 for n in counts.values() if n > 0))
        for project, visitors in top_projects(counts, self.settings.metrics_top_projects).items():
            g.visitors.add_metric([project], visitors)


# -- exposition -------------------------------------------------------------------------


def redis_client(settings: Settings) -> Client:
    """A Redis client of the exporter's own (scrapes run in the HTTP server's thread)."""
    return connect(settings, socket_connect_timeout=5, socket_timeout=10)


def build_registry(
    settings: Settings,
    redis_factory: Callable[[], Client] | None = None,
    *,
    this_process: bool = True,
    collector: RedisCollector | None = None,
) -> CollectorRegistry:
    """A registry for one exposition: Redis gauges, plus the counters of every process.

    With `PROMETHEUS_MULTIPROC_DIR` set, the counters come from its files
    (every process that counted there); otherwise from this process, unless
    `this_process` is False (a one-shot command has counted nothing).
    """
    registry = CollectorRegistry()
    if collector is None:
        collector = RedisCollector(settings, redis_factory or (lambda: redis_client(settings)))
    registry.register(collector)
    path = multiprocess_dir()
    if path is not None:
        if os.path.isdir(path):
            MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    elif this_process:
        for counter in metrics().collectors():
            registry.register(counter)
    return registry


def exposed_names(settings: Settings | None = None) -> set[str]:
    """Every sample name the endpoint can expose (counters with `_total`, histogram series)."""
    names: set[str] = set()
    families: list[Metric] = []
    for collector in Metrics(CollectorRegistry()).collectors():
        families.extend(collector.describe())
    families.extend(RedisCollector(settings or Settings(), lambda: Redis()).describe())
    for family in families:
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
        else:
            names.add(family.name)
    return names
