"""The typed calls of the forget scripts (lua_scripts/forget_*.lua; their headers say more)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from worker.keys import Keyspace, ShardKeys
from worker.replies import number
from worker.scripts import script
from worker.topology import Client


@dataclass
class ShardRemoval:
    """What forget_shard.lua removed from one shard."""

    buffer_rows: int = 0
    claimed_rows: int = 0  # left in the open claim: the flusher's fence drops them
    dead_letters: int = 0
    dead_letters_rewritten: int = 0
    last_views: int = 0
    profile_last_views: int = 0
    visitors: int = 0
    missed: int = 0  # moved or changed since they were read: look again

    def add(self, other: ShardRemoval) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class Found:
    """A person's entries read from one shard, each with where and what it was."""

    queue: Sequence[tuple[int, bytes]] = ()  # (index, row), descending index
    dead: Sequence[tuple[int, bytes, bytes]] = ()  # (index, entry, replacement or b"")
    views: Sequence[tuple[str, bytes]] = ()  # (session id, stored view)
    profile_views: Sequence[tuple[str, bytes]] = ()  # (field, stored view)

    def __bool__(self) -> bool:
        return bool(self.queue or self.dead or self.views or self.profile_views)


def forget_shard(
    redis: Client, shard: ShardKeys, project_id: str, visitor: str, found: Found
) -> ShardRemoval:
    """Remove `found` from `shard` where still unchanged, and `visitor` from the project's
    active visitors ("" for none)."""
    args: list[Any] = [visitor, len(found.queue)]
    for index, row in found.queue:
        args += (index, row)
    args.append(len(found.dead))
    for index, entry, replacement in found.dead:
        args += (index, entry, replacement)
    args.append(len(found.views))
    for session, value in found.views:
        args += (session, value)
    args.append(len(found.profile_views))
    for field, value in found.profile_views:
        args += (field, value)
    keys = [
        shard.queue,
        shard.claim,
        shard.dead,
        shard.views,
        shard.profile_views,
        shard.sessions,
        shard.visitors(project_id),
    ]
    reply = script("forget_shard")(keys=keys, args=args, client=redis)
    return ShardRemoval(*(number(value) for value in reply))


def forget_tombstone(
    redis: Client,
    keyspace: Keyspace,
    project_id: str,
    field: str,
    request_ms: int,
    expiry_ms: int,
    now_ms: int,
) -> tuple[int, int]:
    """Store a tombstone; returns the (request ms, expiry ms) now stored for that person."""
    reply = script("forget_tombstone")(
        keys=[keyspace.tombstones(project_id), keyspace.tombstoned_projects],
        args=[field, request_ms, expiry_ms, project_id, now_ms, uuid.uuid4().hex],
        client=redis,
    )
    return number(reply[0]), number(reply[1])
