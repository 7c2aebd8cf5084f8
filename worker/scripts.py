"""The Lua scripts, loaded by file stem, each behind one typed Python wrapper.

Callers never see KEYS or ARGV. Each script is one redis-py `Script`
(what `register_script` makes), built once per process and run by EVALSHA
with whichever client calls it; NOSCRIPT (a Redis restart or SCRIPT FLUSH)
re-sends it automatically. The script headers in `lua_scripts/*.lua`
document every key, argument and return value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from importlib import resources
from typing import Any

from redis.commands.core import Script

import lua_scripts
from worker.errors import QueueMovedError
from worker.keys import ShardKeys
from worker.replication import Replicas
from worker.replies import number, text
from worker.topology import Client, Node, on_node


def load_lua(stem: str) -> str:
    """The source of `lua_scripts/<stem>.lua` (shipped inside the wheel)."""
    return resources.files(lua_scripts).joinpath(f"{stem}.lua").read_text("utf-8")


@cache
def script(stem: str) -> Script:
    """The script `lua_scripts/<stem>.lua`, made once per process.

    It is bound to no client: every call names the client (or pipeline) to
    run on. Given as bytes, its SHA needs no client's encoder.
    """
    return Script(None, load_lua(stem).encode("utf-8"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Claim:
    """A batch handed to a flusher: the head of a shard's queue."""

    id: str
    redriven: bool
    chunk_size: int  # fixed when the claim was made, so every re-drive cuts the same chunks
    rows: list[bytes]
    position: int = 0  # rows taken off the queue's head before this claim's first, ever


@dataclass(frozen=True)
class QueueRows:
    """Rows read from a shard's queue, named by the position of the first.

    A position counts every row ever taken off the queue's head (claim.lua
    says why that names a row for good), so rows read ahead of a claim are
    known to be its rows when the claim starts at the same position.
    """

    position: int
    rows: list[bytes]

    def take(self, position: int, count: int) -> list[bytes]:
        """The first `count` rows from `position` that these hold (maybe fewer, maybe none)."""
        if position != self.position:
            return []
        return self.rows[:count]


@dataclass(frozen=True)
class Released:
    """What release_held.lua did."""

    rows: int  # rows queued (views given their duration, session_ends, late events)
    late: int  # events that reached their session after their place had passed


class AckResult(IntEnum):
    """What ack.lua returns."""

    ACKED = 1
    ALREADY_ACKED = 0  # that claim is no longer open: another flusher acknowledged it
    LOCK_HELD_BY_OTHER = -1


class Scripts:
    """The typed calls of every script, on one client.

    `replicas`: the claim and the ack are followed by a WAIT for them on
    the same connection (worker/replication.py says why); the others are not.
    """

    def __init__(self, redis: Client, replicas: Replicas | None = None) -> None:
        self._redis = redis
        self._replicas = replicas or Replicas()
        self._claim = script("claim")
        self._ack = script("ack")
        self._sweep = script("sweep_sessions")
        self._release = script("release_held")
        self._dlq_remove = script("dlq_remove")
        self._lock_takeover = script("lock_takeover")
        self._lock_acquire = script("lock_acquire")

    @property
    def redis(self) -> Client:
        """The client these scripts run on."""
        return self._redis

    def claim(
        self,
        shard: ShardKeys,
        new_id: str,
        max_rows: int,
        now_ms: int,
        chunk_size: int,
        ahead: QueueRows | None = None,
    ) -> Claim | None:
        """The shard's open claim, else a new one of up to `max_rows`; None if empty.

        Its rows come from `ahead` (read before the claim was made, see
        `read_ahead`) where those are the claim's; the rest are read from
        the queue. Raises NotReplicatedError when the claim is on the
        master only: its rows must not be inserted then (see
        worker/replication.py); QueueMovedError when the queue's head moved
        before the rows were read.
        """
        reply = self._replicas.run(
            self._redis,
            shard.claim,
            lambda target: self._claim(
                keys=[shard.queue, shard.claim, shard.stats],
                args=[new_id, max_rows, now_ms, chunk_size],
                client=target,
            ),
            f"the claim of shard {shard.shard}",
            wrote=bool,  # an empty reply: nothing to claim, nothing written
        )
        if not reply:
            return None
        claim_id = text(reply[0])
        count, position = int(reply[4]), int(reply[5])
        rows = ahead.take(position, count) if ahead is not None else []
        if len(rows) < count:
            head, more = self._rows(shard, len(rows), count - len(rows))
            if head != position:
                raise QueueMovedError(
                    f"claim {claim_id} of shard {shard.shard}: the queue's head moved "
                    f"(from {position} to {head} rows removed) before its rows were "
                    "read: another flusher acknowledged a claim"
                )
            rows += more
        if len(rows) != count:
            raise QueueMovedError(
                f"claim {claim_id} of shard {shard.shard}: {count} rows claimed, "
                f"{len(rows)} in the queue"
            )
        return Claim(
            id=claim_id,
            redriven=int(reply[1]) == 1,
            chunk_size=int(reply[3]),
            rows=rows,
            position=position,
        )

    def read_ahead(self, shard: ShardKeys, claim: Claim, count: int) -> QueueRows:
        """Up to `count` rows queued behind `claim`: the next claim's, once it is acknowledged."""
        head, rows = self._rows(shard, len(claim.rows), count)
        return QueueRows(head + len(claim.rows), rows)

    def _rows(self, shard: ShardKeys, start: int, count: int) -> tuple[int, list[bytes]]:
        """Rows `start` to `start + count - 1` of the queue, and the position of its head.

        Read in one round trip on the shard's master, between two reads of the
        head's position (only ack.lua moves it, with the trim, atomically): the
        same position both times means the rows are those behind it; else read
        again. Not a MULTI, which Redis refuses at maxmemory even when it only
        reads, and the flush must drain a full Redis.
        """

        def read(node: Node) -> tuple[int, list[bytes]]:
            while True:
                with node.redis.pipeline(transaction=False) as pipe:
                    pipe.hget(shard.stats, "removed_total")
                    pipe.lrange(shard.queue, start, start + count - 1)
                    pipe.hget(shard.stats, "removed_total")
                    before, rows, after = pipe.execute()
                if before == after:
                    return (0 if before is None else number(before)), list(rows)

        return on_node(self._redis, shard.queue, read)

    def ack(
        self,
        shard: ShardKeys,
        *,
        lock_token: bytes,
        claim_id: str,
        now_ms: int,
        rows_inserted: int,
        dead_letters: Sequence[bytes],
        saved: tuple[str, bytes] | None,
    ) -> AckResult:
        """Remove an acknowledged claim.

        Raises NotReplicatedError when the ack is on the master only (it has
        been made all the same: see worker/replication.py).
        """
        channel, payload = saved if saved else ("", b"")
        reply = self._replicas.run(
            self._redis,
            shard.claim,
            lambda target: self._ack(
                keys=[shard.lock, shard.claim, shard.queue, shard.dead, shard.stats],
                args=[lock_token, claim_id, now_ms, rows_inserted, channel, payload, *dead_letters],
                client=target,
            ),
            f"the ack of claim {claim_id} (shard {shard.shard})",
            wrote=lambda reply: int(reply) == AckResult.ACKED,  # else nothing was done
        )
        return AckResult(int(reply))

    def release_held(
        self,
        shard: ShardKeys,
        sessions: Sequence[str],
        now_ms: int,
        views_ttl_s: int,
        closed_ttl_s: int,
    ) -> Released:
        """Release the held events of `sessions` that are still due (worker/reorder.py)."""
        keys = [
            shard.held_due,
            shard.queue,
            shard.views,
            shard.sessions,
            shard.profile_views,
            shard.closed,
            shard.closed_at,
            *(shard.held(session) for session in sessions),
        ]
        reply = self._release(
            keys=keys,
            args=[now_ms, views_ttl_s, closed_ttl_s * 1000, *sessions],
            client=self._redis,
        )
        rows, late = (number(value) for value in reply)
        return Released(rows, late)

    def sweep_sessions(
        self, shard: ShardKeys, cutoff_ms: int, candidates: Sequence[tuple[str, str]]
    ) -> int:
        """Queue the last views of `candidates` (session id, profile field or "") still idle.

        Returns how many views were queued.
        """
        keys = [shard.queue, shard.sessions, shard.views, shard.profile_views]
        args: list[Any] = [cutoff_ms]
        for session_id, profile_field in candidates:
            args += (session_id, profile_field)
        return int(self._sweep(keys=keys, args=args, client=self._redis))

    def dlq_remove(self, shard: ShardKeys, entries: Sequence[tuple[int, bytes]]) -> int:
        """Remove dead letters, each given as (index it was read at, exact value), at once.

        Returns how many were removed (fewer when some were gone already).
        """
        if not entries:
            return 0
        args: list[Any] = []
        for index, entry in entries:
            args += (index, entry)
        return int(self._dlq_remove(keys=[shard.dead], args=args, client=self._redis))

    def acquire_lock(self, lock: str, token: str, ttl_ms: int) -> bool:
        """Give the flush lock `lock` to `token` for `ttl_ms` if nobody holds it (SET NX PX
        that also runs when Redis is at maxmemory). True if taken."""
        reply = self._lock_acquire(keys=[lock], args=[token, ttl_ms], client=self._redis)
        return int(reply) == 1

    def take_over_lock(
        self, lock: str, dead_token: str, token: str, ttl_ms: int, most_left_ms: int
    ) -> bool:
        """Give the flush lock `lock` to `token` if it still holds `dead_token`.

        With `most_left_ms` >= 0, only while the lock has at most that long
        left (its holder has not extended it since it was judged stale);
        -1 for a holder whose process is known to be gone. True if taken.
        """
        reply = self._lock_takeover(
            keys=[lock], args=[dead_token, token, ttl_ms, most_left_ms], client=self._redis
        )
        return int(reply) == 1
