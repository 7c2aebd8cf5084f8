"""EventBuffer: applying events to the Redis buffer, and reading its state.

Applying is one Lua call per shard touched by the batch (pipelined, one
round trip): regular events are queued, screen_views wait as their
session's "last view" until the next view gives them a duration, and
session_end flushes the last view. See `lua_scripts/apply_batch.lua`.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

import msgspec
from redis import Redis

from worker.clock import SYSTEM_CLOCK, Clock
from worker.deadletters import DeadLetter, encode_dead_letter
from worker.events import KIND_NAMES, Row, decode_row, encode_event
from worker.keys import CHANNEL_RECEIVED, Keyspace, ShardKeys
from worker.scripts import ALREADY_APPLIED, Scripts, apply_reply
from worker.settings import Settings
from worker.state import active_projects, count_active_visitors


@dataclass
class ApplyResult:
    """What one `apply` did."""

    batch_id: str
    events: int
    dead: int = 0
    appended: int = 0
    # Shards where this batch id had been applied before (nothing was done there).
    skipped_shards: list[int] = field(default_factory=list)
    # Queue length of every shard the batch touched, after the call.
    queue_lengths: dict[int, int] = field(default_factory=dict)
    # Events applied by how the buffer treated them: "regular", "screen_view", "session_end".
    kinds: Counter[str] = field(default_factory=Counter)

    @property
    def duplicate(self) -> bool:
        return bool(self.skipped_shards) and len(self.skipped_shards) == len(self.queue_lengths)


def stored_view_row(value: bytes) -> bytes:
    """The JSON row of a stored last view, "<created ms>|<own duration>|<row>"."""
    return value.split(b"|", 2)[2]


class _Throttle:
    """True at most once per interval (per process): OpenPanel's publish throttle."""

    def __init__(self, interval_ms: int) -> None:
        self._interval = interval_ms
        self._last: int | None = None
        self._lock = threading.Lock()

    def ready(self, now_ms: int) -> bool:
        with self._lock:
            if self._last is not None and now_ms - self._last < self._interval:
                return False
            self._last = now_ms
            return True


class EventBuffer:
    def __init__(self, redis: Redis, settings: Settings, clock: Clock = SYSTEM_CLOCK) -> None:
        self.redis = redis
        self.settings = settings
        self.clock = clock
        self.keyspace = Keyspace(settings.key_prefix, settings.shards)
        self.scripts = Scripts(redis)
        self._publish_throttle = _Throttle(settings.publish_throttle_ms)

    # -- writing ------------------------------------------------------------

    def add(self, event: Row) -> ApplyResult:
        return self.apply([event])

    def apply(
        self,
        events: Sequence[Row],
        batch_id: str | None = None,
        dead_letters: Sequence[tuple[DeadLetter, bytes]] = (),
    ) -> ApplyResult:
        """Apply validated events in order, atomically per shard.

        `batch_id` makes the call idempotent: applying the same id again (a
        redelivered task) does nothing, as long as the marker lives
        (`EVENT_BUFFER_BATCH_MARKER_TTL_S`). Without one, a fresh id is used.
        `dead_letters` (a header and the raw payload each) are stored with
        the first shard's call, under the same marker; their headers name
        that shard.
        """
        batch_id = batch_id or str(uuid.uuid4())
        result = ApplyResult(batch_id=batch_id, events=len(events), dead=len(dead_letters))
        if not events and not dead_letters:
            return result
        by_shard: dict[int, tuple[list[Row], list[bytes]]] = {}
        for event in events:
            shard = self.keyspace.route(event.session_id or event.id).shard
            group = by_shard.setdefault(shard, ([], []))
            group[0].append(event)
            group[1].append(encode_event(event))

        if not by_shard:
            by_shard[0] = ([], [])
        now = self.clock.now_ms()
        publish = None
        if events and self._publish_throttle.ready(now):
            publish = (CHANNEL_RECEIVED, encode_event(events[-1]))
        shards = list(by_shard)
        # One shard (the default): call the script directly. A pipeline would
        # cost redis-py's SCRIPT EXISTS round trip on every call.
        pipe = self.redis.pipeline(transaction=False) if len(shards) > 1 else None
        dead = [
            encode_dead_letter(msgspec.structs.replace(header, shard=shards[0]), payload)
            for header, payload in dead_letters
        ]
        replies = []
        for position, shard in enumerate(shards):
            group_events, rows = by_shard[shard]
            replies.append(
                self.scripts.apply_batch(
                    self.keyspace.shard(shard),
                    batch_id,
                    group_events,
                    rows,
                    now_ms=now,
                    view_ttl_s=self.settings.screen_view_ttl_s,
                    marker_ttl_s=self.settings.batch_marker_ttl_s,
                    visitors_ttl_s=self.settings.active_visitor_window_s + 60,
                    publish=publish if position == len(shards) - 1 else None,
                    dead_letters=dead if position == 0 else (),
                    pipeline=pipe,
                )
            )
        if pipe is not None:
            # A shard whose key has the wrong type was left untouched; shards
            # applied before it in the pipeline stay applied (their batch
            # markers skip them when the batch comes again).
            replies = [apply_reply(reply) for reply in pipe.execute()]
        for shard, (appended, length) in zip(shards, replies, strict=True):
            result.queue_lengths[shard] = int(length)
            if int(appended) == ALREADY_APPLIED:
                result.skipped_shards.append(shard)
            else:
                result.appended += int(appended)
                result.kinds.update(KIND_NAMES[e.kind] for e in by_shard[shard][0])
        return result

    # -- reading ------------------------------------------------------------

    def get_last_screen_view(
        self,
        *,
        session_id: str | None = None,
        project_id: str | None = None,
        profile_id: str | None = None,
    ) -> Row | None:
        """A session's (or a project's profile's) last screen_view, or None."""
        if session_id is not None:
            views = self.keyspace.route(session_id).views
            value = cast(bytes | None, self.redis.hget(views, session_id))
            return decode_row(stored_view_row(value)) if value is not None else None
        if project_id is None or profile_id is None:
            raise TypeError("pass session_id, or project_id and profile_id")
        # A profile's sessions may live on several shards: take the newest view.
        field = ShardKeys.profile_field(project_id, profile_id)
        pipe = self.redis.pipeline(transaction=False)
        for shard in self.keyspace.all():
            pipe.hget(shard.profile_views, field)
        newest: tuple[int, bytes] | None = None
        for value in cast(list[bytes | None], pipe.execute()):
            if value is not None:
                created = int(value.partition(b"|")[0])
                if newest is None or created > newest[0]:
                    newest = (created, value)
        return decode_row(stored_view_row(newest[1])) if newest else None

    def get_buffer_size(self) -> int:
        """Events waiting for ClickHouse: queued plus claimed, straight from LLEN."""
        return sum(self.queue_lengths().values())

    def queue_lengths(self) -> dict[int, int]:
        pipe = self.redis.pipeline(transaction=False)
        shards = self.keyspace.all()
        for shard in shards:
            pipe.llen(shard.queue)
        return {s.shard: int(n) for s, n in zip(shards, pipe.execute(), strict=True)}

    def get_active_visitor_count(self, project_id: str) -> int:
        """Distinct profiles seen within the active-visitor window; prunes older entries."""
        cutoff = self.clock.now_ms() - self.settings.active_visitor_window_s * 1000
        counts = count_active_visitors(self.redis, self.keyspace, [project_id], cutoff, prune=True)
        return counts[project_id]

    def active_projects(self) -> list[str]:
        """Projects with a visitors set on any shard."""
        return active_projects(self.redis, self.keyspace)

    def shards(self) -> Iterable[ShardKeys]:
        return self.keyspace.all()
