"""The sweep against a real Redis: nothing is left behind, nothing grows without bound."""

from __future__ import annotations

from typing import Any

import pytest
import redis as redis_lib

from tests.support.clock import ManualClock
from worker.buffer import EventBuffer
from worker.events import Event, as_row, decode_row, parse_event
from worker.keys import ShardKeys
from worker.scripts import Scripts
from worker.settings import Settings
from worker.sweeper import Sweeper

KEYS = ShardKeys("eventbuffer", 0)
MINUTE = 60_000


def view(session: str, created_ms: int, profile: str = "", **fields: Any) -> Event:
    return parse_event(
        {
            "project_id": "p1",
            "name": "screen_view",
            "created_at": created_ms,
            "session_id": session,
            "profile_id": profile,
            **fields,
        }
    )


@pytest.fixture
def sweeper(redis: redis_lib.Redis, settings: Settings, clock: ManualClock) -> Sweeper:
    return Sweeper(redis, settings, clock)


def queued(redis: redis_lib.Redis) -> list[Event]:
    return [decode_row(row) for row in redis.lrange(KEYS.queue, 0, -1)]


def test_a_quiet_sessions_last_view_is_queued_before_it_expires(
    buffer: EventBuffer, sweeper: Sweeper, clock: ManualClock, redis: redis_lib.Redis
) -> None:
    t = clock.now_ms()
    first, last = view("s1", t, "u1"), view("s1", t + 5000, "u1", duration=3)
    buffer.apply([first, last])
    clock.advance(29 * MINUTE)
    assert sweeper.sweep().views_queued == 0, "29 minutes idle is not yet a timeout"
    clock.advance(2 * MINUTE)
    assert sweeper.sweep().views_queued == 1
    assert [(e.id, e.duration) for e in queued(redis)] == [(first.id, 5000), (last.id, 3)]
    assert buffer.get_last_screen_view(session_id="s1") is None
    assert buffer.get_last_screen_view(project_id="p1", profile_id="u1") is None
    assert redis.zcard(KEYS.sessions) == 0
    assert sweeper.sweep().views_queued == 0, "a view is queued once"


def test_an_active_session_is_left_alone(
    buffer: EventBuffer, sweeper: Sweeper, clock: ManualClock, redis: redis_lib.Redis
) -> None:
    buffer.add(view("old", clock.now_ms()))
    clock.advance(20 * MINUTE)
    recent = view("recent", clock.now_ms())
    buffer.add(recent)
    clock.advance(15 * MINUTE)
    assert sweeper.sweep().views_queued == 1
    assert buffer.get_last_screen_view(session_id="recent") == as_row(recent)


def test_a_session_that_moved_on_keeps_its_profiles_newer_view(
    buffer: EventBuffer, sweeper: Sweeper, clock: ManualClock
) -> None:
    buffer.add(view("s-old", clock.now_ms(), "u1"))
    clock.advance(31 * MINUTE)
    newer = view("s-new", clock.now_ms(), "u1")
    buffer.add(newer)
    assert sweeper.sweep().views_queued == 1
    assert buffer.get_last_screen_view(project_id="p1", profile_id="u1") == as_row(newer)


def test_the_script_rechecks_idleness_atomically(
    buffer: EventBuffer, clock: ManualClock, redis: redis_lib.Redis
) -> None:
    buffer.add(view("s1", clock.now_ms()))
    cutoff = clock.now_ms()
    clock.advance(MINUTE)
    again = view("s1", clock.now_ms())
    buffer.add(again)  # the session woke up after the candidate list was read
    assert Scripts(redis).sweep_sessions(KEYS, cutoff, [("s1", "")]) == 0
    assert buffer.get_last_screen_view(session_id="s1") == as_row(again)


def test_session_end_takes_the_session_out_of_the_index(
    buffer: EventBuffer, redis: redis_lib.Redis, clock: ManualClock
) -> None:
    buffer.add(view("s1", clock.now_ms()))
    assert redis.zscore(KEYS.sessions, "s1") is not None
    buffer.add(
        parse_event(
            {
                "project_id": "p1",
                "name": "session_end",
                "created_at": clock.now_ms(),
                "session_id": "s1",
            }
        )
    )
    assert redis.zcard(KEYS.sessions) == 0


def test_stale_visitors_are_pruned_and_sets_expire(
    buffer: EventBuffer, sweeper: Sweeper, clock: ManualClock, redis: redis_lib.Redis
) -> None:
    buffer.add(
        parse_event(
            {"project_id": "p1", "name": "x", "created_at": clock.now_ms(), "profile_id": "a"}
        )
    )
    assert 0 < redis.ttl(KEYS.visitors("p1")) <= 360
    clock.advance(4 * MINUTE)
    buffer.add(
        parse_event(
            {"project_id": "p1", "name": "x", "created_at": clock.now_ms(), "profile_id": "b"}
        )
    )
    clock.advance(2 * MINUTE)
    assert sweeper.sweep().visitors_pruned == 1
    assert redis.zrange(KEYS.visitors("p1"), 0, -1) == [b"b"]


def test_redis_memory_stays_bounded_under_a_long_stream_of_sessions(
    redis: redis_lib.Redis, settings: Settings, clock: ManualClock
) -> None:
    # One simulated hour of sessions that never send session_end, flushed as a
    # flusher would, swept every minute. Redis must hold no more than (a) the
    # fixed per-shard keys, sized by the sessions active within the timeout,
    # and (b) keys that expire on their own within the longest configured TTL.
    buffer = EventBuffer(redis, settings, clock)
    sweeper = Sweeper(redis, settings, clock)
    per_minute = 100
    for minute in range(60):
        buffer.apply(
            [
                view(f"m{minute}-s{n}", clock.now_ms() + k, f"u{minute}-{n}")
                for n in range(per_minute)
                for k in (0, 1000)
            ]
        )
        redis.delete(KEYS.queue)  # as if flushed
        sweeper.sweep()
        clock.advance(MINUTE)

    active_minutes = settings.session_timeout_s // 60 + 1
    assert redis.zcard(KEYS.sessions) <= active_minutes * per_minute
    assert 0 < redis.hlen(KEYS.views) <= active_minutes * per_minute
    assert 0 < redis.hlen(KEYS.profile_views) <= active_minutes * per_minute
    fixed = {KEYS.queue, KEYS.sessions, KEYS.dead, KEYS.stats, KEYS.claim, KEYS.lock}
    longest = max(
        settings.screen_view_ttl_s,
        settings.batch_marker_ttl_s,
        settings.active_visitor_window_s + 60,
    )
    for key in redis.scan_iter():
        name = key.decode()
        if name in fixed:
            continue
        assert 0 < redis.ttl(key) <= longest, f"{name} would stay in Redis forever"
