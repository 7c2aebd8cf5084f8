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

from redis import Redis
from redis.client import Pipeline
from redis.commands.core import Script

import lua_scripts
from worker.errors import BufferKeyTypeError
from worker.events import KIND_REGULAR, KIND_SCREEN_VIEW, Row
from worker.keys import ShardKeys
from worker.replies import text


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


class AckResult(IntEnum):
    """What ack.lua returns."""

    ACKED = 1
    ALREADY_ACKED = 0  # that claim is no longer open: another flusher acknowledged it
    LOCK_HELD_BY_OTHER = -1


# apply_batch.lua's `appended` for a batch id it has applied before, and for
# a key of the wrong type (the reply's second value is then the key's name).
ALREADY_APPLIED = -1
WRONG_TYPE = -2


def apply_reply(reply: Sequence[Any]) -> tuple[int, int]:
    """(appended, queue length) from apply_batch.lua; raises BufferKeyTypeError."""
    appended = int(reply[0])
    if appended == WRONG_TYPE:
        raise BufferKeyTypeError(text(reply[1]))
    return appended, int(reply[1])


class Scripts:
    """The typed calls of every script, on one client."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._apply = script("apply_batch")
        self._claim = script("claim")
        self._ack = script("ack")
        self._sweep = script("sweep_sessions")
        self._dlq_remove = script("dlq_remove")
        self._lock_takeover = script("lock_takeover")

    def apply_batch(
        self,
        shard: ShardKeys,
        batch_id: str,
        events: Sequence[Row],
        rows: Sequence[bytes],
        *,
        now_ms: int,
        view_ttl_s: int,
        marker_ttl_s: int,
        visitors_ttl_s: int,
        publish: tuple[str, bytes] | None = None,
        dead_letters: Sequence[bytes] = (),
        pipeline: Pipeline | None = None,
    ) -> Any:
        """Apply events (with their encoded rows) to one shard.

        `dead_letters` (the batch's invalid events) are appended in the same
        atomic step, so a redelivered batch cannot dead-letter them twice.

        Returns (appended, queue_length), appended `ALREADY_APPLIED` for a
        batch id applied before; with `pipeline`, queues the call and returns
        the pipeline.
        """
        keys: list[str] = [
            shard.queue,
            shard.batch(batch_id),
            shard.dead,
            shard.sessions,
            shard.views,
            shard.profile_views,
        ]
        regular: list[bytes] = []
        ordered: list[Any] = []
        visitors: dict[str, dict[str, None]] = {}  # project -> profile ids, in first-seen order
        for event, row in zip(events, rows, strict=True):
            profile_id = event.profile_id
            if profile_id:
                members = visitors.get(event.project_id)
                if members is None:
                    members = visitors[event.project_id] = {}
                members[profile_id] = None
            kind = event.kind
            if kind == KIND_REGULAR:
                regular.append(row)
                continue
            ordered += (
                f"{event.created_ms}|{event.duration}|" if kind == KIND_SCREEN_VIEW else "",
                event.session_id,
                shard.profile_field(event.project_id, profile_id) if profile_id else "",
                row,
            )

        channel, payload = publish if publish else ("", b"")
        args: list[Any] = [now_ms, marker_ttl_s, visitors_ttl_s, view_ttl_s, channel, payload]
        args.append(len(dead_letters))
        args += dead_letters
        args.append(len(regular))
        args += regular
        args.append(len(visitors))
        for project_id, members in visitors.items():
            keys.append(shard.visitors(project_id))
            args += (len(keys), len(members), *members)
        args += ordered
        client: Any = pipeline if pipeline is not None else self._redis
        reply = self._apply(keys=keys, args=args, client=client)
        if pipeline is not None:
            return pipeline
        return apply_reply(reply)

    def claim(
        self, shard: ShardKeys, new_id: str, max_rows: int, now_ms: int, chunk_size: int
    ) -> Claim | None:
        """The shard's open claim, else a new one of up to `max_rows`; None if empty."""
        reply = self._claim(
            keys=[shard.queue, shard.claim],
            args=[new_id, max_rows, now_ms, chunk_size],
            client=self._redis,
        )
        if not reply:
            return None
        return Claim(
            id=text(reply[0]),
            redriven=int(reply[1]) == 1,
            chunk_size=int(reply[3]),
            rows=list(reply[4:]),
        )

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
        """Remove an acknowledged claim."""
        channel, payload = saved if saved else ("", b"")
        reply = self._ack(
            keys=[shard.lock, shard.claim, shard.queue, shard.dead, shard.stats],
            args=[lock_token, claim_id, now_ms, rows_inserted, channel, payload, *dead_letters],
            client=self._redis,
        )
        return AckResult(int(reply))

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
