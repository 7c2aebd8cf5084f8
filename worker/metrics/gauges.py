"""Prometheus gauges: what the buffer holds, read from Redis at every scrape.

`RedisCollector` reads them whichever process serves them (a worker's
endpoint, or the one-shot `eventbuffer metrics`), through `worker.state`
(the one reader of the buffer's state), `worker.redis_memory` and, for a
Redis broker's reliable transport, `worker.broker.holdings`. Each series'
meaning is its help text below; the README's Observability section lists
them all.

`eventbuffer_oldest_event_age_seconds` is event-time age, not queue wait: a
screen_view waits as its session's last view until the next view (or the
end of the session) queues it with its own `created_at`, and imported or
late events carry old timestamps too. Alert on it over a window (see
`monitoring/prometheus-alerts.yml`), not on a single sample.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from redis import Redis
from redis.exceptions import ResponseError

from worker.broker.holdings import Holdings, broker_holdings
from worker.clock import SYSTEM_CLOCK, Clock
from worker.keys import Keyspace
from worker.metrics.counters import PREFIX
from worker.redis_errors import REDIS_FAILURES
from worker.redis_memory import RedisMemory, broker_client, broker_memory, buffer_memory
from worker.settings import Settings
from worker.state import BufferState, read_state
from worker.topology import Client

OTHER_PROJECTS = "__other__"


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

    Reads only (`worker.state.read_state`): one pipelined round trip for the
    shards, one for the projects with visitors (each shard's project index,
    no SCAN), one more for their counts. If Redis does not
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
