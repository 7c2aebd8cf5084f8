"""The reorder window: session events wait a moment, then reach their session by created_at.

A screen_view's duration is the gap to its session's next view by
`created_at`, and a session_end closes the session. With several ingest
processes (the default layout), neighbouring tasks are applied in whichever
order the processes finish, so a session's later event is often applied
before an earlier one. With `EVENT_BUFFER_REORDER_WINDOW_MS` > 0 the apply
therefore does not hand screen_views and session_ends to their session at
once: it holds them, one member each in the shard's `held` sorted set
(ordered by session, then created_at), and notes the session's earliest
deadline (arrival + window) in `held-due`. `release_held.lua` later takes
each due session's held events created no later than its newest due one,
oldest first, and applies OpenPanel's rules to them. It runs in every apply's
transaction (for the sessions due by then) and before every flush of a shard
(so a quiet buffer is released too).

The rule that follows: an event is put in its place when it arrives no later
than one window after every event of its session created after it. One that
arrives later still is *late*: a late view is queued at once with its own
duration (the view before it keeps the duration it was given), a late
session_end still closes its session, and any event of a session already
closed (remembered `EVENT_BUFFER_CLOSED_SESSION_TTL_S`) is queued as it is.
Late events are counted (`eventbuffer_events_late_total`).

Regular events are never held. With a window of 0 nothing is held and the
apply is OpenPanel's, row for row (worker/apply.py).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from worker.clock import Clock
from worker.keys import ShardKeys, escape
from worker.scripts import Scripts
from worker.settings import Settings

# Sessions released per script call: an apply releases at most this many (a flush loops).
RELEASE_SESSIONS = 500


def held_member(
    session_id: str,
    created_ms: int,
    deadline_ms: int,
    tag: str,
    kind: str,
    profile_field: str,
    own_duration: int,
    row: bytes,
) -> bytes:
    """One held event, as release_held.lua reads it (its header describes the format).

    Members of one session sort by created_at, then by deadline (arrival), then by
    `tag`, which makes events of one batch unique and keeps their batch order.
    """
    return b"%s|%015d|%015d|%s|%s|%s|%d|%b" % (
        escape(session_id).encode(),
        created_ms,
        deadline_ms,
        tag.encode(),
        kind.encode(),
        profile_field.encode(),
        own_duration,
        row,
    )


def held_row(member: bytes) -> bytes:
    """The JSON row of a held event (what follows its seven header fields)."""
    return member.split(b"|", 7)[7]


def batch_tag(marker: str) -> str:
    """A short prefix for the tags of one batch's held events (see `held_member`)."""
    return f"{zlib.crc32(marker.encode('utf-8', 'surrogatepass')):08x}"


@dataclass
class ReleaseResult:
    rows: int = 0
    late: int = 0


def release_due(
    scripts: Scripts, shard: ShardKeys, settings: Settings, clock: Clock
) -> ReleaseResult:
    """Release every session of `shard` whose held events are due by now (what a flush
    does first, so events held in a quiet buffer do not wait for the next apply)."""
    result = ReleaseResult()
    while True:
        released = scripts.release_held(
            shard,
            clock.now_ms(),
            RELEASE_SESSIONS,
            settings.screen_view_ttl_s,
            settings.closed_session_ttl_s,
        )
        result.rows += released.rows
        result.late += released.late
        if not released.more:
            return result
