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
from typing import cast

from worker.clock import Clock
from worker.held_pack import held_record, held_rows, held_times
from worker.keys import ShardKeys
from worker.reorder_release import release
from worker.replies import text
from worker.scripts import Released, Scripts
from worker.settings import Settings
from worker.topology import Client

__all__ = ["batch_tag", "held_packs", "held_record", "held_rows", "held_times", "release_due"]

# Sessions released per script call (`release_due` calls again while this many were due).
RELEASE_SESSIONS = 500


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
