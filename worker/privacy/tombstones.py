"""Tombstones: a forgotten person's events that arrive after the request are dropped.

`eventbuffer forget` stores one per project and person (forget_tombstone.lua):
the moment of the request, kept `EVENT_BUFFER_FORGET_TOMBSTONE_DAYS`. Two
places read them:

- ingest, before the apply (`drop_forgotten_events`): the hash of projects
  that have tombstones, read at most every `REFRESH_S` per process and
  client (a read per batch cost in-process ingest 10-30 % under load, see
  the README's benchmark); nothing more when the batch's projects have none.
  `forget` waits longer than `REFRESH_S` after storing a tombstone before
  it erases the buffer, so every batch applied after that pass was checked
  against it (and this process forgets its copy at once).
- the flusher, right before each INSERT (`write_fenced`): the fence for
  rows already queued or claimed when the request came. One HGETALL of that
  hash every time (an INSERT costs far more), usually empty; only then are
  the rows of those projects decoded.

A project's entry in that hash changes with every request, so each process
keeps the project's tombstones (one HGETALL) until the entry changes.

An event created after the request is new data and passes: only
`created_at <= request` is dropped.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote

import msgspec

from worker.clock import SYSTEM_CLOCK, Clock
from worker.events import Event, datetime_ms
from worker.keys import Keyspace
from worker.privacy.forget_scripts import forget_tombstone
from worker.privacy.selector import PersonHead, Selector
from worker.replies import text
from worker.sinks.base import Sink
from worker.topology import Client

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
# Ingest reads the tombstoned projects at most this often per process and client.
REFRESH_S = 0.2
T = TypeVar("T")
_head_decoder = msgspec.json.Decoder(PersonHead)


def store_tombstone(
    redis: Client,
    keyspace: Keyspace,
    selector: Selector,
    request_ms: int,
    days: int,
    clock: Clock = SYSTEM_CLOCK,
) -> tuple[int, int]:
    """Record the request; returns the (request ms, expiry ms) stored for the person
    (a later request's moment, should one be stored already)."""
    _projects.clear()  # this process sees it at once; the others within REFRESH_S
    return forget_tombstone(
        redis,
        keyspace,
        selector.project_id,
        selector.field,
        request_ms,
        request_ms + days * DAY_MS,
        clock.now_ms(),
    )


def _moment(value: object, now_ms: int) -> int | None:
    """The request ms of a stored tombstone "<request ms>|<expiry ms>", None if expired."""
    if value is None:
        return None
    request, _, expiry = text(value).partition("|")
    try:
        if int(expiry) <= now_ms:
            return None
        return int(request)
    except ValueError:
        return None


Stones = dict[tuple[str, str], tuple[int, int]]  # (kind, id) -> (request ms, expiry ms)


def _forgotten(stones: Stones, head: PersonHead | Event, created_ms: int, now_ms: int) -> bool:
    """Whether a tombstone of the event's project covers it (by any of its ids)."""
    for key in (
        ("profile", head.profile_id),
        ("device", head.device_id),
        ("session", head.session_id),
    ):
        stone = stones.get(key)
        if stone is not None and created_ms <= stone[0] and stone[1] > now_ms:
            return True
    return False


def _live(entry: object, now_ms: int) -> str | None:
    """A project's entry among the tombstoned projects, "<latest expiry>|<token>", if it
    has a tombstone that has not expired."""
    if entry is None:
        return None
    value = text(entry)
    expiry = value.partition("|")[0]
    return value if expiry.isdigit() and int(expiry) > now_ms else None


# The tombstoned projects as ingest last read them, per client: (monotonic time, entries).
_projects: weakref.WeakKeyDictionary[Any, tuple[float, dict[str, str]]] = (
    weakref.WeakKeyDictionary()
)


def _tombstoned(redis: Client, keyspace: Keyspace, now_ms: int, fresh: bool) -> dict[str, str]:
    """Project -> its live entry among the tombstoned projects; read now when `fresh`,
    else at most every REFRESH_S."""
    cached = None if fresh else _projects.get(redis)
    if cached is not None and time.monotonic() - cached[0] < REFRESH_S:
        raw = cached[1]
    else:
        started = time.monotonic()
        raw = {
            text(project): text(entry)
            for project, entry in redis.hgetall(keyspace.tombstoned_projects).items()
        }
        if not fresh:
            _projects[redis] = (started, raw)
    return {project: entry for project, entry in raw.items() if _live(entry, now_ms)}


# A project's tombstones, read once per change of its entry among the tombstoned
# projects (each change carries a new token): (key, entry) -> field -> request ms.
_CACHE_PROJECTS = 1024
_cache: dict[tuple[str, str], Stones] = {}


def _tombstones(redis: Client, keyspace: Keyspace, entries: dict[str, str]) -> dict[str, Stones]:
    """Project -> field -> (request ms, expiry ms), for projects whose entry is live:
    from the cache, else read in one round trip."""
    found: dict[str, Stones] = {}
    missing = []
    for project, entry in entries.items():
        cached = _cache.get((keyspace.tombstones(project), entry))
        if cached is None:
            missing.append((project, entry))
        else:
            found[project] = cached
    if missing:
        with redis.pipeline(transaction=False) as pipe:
            for project, _ in missing:
                pipe.hgetall(keyspace.tombstones(project))
            replies = pipe.execute()
        for (project, entry), reply in zip(missing, replies, strict=True):
            stones: Stones = {}
            for field, value in reply.items():
                kind, _, escaped = text(field).partition(":")
                request, _, expiry = text(value).partition("|")
                if request.isdigit() and expiry.isdigit():
                    stones[(kind, unquote(escaped))] = (int(request), int(expiry))
            if len(_cache) >= _CACHE_PROJECTS:
                _cache.clear()
            _cache[(keyspace.tombstones(project), entry)] = stones
            found[project] = stones
    return found


def drop_forgotten_events(
    redis: Client,
    keyspace: Keyspace,
    events: list[Event],
    positions: list[T],
    clock: Clock = SYSTEM_CLOCK,
) -> tuple[list[Event], list[T]]:
    """`events` (and their `positions`, kept alongside) without those of forgotten people
    created at or before their request.

    The tombstoned projects come from a copy at most REFRESH_S old: no read at all
    for most batches. A project that has tombstones has them cached in this
    process until its next request (one HGETALL then). The lists themselves come
    back when nothing is dropped.
    """
    if not events:
        return events, positions
    now_ms = clock.now_ms()
    tombstoned = _tombstoned(redis, keyspace, now_ms, fresh=False)
    if not tombstoned:
        return events, positions
    entries = {
        project: tombstoned[project]
        for project in {event.project_id for event in events}
        if project in tombstoned
    }
    if not entries:
        return events, positions
    stones = _tombstones(redis, keyspace, entries)
    keep = [
        event.project_id not in stones
        or not _forgotten(stones[event.project_id], event, event.created_ms, now_ms)
        for event in events
    ]
    dropped = keep.count(False)
    if not dropped:
        return events, positions
    log.info("dropped %d event(s) of forgotten people at ingest", dropped)
    return (
        [e for e, k in zip(events, keep, strict=True) if k],
        [p for p, k in zip(positions, keep, strict=True) if k],
    )


def drop_forgotten_rows(
    redis: Client, keyspace: Keyspace, rows: Sequence[bytes], clock: Clock = SYSTEM_CLOCK
) -> Sequence[bytes]:
    """The fence: `rows` (stored JSON rows about to be inserted) without those of
    forgotten people created at or before their request. `rows` itself when no project
    has tombstones (one HGETALL of an absent or small hash) or none of them is theirs."""
    if not rows:
        return rows
    now_ms = clock.now_ms()
    entries = _tombstoned(redis, keyspace, now_ms, fresh=True)
    if not entries:
        return rows
    needles = [b'"project_id":' + msgspec.json.encode(project) for project in entries]
    heads: dict[int, PersonHead] = {}
    for index, row in enumerate(rows):
        if not any(needle in row for needle in needles):
            continue
        try:
            heads[index] = _head_decoder.decode(row)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # not a row: the flusher dead-letters it as it would have
    if not heads:
        return rows
    stones = _tombstones(
        redis,
        keyspace,
        {p: entries[p] for p in {h.project_id for h in heads.values()} if p in entries},
    )
    dropped: set[int] = set()
    for index, head in heads.items():
        project = stones.get(head.project_id)
        if project is None:
            continue
        try:
            created_ms = datetime_ms(head.created_at)
        except ValueError:
            continue
        if _forgotten(project, head, created_ms, now_ms):
            dropped.add(index)
    if not dropped:
        return rows
    log.info("fence: dropped %d row(s) of forgotten people before an insert", len(dropped))
    return [row for index, row in enumerate(rows) if index not in dropped]


def write_fenced(
    sink: Sink,
    redis: Client,
    keyspace: Keyspace,
    rows: Sequence[bytes],
    token: str,
    *,
    fenced: Callable[[], None] | None = None,
) -> int:
    """The flusher's INSERT of a chunk, fenced: the rows of forgotten people are dropped
    right before it (`drop_forgotten_rows`), and a chunk left empty is not sent (its
    token stays unused: a re-drive drops the same rows and skips it again). `fenced` is
    called once the fence is passed, before the INSERT.

    Returns how many rows the fence dropped (not inserted, not counted as saved)."""
    kept = drop_forgotten_rows(redis, keyspace, rows)
    if fenced is not None:
        fenced()
    if kept:
        sink.write(kept, token)
    return len(rows) - len(kept)
