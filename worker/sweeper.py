"""The sweep: nothing is left behind in Redis.

- Last screen_views of sessions idle longer than `EVENT_BUFFER_SESSION_TIMEOUT_S`
  are queued (unchanged, as a session_end would) before their keys expire.
- Visitor entries older than the active-visitor window are pruned, whether
  or not anyone counts them.

Celery Beat runs it every `EVENT_BUFFER_SWEEP_INTERVAL_S` as `eventbuffer.sweep`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from worker import stored_view
from worker.clock import SYSTEM_CLOCK, Clock
from worker.events import decode_row
from worker.keys import Keyspace, ShardKeys
from worker.replies import text
from worker.scripts import Scripts
from worker.settings import Settings
from worker.topology import Client

PAGE = 500  # candidate sessions per script call


@dataclass
class SweepResult:
    views_queued: int = 0
    visitors_pruned: int = 0
    shards: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "views_queued": self.views_queued,
            "visitors_pruned": self.visitors_pruned,
            "shards": list(self.shards),
        }


class Sweeper:
    def __init__(self, redis: Client, settings: Settings, clock: Clock = SYSTEM_CLOCK) -> None:
        self.redis = redis
        self.settings = settings
        self.clock = clock
        self.keyspace = Keyspace(settings.key_prefix, settings.shards)
        self.scripts = Scripts(redis)

    def sweep(self) -> SweepResult:
        result = SweepResult()
        for shard in self.keyspace.all():
            result.views_queued += self.sweep_sessions(shard)
            result.visitors_pruned += self.prune_visitors(shard)
            result.shards.append(shard.shard)
        return result

    def sweep_sessions(self, shard: ShardKeys) -> int:
        """Queue the last views of this shard's quiet sessions; returns how many."""
        cutoff = self.clock.now_ms() - self.settings.session_timeout_s * 1000
        queued = 0
        while True:
            members = self.redis.zrangebyscore(shard.sessions, "-inf", cutoff, start=0, num=PAGE)
            if not members:
                return queued
            session_ids = [text(m) for m in members]
            stored = cast(list[bytes | None], self.redis.hmget(shard.views, session_ids))
            candidates: list[tuple[str, str]] = []
            for session_id, value in zip(session_ids, stored, strict=True):
                profile_field = ""
                if value is not None:
                    event = decode_row(stored_view.row_of(value))
                    if event.profile_id:
                        profile_field = shard.profile_field(event.project_id, event.profile_id)
                candidates.append((session_id, profile_field))
            queued += self.scripts.sweep_sessions(shard, cutoff, candidates)
            if len(members) < PAGE:
                return queued

    def prune_visitors(self, shard: ShardKeys) -> int:
        """Drop visitor entries older than the window; returns how many."""
        cutoff = self.clock.now_ms() - self.settings.active_visitor_window_s * 1000
        pruned = 0
        for key in self.redis.scan_iter(match=shard.visitors_pattern(), count=500):
            pruned += int(self.redis.zremrangebyscore(key, "-inf", f"({cutoff}"))
        # The shard's project index: a project unseen for the window has no visitors left.
        self.redis.zremrangebyscore(shard.visitor_projects, "-inf", f"({cutoff}")
        return pruned
