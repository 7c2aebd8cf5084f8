"""Tombstones: a forgotten person's events that arrive after the request are dropped.

`eventbuffer forget` stores one per project and person (forget_tombstone.lua):
the moment of the request, kept `EVENT_BUFFER_FORGET_TOMBSTONE_DAYS`. Two
places read them:

- ingest, before the apply (`drop_forgotten_events`): one pipelined read,
  an HMGET per project of the batch naming exactly the batch's profile,
  device and session ids. A project without tombstones answers nothing, so
  the read costs one round trip of empty replies.
- the flusher, right before each INSERT (`write_fenced`): the fence
  for rows already queued or claimed when the request came. One HGETALL of
  the projects that have tombstones, usually empty; only then are the rows
  of those projects decoded and their ids looked up.

An event created after the request is new data and passes: only
`created_at <= request` is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

import msgspec

from worker.clock import SYSTEM_CLOCK, Clock
from worker.events import Event, datetime_ms
from worker.keys import Keyspace
from worker.privacy.scripts import forget_tombstone
from worker.privacy.selector import KINDS, PersonHead, Selector, tombstone_field
from worker.replies import text
from worker.sinks.base import Sink
from worker.topology import Client

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
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


def _ids(head: PersonHead | Event) -> list[str]:
    """The tombstone fields an event could be under."""
    return [
        tombstone_field(kind, value)
        for kind in KINDS
        if (value := getattr(head, f"{kind}_id") or "")
    ]


def _lookup(
    redis: Client, keyspace: Keyspace, wanted: dict[str, set[str]], now_ms: int
) -> dict[tuple[str, str], int]:
    """(project, field) -> request ms of each live tombstone among `wanted`, in one round trip."""
    if not wanted:
        return {}
    order = [(project, sorted(fields)) for project, fields in wanted.items() if fields]
    if not order:
        return {}
    with redis.pipeline(transaction=False) as pipe:
        for project, fields in order:
            pipe.hmget(keyspace.tombstones(project), fields)
        replies = pipe.execute()
    found: dict[tuple[str, str], int] = {}
    for (project, fields), values in zip(order, replies, strict=True):
        for field, value in zip(fields, values, strict=True):
            moment = _moment(value, now_ms)
            if moment is not None:
                found[(project, field)] = moment
    return found


def _forgotten(
    tombs: dict[tuple[str, str], int], project: str, fields: list[str], created_ms: int
) -> bool:
    return any(created_ms <= tombs.get((project, field), -1) for field in fields)


def drop_forgotten_events(
    redis: Client,
    keyspace: Keyspace,
    events: list[Event],
    positions: list[T],
    clock: Clock = SYSTEM_CLOCK,
) -> tuple[list[Event], list[T]]:
    """`events` (and their `positions`, kept alongside) without those of forgotten people
    created at or before their request. One pipelined read; the lists themselves when
    nothing is dropped."""
    if not events:
        return events, positions
    wanted: dict[str, set[str]] = {}
    fields_of = []
    for event in events:
        fields = _ids(event)
        fields_of.append(fields)
        if fields:
            wanted.setdefault(event.project_id, set()).update(fields)
    tombs = _lookup(redis, keyspace, wanted, clock.now_ms())
    if not tombs:
        return events, positions
    keep = [
        not _forgotten(tombs, event.project_id, fields, event.created_ms)
        for event, fields in zip(events, fields_of, strict=True)
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
    projects = [
        project
        for project, expiry in (
            (text(k), text(v)) for k, v in redis.hgetall(keyspace.tombstoned_projects).items()
        )
        if expiry.isdigit() and int(expiry) > now_ms
    ]
    if not projects:
        return rows
    needles = [b'"project_id":' + msgspec.json.encode(project) for project in projects]
    heads: dict[int, PersonHead] = {}
    wanted: dict[str, set[str]] = {}
    for index, row in enumerate(rows):
        if not any(needle in row for needle in needles):
            continue
        try:
            head = _head_decoder.decode(row)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # not a row: the flusher dead-letters it as it would have
        heads[index] = head
        wanted.setdefault(head.project_id, set()).update(_ids(head))
    tombs = _lookup(redis, keyspace, wanted, now_ms)
    if not tombs:
        return rows
    dropped: set[int] = set()
    for index, head in heads.items():
        try:
            created_ms = datetime_ms(head.created_at)
        except ValueError:
            continue
        if _forgotten(tombs, head.project_id, _ids(head), created_ms):
            dropped.add(index)
    if not dropped:
        return rows
    log.info("fence: dropped %d row(s) of forgotten people before an insert", len(dropped))
    return [row for index, row in enumerate(rows) if index not in dropped]


def write_fenced(
    sink: Sink, redis: Client, keyspace: Keyspace, rows: Sequence[bytes], token: str
) -> None:
    """The flusher's INSERT of a chunk, fenced: the rows of forgotten people are dropped
    right before it (`drop_forgotten_rows`), and a chunk left empty is not sent (its
    token stays unused: a re-drive drops the same rows and skips it again)."""
    kept = drop_forgotten_rows(redis, keyspace, rows)
    if kept:
        sink.write(kept, token)
