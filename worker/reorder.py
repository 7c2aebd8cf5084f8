"""The reorder window: session events wait a moment, then reach their session by created_at.

A screen_view's duration is the gap to its session's next view by
`created_at`, and a session_end closes the session. With several ingest
processes (the default layout), neighbouring tasks are applied in whichever
order the processes finish, so a session's later event is often applied
before an earlier one. With `EVENT_BUFFER_REORDER_WINDOW_MS` > 0 the apply
therefore does not hand screen_views and session_ends to their session at
once: it appends each one's record (`held_record`) to its session's pack,
`{p:N}:held:<session>` (a plain APPEND in the apply's transaction: no Lua,
the rows never pass through Lua while ingesting), and notes the session's
earliest deadline (arrival + window) in `held-due`. Every flush of a shard
first calls `release_due`: each due session's held events created no later
than its newest due one go, oldest first, through OpenPanel's rules, before
the flush claims (decided in Python and written in one WATCHed transaction,
worker/reorder_release.py; release_held.lua has the rules, and does the same
inside Redis when that transaction cannot run).

The rule that follows: an event is put in its place when it arrives no later
than one window after every event of its session created after it. One that
arrives later still is *late*: a late view is queued at once with its own
duration (the view before it keeps the duration it was given), a late
session_end still closes its session, and a view created before the
session_end of a session already closed (remembered
`EVENT_BUFFER_CLOSED_SESSION_TTL_S`) is queued as it is; one created after it
reopens the session, as OpenPanel's buffer does with events in order.
Late events are counted (`eventbuffer_events_late_total`).

Regular events are never held. With a window of 0 nothing is held and the
apply is OpenPanel's, row for row (worker/apply.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import cast

from worker import stored_view
from worker.clock import Clock
from worker.keys import ShardKeys
from worker.reorder_release import release
from worker.replies import text
from worker.scripts import Released, Scripts
from worker.settings import Settings
from worker.topology import Client

# Sessions released per script call (`release_due` calls again while this many were due).
RELEASE_SESSIONS = 500


def held_record(
    created_ms: int,
    deadline_ms: int,
    tag: str,
    kind: str,
    profile_field: str,
    own_duration: int,
    head: bytes,
) -> bytes:
    """One held event, framed for its session's pack (release_held.lua's header has
    the format): its header, then the event in its stored form (worker/stored_view.py,
    `head` being its row without duration and closing brace).

    The first 44 bytes order a session's records: created_at, then deadline
    (arrival), then `tag`, which makes events of one batch unique and keeps their
    batch order.
    """
    record = b"%015d%015d%b%b%b|%d;%d;%b" % (
        created_ms,
        deadline_ms,
        tag.encode(),
        kind.encode(),
        profile_field.encode(),
        created_ms,
        own_duration,
        head,
    )
    return b"%d:%b" % (len(record), record)


def _records(pack: bytes) -> Iterator[bytes]:
    """The records of a session's pack, in pack order."""
    at = 0
    while at < len(pack):
        colon = pack.index(b":", at)
        stop = colon + 1 + int(pack[at:colon])
        yield pack[colon + 1 : stop]
        at = stop


def held_rows(pack: bytes) -> list[bytes]:
    """The JSON rows of the records in a session's pack, in pack order (as they are: with
    their own durations). Records of the legacy stored form are read too."""
    return [stored_view.row_of(record.split(b"|", 1)[1]) for record in _records(pack)]


def held_times(pack: bytes) -> list[tuple[int, int]]:
    """(created ms, deadline ms) of the records in a session's pack."""
    return [(int(record[:15]), int(record[15:30])) for record in _records(pack)]


def held_packs(redis: Client, shard: ShardKeys) -> dict[str, bytes]:
    """Every session of `shard` that holds events, with its pack (for tests and benchmarks)."""
    sessions = [text(m) for m in redis.zrange(shard.held_due, 0, -1)]
    if not sessions:
        return {}
    packs = cast(list[bytes | None], redis.mget([shard.held(session) for session in sessions]))
    return {s: p for s, p in zip(sessions, packs, strict=True) if p is not None}


def batch_tag(marker: str) -> str:
    """The first 8 characters of the tags of one batch's held events (a tag is 14)."""
    return f"{zlib.crc32(marker.encode('utf-8', 'surrogatepass')):08x}"


def release_due(scripts: Scripts, shard: ShardKeys, settings: Settings, clock: Clock) -> Released:
    """Release every session of `shard` whose held events are due by now: what a flush
    does first, so they are queued before it claims.

    With a window the script runs at least once, with no session when none is due:
    it also forgets closed sessions past `EVENT_BUFFER_CLOSED_SESSION_TTL_S`. Without
    one, it runs only for events held before the window was set to 0.
    """
    rows = late = 0
    redis = scripts.redis
    while True:
        now = clock.now_ms()
        listed = redis.zrangebyscore(shard.held_due, "-inf", now, 0, RELEASE_SESSIONS)
        due = [text(m) for m in listed]
        if not due and not settings.reorder_window_ms:
            # Nothing held (nor closed) without a window: no script call before each batch.
            return Released(rows, late)
        released = release(
            redis, shard, due, now, settings.screen_view_ttl_s, settings.closed_session_ttl_s
        )
        rows += released.rows
        late += released.late
        if len(due) < RELEASE_SESSIONS:
            return Released(rows, late)
