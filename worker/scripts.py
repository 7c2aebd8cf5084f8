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
from functools import cache
from importlib import resources
from typing import Any

from redis.commands.core import Script

import lua_scripts
from worker.keys import ShardKeys
from worker.replies import number
from worker.topology import Client


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
class Released:
    """What release_held.lua did."""

    rows: int  # rows queued (views given their duration, session_ends, late events)
    late: int  # events that reached their session after their place had passed


class Scripts:
    """The typed calls of every script, on one client.

    The claim protocol's scripts (claim.lua, ack.lua) are worker/claims.py's.
    """

    def __init__(self, redis: Client) -> None:
        self._redis = redis
        self._sweep = script("sweep_sessions")
        self._release = script("release_held")
        self._dlq_remove = script("dlq_remove")
        self._lock_takeover = script("lock_takeover")
        self._lock_acquire = script("lock_acquire")

    @property
    def redis(self) -> Client:
        """The client these scripts run on."""
        return self._redis

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
            shard.held_generation,  # every release increments it (worker/reorder_release.py)
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
