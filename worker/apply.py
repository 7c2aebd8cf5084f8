"""Applying a batch to the buffer: the writes planned in Python, made in one transaction.

OpenPanel's rules (see `worker/buffer.py`) mostly follow from the batch
itself: within a batch, a session's view gets its duration from the
session's next view, a session_end queues the view before it, and the
session's (and its profiles') last view at the end of the batch is known.
`plan_shard()` works all of that out in Python. Only one thing needs what
Redis holds: the view each session was waiting with before this batch,
which the session's first event of the batch queues (with a duration, for
a view; as it is, for a session_end). `resolve_views.lua` does that part
inside the transaction, so it sees the stored views as they are at that
moment, whoever wrote them.

`write_shards()` makes every shard's writes in one MULTI/EXEC on one
connection: row bytes travel as arguments of plain commands (RPUSH, HSET),
never through Lua, which costs Redis several times as much per byte. The
batch markers make it idempotent: the markers are WATCHed and checked
first; a shard whose marker exists was applied before and gets nothing, and
a marker set by someone else meanwhile aborts the EXEC, which is then run
again (and finds the marker). The keys' types are checked with the
markers, before anything is written: a transaction's commands are not
rolled back when one of them fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hiredis import pack_command
from redis import Redis
from redis.exceptions import ResponseError

from worker.errors import BufferKeyTypeError
from worker.events import KIND_REGULAR, KIND_SCREEN_VIEW, Row
from worker.keys import ShardKeys
from worker.replies import text
from worker.scripts import load_lua

# A transaction aborted by a concurrent marker is run again this many times at most
# (the second run finds the marker: more means something keeps rewriting it).
MAX_ATTEMPTS = 5


def _with_duration(row: bytes, own: int, ms: int) -> bytes:
    """A row whose last field is its own `duration` (absent when 0), with `ms` instead."""
    head = row[:-1] if own == 0 else row[: -(13 + len(str(own)))]
    return b'%b,"duration":%d}' % (head, ms)


def stored_view(created_ms: int, own_duration: int, row: bytes) -> bytes:
    """How a last view is stored: "<created ms>|<own duration>|<row>"."""
    return b"%d|%d|%b" % (created_ms, own_duration, row)


@dataclass
class ShardWrites:
    """Everything one batch writes to one shard, as plain command arguments."""

    shard: ShardKeys
    marker: str
    queue_rows: list[bytes] = field(default_factory=list)
    # The session's first event of the batch and what it does with the view
    # stored before it: (session id, created ms of a first view; "" for a first session_end).
    resolve: list[tuple[str, str]] = field(default_factory=list)
    views_set: list[tuple[str, bytes]] = field(default_factory=list)  # session -> last view
    views_ended: list[str] = field(default_factory=list)
    profiles_set: dict[str, bytes] = field(default_factory=dict)
    profiles_ended: set[str] = field(default_factory=set)
    visitors: dict[str, list[str]] = field(default_factory=dict)  # project -> profile ids
    dead_letters: Sequence[bytes] = ()
    publish: tuple[str, bytes] | None = None

    @property
    def has_views(self) -> bool:
        return bool(self.resolve)


def plan_shard(
    shard: ShardKeys,
    marker: str,
    events: Sequence[Row],
    rows: Sequence[bytes],
) -> ShardWrites:
    """The writes of `events` (in order, with their encoded rows) to one shard."""
    writes = ShardWrites(shard, marker)
    queue = writes.queue_rows
    # session id -> its pending view in this batch (created, own duration, row), or None
    pending: dict[str, tuple[int, int, bytes] | None] = {}
    profiles: dict[str, bytes | None] = {}
    visitors: dict[str, dict[str, None]] = {}
    for event, row in zip(events, rows, strict=True):
        profile_id = event.profile_id
        if profile_id:
            members = visitors.get(event.project_id)
            if members is None:
                members = visitors[event.project_id] = {}
            members[profile_id] = None
        kind = event.kind
        if kind == KIND_REGULAR:
            queue.append(row)
            continue
        session = event.session_id
        first = session not in pending
        previous = None if first else pending[session]
        if kind == KIND_SCREEN_VIEW:
            created = event.created_ms
            if first:
                writes.resolve.append((session, str(created)))
            elif previous is not None:
                queue.append(
                    _with_duration(previous[2], previous[1], max(0, created - previous[0]))
                )
            pending[session] = (created, event.duration, row)
            if profile_id:
                profiles[shard.profile_field(event.project_id, profile_id)] = stored_view(
                    created, event.duration, row
                )
        else:  # session_end
            if first:
                writes.resolve.append((session, ""))
            elif previous is not None:
                queue.append(previous[2])  # queued with its own duration
            pending[session] = None
            queue.append(row)
            if profile_id:
                profiles[shard.profile_field(event.project_id, profile_id)] = None
    for session, view in pending.items():
        if view is None:
            writes.views_ended.append(session)
        else:
            writes.views_set.append((session, stored_view(*view)))
    for profile, value in profiles.items():
        if value is None:
            writes.profiles_ended.add(profile)
        else:
            writes.profiles_set[profile] = value
    writes.visitors = {project: list(members) for project, members in visitors.items()}
    return writes


@dataclass(frozen=True)
class ShardOutcome:
    applied: bool  # False: the batch id had been applied to this shard before
    appended: int  # rows appended to the queue
    queue_length: int


class _Aborted(Exception):
    """A watched marker changed before EXEC: run the transaction again."""


class BatchWriter:
    """Runs `ShardWrites` in one transaction per call (see the module doc)."""

    def __init__(
        self,
        *,
        marker_ttl_s: int,
        visitors_ttl_s: int,
        views_ttl_s: int,
    ) -> None:
        self.marker_ttl_s = marker_ttl_s
        self.visitors_ttl_s = visitors_ttl_s
        self.views_ttl_s = views_ttl_s
        self._resolve = load_lua("resolve_views")

    def write(self, redis: Redis, plans: Sequence[ShardWrites], now_ms: int) -> list[ShardOutcome]:
        """Apply every plan (all on the same Redis) atomically; one outcome per plan."""
        for _attempt in range(MAX_ATTEMPTS):
            try:
                return self._attempt(redis, plans, now_ms)
            except _Aborted:
                continue
        raise ResponseError(
            f"batch markers {[p.marker for p in plans]} kept changing during the apply"
        )

    def _attempt(
        self, redis: Redis, plans: Sequence[ShardWrites], now_ms: int
    ) -> list[ShardOutcome]:
        """One transaction on one pooled connection, with the client's retries.

        A connection error is retried as redis-py retries a plain command
        (the client's `Retry`), on a fresh connection: safe even after the
        EXEC was sent, since the markers make a second run skip what the
        first one applied.
        """
        pool = redis.connection_pool
        connection: Any = pool.get_connection()

        def fail(error: BaseException) -> None:
            # The connection may hold a WATCH or half a reply: never reuse it.
            connection.disconnect()

        try:
            outcomes: list[ShardOutcome] = connection.retry.call_with_retry(
                lambda: self._on(connection, plans, now_ms), fail
            )
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)
        return outcomes

    def _on(self, connection: Any, plans: Sequence[ShardWrites], now_ms: int) -> list[ShardOutcome]:
        # 1. Watch the markers; read them and the types of the keys the plans write.
        typed = [key for plan in plans for key in _typed_keys(plan)]
        checks: list[tuple[Any, ...]] = [("WATCH", *(p.marker for p in plans))]
        checks += [("EXISTS", plan.marker) for plan in plans]
        checks += [("TYPE", key) for key, _ in typed]
        checked = _run(connection, checks)
        for (key, expected), found in zip(typed, checked[1 + len(plans) :], strict=True):
            if text(found) not in ("none", expected):
                _run(connection, [("UNWATCH",)])
                raise BufferKeyTypeError(key)
        applied_before = [bool(reply) for reply in checked[1 : 1 + len(plans)]]

        # 2. Everything the other shards get, in one transaction; every queue's length after.
        commands: list[tuple[Any, ...]] = [("MULTI",)]
        resolve_at: list[int] = []  # index in the EXEC reply of each plan's resolve call, or -1
        length_at: list[int] = []
        for plan, before in zip(plans, applied_before, strict=True):
            at = -1
            if not before:
                if plan.resolve:
                    at = len(commands) - 1
                    commands.append(self._resolve_call(plan))
                commands += self._plain_writes(plan, now_ms)
            resolve_at.append(at)
            length_at.append(len(commands) - 1)
            commands.append(("LLEN", plan.shard.queue))
        commands.append(("EXEC",))
        results = _run(connection, commands)[-1]
        if results is None:
            raise _Aborted
        outcomes = []
        for n, plan in enumerate(plans):
            length = results[length_at[n]]
            length = 0 if isinstance(length, Exception) else _number(length)
            if applied_before[n]:
                outcomes.append(ShardOutcome(False, 0, length))
                continue
            for result in results[length_at[n - 1] + 1 if n else 0 : length_at[n]]:
                if isinstance(result, Exception):
                    raise result  # only a race with another writer of the keys' types
            resolved = _number(results[resolve_at[n]]) if resolve_at[n] >= 0 else 0
            outcomes.append(ShardOutcome(True, len(plan.queue_rows) + resolved, length))
        return outcomes

    def _resolve_call(self, plan: ShardWrites) -> tuple[Any, ...]:
        args: list[str] = []
        for session, first in plan.resolve:
            args += (session, first)
        shard = plan.shard
        return ("EVAL", self._resolve, 2, shard.queue, shard.views, *args)

    def _plain_writes(self, plan: ShardWrites, now_ms: int) -> list[tuple[Any, ...]]:
        shard = plan.shard
        out: list[tuple[Any, ...]] = []
        if plan.dead_letters:
            out.append(("RPUSH", shard.dead, *plan.dead_letters))
        if plan.queue_rows:
            out.append(("RPUSH", shard.queue, *plan.queue_rows))
        for project, members in plan.visitors.items():
            key = shard.visitors(project)
            scored: list[Any] = []
            for member in members:
                scored += (now_ms, member)
            out.append(("ZADD", key, *scored))
            out.append(("EXPIRE", key, self.visitors_ttl_s))
        if plan.views_set:
            stored: list[Any] = []
            indexed: list[Any] = []
            for session, value in plan.views_set:
                stored += (session, value)
                indexed += (now_ms, session)
            out.append(("HSET", shard.views, *stored))
            out.append(("ZADD", shard.sessions, *indexed))
            out.append(("EXPIRE", shard.views, self.views_ttl_s))
        if plan.views_ended:
            out.append(("HDEL", shard.views, *plan.views_ended))
            out.append(("ZREM", shard.sessions, *plan.views_ended))
        if plan.profiles_set:
            pairs: list[Any] = []
            for profile, value in plan.profiles_set.items():
                pairs += (profile, value)
            out.append(("HSET", shard.profile_views, *pairs))
            out.append(("EXPIRE", shard.profile_views, self.views_ttl_s))
        if plan.profiles_ended:
            out.append(("HDEL", shard.profile_views, *plan.profiles_ended))
        out.append(("SET", plan.marker, 1, "EX", self.marker_ttl_s))
        if plan.publish is not None:
            out.append(("PUBLISH", *plan.publish))
        return out


def _writes_queue(plan: ShardWrites) -> bool:
    return bool(plan.queue_rows or plan.resolve)


def _typed_keys(plan: ShardWrites) -> list[tuple[str, str]]:
    """The keys this plan writes with a type-specific command, and the type each must have."""
    shard = plan.shard
    keys: list[tuple[str, str]] = []
    if plan.dead_letters:
        keys.append((shard.dead, "list"))
    if _writes_queue(plan):
        keys.append((shard.queue, "list"))
    if plan.resolve:
        keys += [(shard.views, "hash"), (shard.sessions, "zset")]
    if plan.profiles_set or plan.profiles_ended:
        keys.append((shard.profile_views, "hash"))
    keys += [(shard.visitors(project), "zset") for project in plan.visitors]
    return keys


def _pack(commands: Sequence[tuple[Any, ...]]) -> list[bytes]:
    """The commands as RESP: hiredis packs the arguments as they are (bytes, str, int),
    without redis-py's encoding of each in Python first."""
    return [pack_command(command) for command in commands]


def _run(connection: Any, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Send `commands` in one write and read every reply (errors inside EXEC stay values)."""
    connection.send_packed_command(_pack(commands))
    replies = []
    error: ResponseError | None = None
    for _ in commands:
        try:
            replies.append(connection.read_response())
        except ResponseError as exc:  # read every reply before raising, or the next ones stay
            replies.append(exc)
            error = error or exc
    if error is not None:
        raise error
    return replies


def _number(reply: Any) -> int:
    return int(reply) if not isinstance(reply, bytes | str) else int(text(reply))
