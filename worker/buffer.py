"""EventBuffer: applying events to the Redis buffer, and reading its state.

Applying is one transaction for the shards of each master the batch
touches, planned in worker/apply_plan.py and made by worker/apply.py: regular
events are queued, screen_views wait as their session's "last view"
(worker/stored_view.py) until the next view gives them a duration, and
session_end flushes the last view.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

import msgspec

from worker import stored_view
from worker.apply import BatchCheck, BatchWriter, Conflict, content_digest
from worker.apply_plan import plan_shard
from worker.clock import SYSTEM_CLOCK, Clock
from worker.deadletters import DeadLetter, encode_dead_letter
from worker.events import KIND_NAMES, Row, decode_row, encode_event
from worker.keys import CHANNEL_RECEIVED, Keyspace, ShardKeys
from worker.replication import Replicas
from worker.scripts import Scripts
from worker.settings import Settings
from worker.topology import Client
from worker.visitors import active_projects, count_active_visitors


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
    # The digest of the batch's content, which its markers hold.
    digest: str = ""
    # Set when the batch id had been applied with other content: nothing of this batch
    # was applied by this call, it was kept as a batch_id_conflict dead letter.
    conflict: Conflict | None = None

    @property
    def duplicate(self) -> bool:
        """Applied before (a redelivery, or a conflict kept before): nothing was done."""
        return (
            self.conflict is None
            and bool(self.skipped_shards)
            and len(self.skipped_shards) == len(self.queue_lengths)
        )


# Given the shards that hold a batch already and the digest its id's marker holds, the
# dead letter (header, payload) that keeps a batch whose id was used for other content.
KeepConflict = Callable[[frozenset[int], str], tuple[DeadLetter, bytes]]


def stored_view_row(value: bytes) -> bytes:
    """The JSON row of a stored last view, as it is (worker/stored_view.py)."""
    return stored_view.row_of(value)


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
    def __init__(self, redis: Client, settings: Settings, clock: Clock = SYSTEM_CLOCK) -> None:
        self.redis = redis
        self.settings = settings
        self.clock = clock
        self.keyspace = Keyspace(settings.key_prefix, settings.shards)
        self.scripts = Scripts(redis)
        self._writer = BatchWriter(
            marker_ttl_s=settings.batch_marker_ttl_s,
            visitors_ttl_s=settings.active_visitor_window_s + 60,
            views_ttl_s=settings.screen_view_ttl_s,
            replicas=Replicas.from_settings(settings),
        )
        self._publish_throttle = _Throttle(settings.publish_throttle_ms)

    # -- writing ------------------------------------------------------------

    def add(self, event: Row) -> ApplyResult:
        return self.apply([event])

    def apply(
        self,
        events: Sequence[Row],
        batch_id: str | None = None,
        dead_letters: Sequence[tuple[DeadLetter, bytes]] = (),
        *,
        digest: str | None = None,
        keep_conflict: KeepConflict | None = None,
        rows: list[bytes] | None = None,
    ) -> ApplyResult:
        """Apply validated events in order, atomically per shard.

        `batch_id` makes the call idempotent: applying the same id again
        with the same content (a redelivered task) does nothing, as long as
        the marker lives (`EVENT_BUFFER_BATCH_MARKER_TTL_S`). Without one, a
        fresh id is used. The markers hold `digest`, the batch's content
        digest (by default, of the events' rows and the dead letters'
        payloads). `dead_letters` (a header and the raw payload each) are
        stored with the first shard's call, under the same marker; their
        headers name that shard.

        The same id with another digest is a conflict: nothing is applied,
        and `keep_conflict` (given the shards that hold this very batch
        already, and the digest found) returns the dead letter to keep
        instead, stored once per batch id and digest; without it,
        `BatchIdConflictError` is raised. `rows` are the events' rows
        (`encode_event` of each, in order) when the caller has them already.
        """
        batch_id = batch_id or str(uuid.uuid4())
        result = ApplyResult(batch_id=batch_id, events=len(events), dead=len(dead_letters))
        if not events and not dead_letters:
            return result
        if rows is None:
            rows = [encode_event(event) for event in events]
        elif len(rows) != len(events):
            raise ValueError(f"{len(rows)} rows for {len(events)} events")
        if digest is None:
            digest = content_digest([*rows, *(payload for _, payload in dead_letters)])
        result.digest = digest
        by_shard: dict[int, tuple[Sequence[Row], list[bytes]]]
        if self.keyspace.shards == 1:  # no routing: every event, in order, on shard 0
            by_shard = {0: (events, rows)}
        else:
            routed: dict[int, tuple[list[Row], list[bytes]]] = {}
            route = self.keyspace.route
            for event, row in zip(events, rows, strict=True):
                shard = route(event.session_id or event.id).shard
                group = routed.get(shard)
                if group is None:
                    group = routed[shard] = ([], [])
                group[0].append(event)
                group[1].append(row)
            by_shard = dict(routed) or {0: ([], [])}
        now = self.clock.now_ms()
        hold_until = now + self.settings.reorder_window_ms if self.settings.reorder_window_ms else 0
        shards = list(by_shard)
        plans = []
        for shard in shards:
            keys = self.keyspace.shard(shard)
            plan = plan_shard(keys, keys.batch(batch_id), *by_shard[shard], hold_until)
            plan.digest = digest
            plans.append(plan)
        # Dead letters go with the first shard's writes; the last carries the publish.
        plans[0].dead_letters = [
            encode_dead_letter(msgspec.structs.replace(header, shard=shards[0]), payload)
            for header, payload in dead_letters
        ]
        if events and self._publish_throttle.ready(now):
            plans[-1].publish = (CHANNEL_RECEIVED, rows[-1])
        check = None
        if keep_conflict is not None:
            keep = keep_conflict

            def entry(applied: frozenset[int], stored: str) -> bytes:
                header, payload = keep(applied, stored)
                return encode_dead_letter(msgspec.structs.replace(header, shard=shards[0]), payload)

            check = BatchCheck(plans[0].shard.conflict(batch_id, digest), entry)
        written = self._writer.write(self.redis, plans, now, check)
        result.conflict = written.conflict
        for shard, plan, outcome in zip(shards, plans, written.outcomes, strict=True):
            result.queue_lengths[shard] = outcome.queue_length
            if not outcome.applied:
                result.skipped_shards.append(shard)
            else:
                result.appended += outcome.appended
                for kind, count in plan.kinds.items():
                    if count:
                        result.kinds[KIND_NAMES[kind]] += count
        return result

    def shard_of(self, event: Row) -> int:
        """The shard `apply` puts an event on."""
        return self.keyspace.route(event.session_id or event.id).shard

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
                created = stored_view.created_ms(value)
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
