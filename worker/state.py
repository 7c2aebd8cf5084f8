"""What the buffer holds right now, read from Redis in one place.

`read_state()` is the one reader of buffer state: `eventbuffer status` (and
`--watch`) and the metrics collector show what it returns. Per shard it is
one pipelined round trip for all shards (queue depth, the head row's age,
the open claim, dead letters, waiting views, the lock with its holder and
heartbeat (`worker.lock.lock_state`), the back-off, the last flush); then
one round trip for the projects with visitors (each shard's project index;
`worker.visitors.active_projects`) and one more for their counts; on a cluster (or with replicas
wanted), one INFO per master holding shards, for its replicas. It only
reads: nothing is pruned.

Active visitors are counted by `worker.visitors`, read-only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from worker.events import datetime_ms, decode_row_head
from worker.keys import Keyspace, ShardKeys
from worker.lock import LockState, lock_state
from worker.replies import number, text, text_map
from worker.topology import Client, Node, is_cluster, node_for, refreshed_on_error
from worker.topology import masters as topology_masters
from worker.visitors import active_projects, count_active_visitors


@dataclass(frozen=True)
class ClaimState:
    id: str
    count: int
    at_ms: int
    age_s: float


@dataclass(frozen=True)
class LastFlush:
    at_ms: int
    rows: int
    dead: int
    claimed: int
    claim: str

    @property
    def at(self) -> str:
        return datetime.fromtimestamp(self.at_ms / 1000, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ShardState:
    shard: int
    queued: int  # rows in the queue, claimed rows included (LLEN)
    claimed: ClaimState | None
    dead_letters: int
    # now - created_at of the queue's head row (event time), 0 when empty.
    oldest_event_age_s: float
    waiting_views: int  # screen_views held as their session's last view
    lock: LockState | None
    backoff_s: float  # left of the back-off after ClickHouse failures, 0 if none
    failures: int  # ClickHouse failures in a row (the back-off doubles with them)
    last_flush: LastFlush | None
    # Running totals since the shard's stats began: rows inserted, rows taken off the queue.
    rows_total: int = 0
    removed_total: int = 0
    # Sessions with events held by the reorder window (not yet given to them).
    held_sessions: int = 0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.last_flush is not None:
            data["last_flush"]["at"] = self.last_flush.at
        return data


@dataclass(frozen=True)
class MasterState:
    """A master holding shards, and its replicas (read when replicas are wanted)."""

    node: str  # host:port
    shards: list[int]
    replicas: int  # replicas connected and in sync (INFO replication: state=online)
    wanted: int  # EVENT_BUFFER_MIN_REPLICAS

    @property
    def short(self) -> bool:
        """Fewer replicas than wanted: ingest of its shards waits, and so do their flushes."""
        return self.replicas < self.wanted

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "short": self.short}


@dataclass(frozen=True)
class BufferState:
    now_ms: int
    shards: list[ShardState]
    flush_pending: bool
    active_visitors: dict[str, int] = field(default_factory=dict)
    # The masters holding the shards: every master of a cluster's that holds one, or the
    # one Redis; empty when no replicas are wanted outside a cluster.
    masters: list[MasterState] = field(default_factory=list)
    cluster_masters: int = 0  # masters of the whole cluster (0: not a cluster)

    @property
    def queued(self) -> int:
        return sum(s.queued for s in self.shards)

    @property
    def claimed(self) -> int:
        return sum(s.claimed.count for s in self.shards if s.claimed)

    @property
    def dead_letters(self) -> int:
        return sum(s.dead_letters for s in self.shards)

    @property
    def waiting_views(self) -> int:
        return sum(s.waiting_views for s in self.shards)

    @property
    def held_sessions(self) -> int:
        return sum(s.held_sessions for s in self.shards)

    def as_dict(self) -> dict[str, Any]:
        return {
            "now_ms": self.now_ms,
            "flush_pending": self.flush_pending,
            "totals": {
                "queued": self.queued,
                "claimed": self.claimed,
                "dead_letters": self.dead_letters,
                "waiting_views": self.waiting_views,
                "held_sessions": self.held_sessions,
            },
            "shards": [s.as_dict() for s in self.shards],
            "masters": [m.as_dict() for m in self.masters],
            "cluster_masters": self.cluster_masters,
            "active_visitors": dict(self.active_visitors),
        }


def head_age_seconds(head: bytes | None, now_ms: int) -> float:
    """now - created_at of a queue's head row (LINDEX 0), in seconds; 0 without one.

    Event time: a screen_view is queued when its session's next view (or its
    end) arrives, with its own created_at; imported events are old too.
    """
    if head is None:
        return 0.0
    try:
        created = datetime_ms(decode_row_head(head).created_at)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return 0.0  # a poison row: the flush dead-letters it
    return max(0, now_ms - created) / 1000


_READS = 11  # commands per shard in read_state's pipeline (`_queue_reads`)


def _queue_reads(pipe: Any, shard: ShardKeys) -> None:
    pipe.llen(shard.queue)
    pipe.lindex(shard.queue, 0)
    pipe.hmget(shard.claim, ["id", "count", "at"])
    pipe.llen(shard.dead)
    pipe.hlen(shard.views)
    pipe.get(shard.lock)
    pipe.pttl(shard.lock)
    pipe.pttl(shard.backoff)
    pipe.get(shard.failures)
    pipe.hgetall(shard.stats)
    pipe.zcard(shard.held_due)


def _shard_state(shard: int, replies: Sequence[Any], now_ms: int) -> ShardState:
    queued, head, claim_fields, dead, views, token, lock_ttl, backoff, failures, raw, held = replies
    claim_id, count, at = claim_fields
    stats = text_map(raw)
    claim = None
    if claim_id is not None:
        at_ms = number(at)
        claim = ClaimState(text(claim_id), number(count), at_ms, round((now_ms - at_ms) / 1000, 3))
    last = None
    if "at" in stats:
        last = LastFlush(
            at_ms=int(stats["at"]),
            rows=int(stats.get("rows", 0)),
            dead=int(stats.get("dead", 0)),
            claimed=int(stats.get("claimed", 0)),
            claim=stats.get("claim", ""),
        )
    return ShardState(
        shard=shard,
        queued=number(queued),
        claimed=claim,
        dead_letters=number(dead),
        oldest_event_age_s=round(head_age_seconds(head, now_ms), 3),
        waiting_views=number(views),
        lock=None if token is None else lock_state(token, lock_ttl),
        backoff_s=max(0, number(backoff)) / 1000,
        failures=number(failures),
        last_flush=last,
        rows_total=int(stats.get("rows_total", 0)),
        removed_total=int(stats.get("removed_total", 0)),
        held_sessions=number(held),
    )


def read_state(
    redis: Client,
    keyspace: Keyspace,
    now_ms: int,
    visitor_window_s: int,
    min_replicas: int = 0,
) -> BufferState:
    """Every shard's state and the active visitors per project (read-only).

    On a cluster, or with `min_replicas`, also which master holds each shard
    and how many replicas it has (one INFO per master).
    """
    shards = keyspace.all()
    pipe = redis.pipeline(transaction=False)
    for shard in shards:
        _queue_reads(pipe, shard)
    pipe.exists(keyspace.flush_pending)
    replies = pipe.execute()
    states = [
        _shard_state(shard.shard, replies[n * _READS : (n + 1) * _READS], now_ms)
        for n, shard in enumerate(shards)
    ]
    cutoff = now_ms - visitor_window_s * 1000
    projects = active_projects(redis, keyspace, since_ms=cutoff)
    visitors = count_active_visitors(redis, keyspace, projects, cutoff)
    masters: list[MasterState] = []
    cluster_masters = 0
    if is_cluster(redis) or min_replicas > 0:
        masters = master_states(redis, keyspace, min_replicas)
    if is_cluster(redis):
        cluster_masters = len(topology_masters(redis))
    return BufferState(now_ms, states, bool(replies[-1]), visitors, masters, cluster_masters)


def master_states(redis: Client, keyspace: Keyspace, wanted: int) -> list[MasterState]:
    """The masters holding the shards, each with its replicas in sync (INFO replication)."""
    found: dict[str, tuple[Node, list[int]]] = {}
    for shard in keyspace.all():
        node = node_for(redis, shard.tag)
        found.setdefault(node.name, (node, []))[1].append(shard.shard)
    out = []
    for name, (node, shards) in found.items():
        with refreshed_on_error(redis):
            info = node.redis.info("replication")
        online = sum(
            1
            for key, value in info.items()
            if key.startswith("slave")
            and isinstance(value, dict)
            and value.get("state") == "online"
        )
        out.append(MasterState(name, shards, online, wanted))
    return out
