"""Applying a batch to the buffer: the writes planned in Python, made in one transaction.

The plan of each shard's writes is made in Python from the batch alone
(worker/apply_plan.py); the one part that needs what Redis holds, the view
each session was waiting with before the batch, is `resolve_views.lua`,
called inside the transaction so it sees the stored views as they are at
that moment, whoever wrote them.

`BatchWriter` makes every shard's writes in one MULTI/EXEC on one
connection (one per shard on a Redis Cluster, sent together; then a WAIT
for replicas when `EVENT_BUFFER_MIN_REPLICAS` asks for it, see
worker/replication.py): row bytes travel as arguments of plain commands (RPUSH, HSET),
never through Lua, which costs Redis several times as much per byte. The
batch markers make it idempotent: the markers are WATCHed and read
first; a shard whose marker holds the batch's digest was applied before and
gets nothing, and a marker set by someone else meanwhile aborts the EXEC,
which is then run again (and finds the marker). A marker holding another
digest means the batch id was used before for other content (a producer
reusing ids): then nothing of the batch is applied, on any shard, and the
batch is kept as one `batch_id_conflict` dead letter instead, in the same
transaction as a conflict marker of its own (`BatchCheck`). The keys' types
are checked with the markers, before anything is written: a transaction's
commands are not rolled back when one of them fails.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from worker.apply_plan import ShardWrites
from worker.errors import BatchIdConflictError, BufferKeyTypeError, NotReplicatedError
from worker.replication import Replicas
from worker.replies import text
from worker.resp import Framed, read_replies, send_commands
from worker.scripts import load_lua
from worker.topology import Client, Node, refreshed_on_error, transactions

# A transaction aborted by a concurrent marker is run again this many times at most
# (the second run finds the marker: more means something keeps rewriting it).
MAX_ATTEMPTS = 5
# What markers written before they held a digest hold: taken for a match (such a
# batch was applied before the upgrade; its content cannot be compared).
LEGACY_MARKER = b"1"


def content_digest(parts: Sequence[bytes]) -> str:
    """The digest a batch's markers hold: of its parts (rows, raw items) in order.

    The parts' lengths come first, so no two lists of parts share a digest
    by their boundaries. SHA-1 (hardware-accelerated: a quarter of blake2b's
    time on a batch of 500 rows), cut to 128 bits: a batch id is reused by
    mistake, not forged (whoever can send tasks can send any batch anyway).
    """
    lengths = (b"%d," * len(parts) % tuple(map(len, parts)))[:-1]  # b",".join of b"%d"s
    digest = hashlib.sha1(lengths, usedforsecurity=False)
    digest.update(b"\n")
    digest.update(b"".join(parts))
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class ShardOutcome:
    applied: bool  # False: the batch id had been applied to this shard before
    appended: int  # rows appended to the queue
    queue_length: int


@dataclass(frozen=True)
class BatchCheck:
    """How a batch whose id was applied before with another digest is kept.

    `conflict_key` (a key of the first plan's shard, one per batch id and
    digest) is set with the dead letter `keep` returns, in one transaction:
    a redelivery of the same conflicting batch finds it and adds nothing.
    `keep` gets the shards that hold this very batch already (an earlier
    delivery applied them; never on one Redis, where a batch is applied
    whole or not at all) and the digest the other batch's marker holds, and
    returns the encoded dead letter (stored on the first plan's shard).
    """

    conflict_key: str
    keep: Callable[[frozenset[int], str], bytes]


@dataclass(frozen=True)
class Conflict:
    """The batch id had been applied with another digest: the batch was kept instead."""

    stored: str  # the digest the earlier batch's marker holds
    applied_shards: frozenset[int]  # shards holding this batch already (left out of the letter)


@dataclass(frozen=True)
class Written:
    """What `BatchWriter.write` did: one outcome per plan, and a conflict, if any."""

    outcomes: list[ShardOutcome]
    conflict: Conflict | None = None


@dataclass
class _NodeWrite:
    """Plans that one transaction can hold, on one connection of the master serving them."""

    node: Node
    positions: list[int]  # of its plans in the batch's list
    plans: list[ShardWrites]
    connection: Any = None
    # Each plan's marker as read (None: absent), and whether the conflict key exists
    # (only read by the group holding the first plan, when a BatchCheck is given).
    stored: list[bytes | None] = field(default_factory=list)
    kept_before: bool = False
    applied_before: list[bool] = field(default_factory=list)
    # The conflict dead letter and its key, written by this group's transaction.
    keep: tuple[str, bytes] | None = None
    outcomes: list[ShardOutcome] | None = None  # None: aborted by a concurrent marker
    not_replicated: NotReplicatedError | None = None


class BatchWriter:
    """Runs `ShardWrites` in as few transactions as the server allows (see the module doc).

    On one Redis, one transaction holds every shard's plan. On a Redis
    Cluster each shard's plan gets its own transaction (a transaction cannot
    span slots), on its own connection to the master serving the shard's
    slot. Every transaction's commands are sent before any reply is read,
    so a batch over six shards on three masters costs the round trips of one.

    With `replicas` wanted, each transaction is followed on its connection
    by a WAIT (in the same write): a group whose transaction was not
    confirmed by enough replicas raises `NotReplicatedError` once every
    group is done. A group whose markers were all set before (a retry)
    refreshes their TTL in its transaction, so its WAIT covers the earlier
    writes too.
    """

    def __init__(
        self,
        *,
        marker_ttl_s: int,
        visitors_ttl_s: int,
        views_ttl_s: int,
        replicas: Replicas | None = None,
    ) -> None:
        self.marker_ttl_s = marker_ttl_s
        self.visitors_ttl_s = visitors_ttl_s
        self.views_ttl_s = views_ttl_s
        self.replicas = replicas or Replicas()
        self._resolve = load_lua("resolve_views")
        self._key_types = load_lua("key_types")

    def write(
        self,
        redis: Client,
        plans: Sequence[ShardWrites],
        now_ms: int,
        check: BatchCheck | None = None,
    ) -> Written:
        """Apply every plan, atomically per transaction; one outcome per plan.

        A marker holding another digest than the plans' is a conflict: with
        `check`, nothing is applied and the batch is kept as its dead letter
        (the result's `conflict`); without, `BatchIdConflictError` is raised.
        A transaction aborted by a concurrent marker makes every group run
        again (each finds what it had applied, and the others' markers).
        Raises NotReplicatedError when a transaction was applied but not
        confirmed by enough replicas (the others were applied too).
        """
        outcomes: list[ShardOutcome | None] = [None] * len(plans)
        layout = transactions(redis, [plan.marker for plan in plans])
        not_replicated: NotReplicatedError | None = None
        conflict: Conflict | None = None
        for _attempt in range(MAX_ATTEMPTS):
            groups = [_NodeWrite(node, positions, [plans[n] for n in positions])
                      for node, positions in layout]  # fmt: skip
            with refreshed_on_error(redis):
                found = self._attempt(groups, now_ms, check)
            done = True
            for group in groups:
                if group.outcomes is None:
                    done = False
                    continue
                if group.keep is not None:
                    conflict = found
                for position, outcome in zip(group.positions, group.outcomes, strict=True):
                    earlier = outcomes[position]
                    if earlier is None or not earlier.applied:  # keep what a run applied
                        outcomes[position] = outcome
                not_replicated = not_replicated or group.not_replicated
            if done:
                if not_replicated is not None:
                    raise not_replicated
                return Written([o for o in outcomes if o is not None], conflict)
        raise ResponseError(
            f"batch markers {[p.marker for p in plans]} kept changing during the apply"
        )

    def _attempt(
        self, groups: Sequence[_NodeWrite], now_ms: int, check: BatchCheck | None
    ) -> Conflict | None:
        """One transaction per group, each on a pooled connection, with the client's retries.

        A connection error is retried as redis-py retries a plain command
        (the client's `Retry`; none for a cluster's nodes, whose errors
        reach the task, which retries), on fresh connections: safe even
        after the EXEC was sent, since the markers make a second run skip
        what the first one applied.
        """

        def drop(error: BaseException | None = None) -> None:
            # The connections may hold a WATCH or half a reply: never reuse them.
            for group in groups:
                if group.connection is not None:
                    group.connection.disconnect()

        try:
            for group in groups:
                group.connection = group.node.redis.connection_pool.get_connection()
            return groups[0].connection.retry.call_with_retry(  # type: ignore[no-any-return]
                lambda: self._on(groups, now_ms, check), drop
            )
        except BaseException:
            drop()
            raise
        finally:
            for group in groups:
                if group.connection is not None:
                    group.node.redis.connection_pool.release(group.connection)
                    group.connection = None

    def _on(
        self, groups: Sequence[_NodeWrite], now_ms: int, check: BatchCheck | None
    ) -> Conflict | None:
        # 1. Watch the markers (and the conflict key); read them and the types of the keys
        #    the plans write. The first group holds the first plan (first-seen order).
        typed = [_TypedKeys(group.plans) for group in groups]
        for n, (group, keys) in enumerate(zip(groups, typed, strict=True)):
            plans = group.plans
            conflict_keys = [check.conflict_key] if check is not None and n == 0 else []
            checks: list[tuple[Any, ...]] = [("WATCH", *(p.marker for p in plans), *conflict_keys)]
            checks += [("GET", plan.marker) for plan in plans]
            checks += [("EXISTS", key) for key in conflict_keys]
            if keys.names:  # one script call, not a TYPE and its reply per key
                names = keys.names
                checks.append(("EVAL", self._key_types, len(names), *names, *keys.runs))
            send_commands(group.connection, checks)
        for n, (group, keys) in enumerate(zip(groups, typed, strict=True)):
            extra = 1 if check is not None and n == 0 else 0
            read = 1 + len(group.plans) + extra
            checked = read_replies(group.connection, read + (1 if keys.names else 0))
            if keys.names and checked[read]:  # the connections are dropped, WATCH and all
                raise BufferKeyTypeError(keys.names[_number(checked[read][0]) - 1])
            group.stored = checked[1 : 1 + len(group.plans)]
            group.kept_before = bool(extra and checked[read - 1])
            group.keep = None
        conflict = self._decide(groups, check)

        # 2. Per group, everything its shards get in one transaction, every queue's length
        #    after, and the WAIT for its master's replicas.
        sent = [self._transaction(group, now_ms) for group in groups]
        for group, (count, resolve_at, length_at) in zip(groups, sent, strict=True):
            replies = read_replies(group.connection, count)
            if self.replicas.waits:
                try:
                    self.replicas.check(replies[-1], "the batch's apply", group.node.name)
                except NotReplicatedError as exc:
                    group.not_replicated = exc
                replies = replies[:-1]
            group.outcomes = _outcomes(group, replies[-1], resolve_at, length_at)
        return conflict

    @staticmethod
    def _decide(groups: Sequence[_NodeWrite], check: BatchCheck | None) -> Conflict | None:
        """Which plans to apply, from the markers read; the conflict to keep, if any.

        A marker holding the plan's digest (or a marker from before digests)
        was applied before: skipped. One holding another digest makes the whole
        batch a conflict: no plan is applied, and the first group keeps the
        dead letter with the conflict key. A conflict key already set (this
        batch was kept before) skips everything.
        """
        own: set[int] = set()
        other: bytes | None = None
        for group in groups:
            for plan, value in zip(group.plans, group.stored, strict=True):
                if _own(plan, value):
                    own.add(plan.shard.shard)
                elif value is not None:
                    other = other or value
        kept_before = any(group.kept_before for group in groups)
        if other is None and not kept_before:
            for group in groups:
                group.applied_before = [value is not None for value in group.stored]
            return None
        for group in groups:
            group.applied_before = [True] * len(group.plans)
        if kept_before or other is None:
            return None
        stored = text(other)
        if check is None:
            plan = groups[0].plans[0]
            raise BatchIdConflictError(plan.marker, stored, plan.digest)
        applied = frozenset(own)
        groups[0].keep = (check.conflict_key, check.keep(applied, stored))
        return Conflict(stored, applied)

    def _transaction(self, group: _NodeWrite, now_ms: int) -> tuple[int, list[int], list[int]]:
        """Send a group's MULTI ... EXEC (and WAIT); the number of replies it will get, and
        where each plan's resolve call and queue length are in the EXEC reply."""
        commands: list[tuple[Any, ...] | Framed] = [("MULTI",)]
        queued = 0  # commands queued after the MULTI: EXEC's reply has one entry each
        if group.keep is not None:
            key, entry = group.keep
            commands.append(("RPUSH", group.plans[0].shard.dead, entry))
            commands.append(("SET", key, 1, "EX", self.marker_ttl_s))
            queued += 2
        resolve_at: list[int] = []  # index in the EXEC reply of each plan's resolve call, or -1
        length_at: list[int] = []
        steps = zip(group.plans, group.applied_before, group.stored, strict=True)
        for plan, before, value in steps:
            at = -1
            if before:
                if self.replicas.waits and _own(plan, value):
                    # Applied by an earlier delivery: refresh the marker, a write of this
                    # connection that the WAIT below then covers, with the earlier ones.
                    commands.append(("EXPIRE", plan.marker, self.marker_ttl_s))
                    queued += 1
            else:
                if plan.resolve:
                    at = queued
                    commands.append(self._resolve_call(plan))
                    queued += 1
                writes, count = self._plain_writes(plan, now_ms)
                commands += writes
                queued += count
            resolve_at.append(at)
            length_at.append(queued)
            commands.append(("LLEN", plan.shard.queue))
            queued += 1
        commands.append(("EXEC",))
        if self.replicas.waits:
            commands.append(self.replicas.wait_command())
        send_commands(group.connection, commands)
        # The MULTI's reply, one +QUEUED per command queued, EXEC's (and WAIT's).
        return 2 + queued + (1 if self.replicas.waits else 0), resolve_at, length_at

    def _resolve_call(self, plan: ShardWrites) -> tuple[Any, ...]:
        args: list[str] = []
        for session, first in plan.resolve:
            args += (session, first)
        shard = plan.shard
        return ("EVAL", self._resolve, 2, shard.queue, shard.views, *args)

    def _plain_writes(
        self, plan: ShardWrites, now_ms: int
    ) -> tuple[list[tuple[Any, ...] | Framed], int]:
        """The plan's writes, and how many commands they are (the held events' APPENDs,
        one per session, come framed together as one entry)."""
        shard = plan.shard
        out: list[tuple[Any, ...] | Framed] = []
        appends = 0
        if plan.dead_letters:
            out.append(("RPUSH", shard.dead, *plan.dead_letters))
        if plan.queue_rows:
            out.append(("RPUSH", shard.queue, *plan.queue_rows))
        for project, members in plan.visitors.items():
            key = shard.visitors(project)
            scored: list[Any] = []
            # Greatest first: a small sorted set (a listpack) puts each member after the
            # ones of equal score that sort before it, walking from its start; in this
            # order the walk stops where the batch's members begin, not inside them.
            # The set written is the same in any order (one score for all, no repeats).
            for member in sorted(members, reverse=True):
                scored += (now_ms, member)
            out.append(("ZADD", key, *scored))
            out.append(("EXPIRE", key, self.visitors_ttl_s))
        if plan.visitors:
            # The shard's index of projects with visitors (read by the gauges
            # instead of a keyspace SCAN; pruned by the sweep).
            index = (x for p in plan.visitors for x in (now_ms, p))
            out.append(("ZADD", shard.visitor_projects, *index))
            out.append(("EXPIRE", shard.visitor_projects, self.visitors_ttl_s))
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
        if plan.held:
            out.append(_appends(plan.held_keys, plan.held))
            appends = len(plan.held) - 1  # more commands than entries
            until = plan.hold_until
            deadlines = [x for session in plan.held for x in (until, session)]
            out.append(("ZADD", shard.held_due, "LT", *deadlines))
        out.append(("SET", plan.marker, plan.digest or LEGACY_MARKER, "EX", self.marker_ttl_s))
        if plan.publish is not None:
            out.append(("PUBLISH", *plan.publish))
        return out, len(out) + appends


def _appends(keys: dict[str, str], held: dict[str, list[bytes]]) -> Framed:
    """One APPEND per session of `held` to its key in `keys`, of its records joined, framed
    together as RESP (the records are joined once, with the write): the bytes
    `pack_command` makes for each APPEND, without an object and a list of parts each."""
    framed = Framed.__new__(Framed)
    parts: list[Any] = []
    add = parts.append
    extend = parts.extend
    for session, records in held.items():
        key = keys[session].encode()
        add(b"\r\n*3\r\n$6\r\nAPPEND\r\n$%d\r\n%b\r\n$%d\r\n" % (
            len(key), key, sum(map(len, records))
        ))  # fmt: skip
        extend(records)
    parts[0] = parts[0][2:]  # the first command has no value before it to end
    add(b"\r\n")
    framed.parts = parts
    return framed


def _own(plan: ShardWrites, marker: bytes | None) -> bool:
    """Does a marker read for `plan` say that this very batch was applied there?"""
    return marker is not None and marker in (plan.digest.encode(), LEGACY_MARKER)


def _writes_queue(plan: ShardWrites) -> bool:
    return bool(plan.queue_rows or plan.resolve)


class _TypedKeys:
    """The keys plans write with a type-specific command: key_types.lua's KEYS (`names`)
    and ARGV (`runs`: per run of consecutive keys that must have the same type, the type
    and the run's length; a held key per session makes one run, not a type per key)."""

    __slots__ = ("_counts", "_kinds", "names")

    def __init__(self, plans: Sequence[ShardWrites]) -> None:
        self.names: list[str] = []
        self._kinds: list[str] = []
        self._counts: list[int] = []
        for plan in plans:
            self._add(plan)

    @property
    def runs(self) -> list[str | int]:
        return [x for run in zip(self._kinds, self._counts, strict=True) for x in run]

    def _of(self, kind: str, keys: Sequence[str]) -> None:
        if not keys:
            return
        self.names += keys
        if self._kinds and self._kinds[-1] == kind:
            self._counts[-1] += len(keys)
        else:
            self._kinds.append(kind)
            self._counts.append(len(keys))

    def _add(self, plan: ShardWrites) -> None:
        """The keys `plan` writes with a type-specific command, with the type each needs."""
        shard = plan.shard
        if plan.dead_letters:
            self._of("list", [shard.dead])
        if _writes_queue(plan):
            self._of("list", [shard.queue])
        if plan.resolve:
            self._of("hash", [shard.views])
            self._of("zset", [shard.sessions])
        if plan.held:
            self._of("string", list(plan.held_keys.values()))
            self._of("zset", [shard.held_due])
        if plan.profiles_set or plan.profiles_ended:
            self._of("hash", [shard.profile_views])
        if plan.visitors:
            self._of("zset", [*map(shard.visitors, plan.visitors), shard.visitor_projects])


def _outcomes(
    group: _NodeWrite, results: Any, resolve_at: list[int], length_at: list[int]
) -> list[ShardOutcome] | None:
    """Each plan's outcome from its group's EXEC reply (None: aborted by a watched marker)."""
    if results is None:
        return None
    if group.keep is not None:
        for result in results[:2]:  # the conflict's dead letter and key
            if isinstance(result, Exception):
                raise result
    outcomes = []
    for n, plan in enumerate(group.plans):
        length = results[length_at[n]]
        length = 0 if isinstance(length, Exception) else _number(length)
        if group.applied_before[n]:
            outcomes.append(ShardOutcome(False, 0, length))
            continue
        for result in results[length_at[n - 1] + 1 if n else 0 : length_at[n]]:
            if isinstance(result, Exception):
                raise result  # only a race with another writer of the keys' types
        resolved = _number(results[resolve_at[n]]) if resolve_at[n] >= 0 else 0
        outcomes.append(ShardOutcome(True, len(plan.queue_rows) + resolved, length))
    return outcomes


def _number(reply: Any) -> int:
    return int(reply) if not isinstance(reply, bytes | str) else int(text(reply))
