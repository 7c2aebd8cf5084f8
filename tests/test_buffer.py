"""EventBuffer against a real Redis: OpenPanel's own test cases, and more."""

from __future__ import annotations

from typing import Any

import pytest
import redis as redis_lib

from tests.support.clock import ManualClock
from tests.support.dates import DAY
from worker.buffer import EventBuffer
from worker.events import Event, as_row, parse_event
from worker.keys import CHANNEL_RECEIVED, ShardKeys
from worker.reorder import held_packs, release_due
from worker.settings import Settings

T0 = f"{DAY}T12:00:00.000Z"


def event(name: str, created_at: Any = T0, **fields: Any) -> Event:
    return parse_event({"project_id": "p1", "name": name, "created_at": created_at, **fields})


def view(session: str, created_at: Any, profile: str = "", **fields: Any) -> Event:
    return event("screen_view", created_at, session_id=session, profile_id=profile, **fields)


def queued(redis: redis_lib.Redis) -> list[Event]:
    from worker.events import decode_row

    return [decode_row(row) for row in redis.lrange(ShardKeys("eventbuffer", 0).queue, 0, -1)]


def test_regular_event_grows_the_buffer_by_one(buffer: EventBuffer) -> None:
    assert buffer.get_buffer_size() == 0
    buffer.add(event("custom"))
    assert buffer.get_buffer_size() == 1


def test_each_screen_view_pushes_the_previous_one(
    buffer: EventBuffer, redis: redis_lib.Redis
) -> None:
    first = view("s1", f"{DAY}T12:00:00Z", "u1")
    second = view("s1", f"{DAY}T12:00:01Z", "u1")
    third = view("s1", f"{DAY}T12:00:03Z", "u1")
    sizes = []
    for item in (first, second, third):
        buffer.add(item)
        sizes.append(buffer.get_buffer_size())
    assert sizes == [0, 1, 2]
    assert [(e.id, e.duration) for e in queued(redis)] == [(first.id, 1000), (second.id, 2000)]
    assert buffer.get_last_screen_view(session_id="s1") == as_row(third)
    assert buffer.get_last_screen_view(project_id="p1", profile_id="u1") == as_row(third)


def test_session_end_pushes_the_last_view_unchanged_then_itself(
    buffer: EventBuffer, redis: redis_lib.Redis
) -> None:
    last = view("s1", f"{DAY}T12:00:00Z", "u1", duration=7)
    end = event("session_end", f"{DAY}T12:05:00Z", session_id="s1", profile_id="u1")
    buffer.add(last)
    buffer.add(end)
    assert [(e.id, e.duration) for e in queued(redis)] == [(last.id, 7), (end.id, 0)]
    assert buffer.get_last_screen_view(session_id="s1") is None
    assert buffer.get_last_screen_view(project_id="p1", profile_id="u1") is None


def test_session_end_alone_pushes_one(buffer: EventBuffer) -> None:
    buffer.add(event("session_end", session_id="s9"))
    assert buffer.get_buffer_size() == 1


def test_screen_view_without_session_goes_straight_to_the_queue(
    buffer: EventBuffer, redis: redis_lib.Redis
) -> None:
    lone = event("screen_view")
    buffer.add(lone)
    assert [e.id for e in queued(redis)] == [lone.id]
    assert buffer.get_last_screen_view(session_id="") is None


def test_two_sessions_of_one_profile_keep_their_own_last_views(buffer: EventBuffer) -> None:
    a = view("sA", f"{DAY}T12:00:00Z", "u1")
    b = view("sB", f"{DAY}T12:00:02Z", "u1")
    buffer.add(a)
    buffer.add(b)
    assert buffer.get_buffer_size() == 0
    assert buffer.get_last_screen_view(session_id="sA") == as_row(a)
    assert buffer.get_last_screen_view(session_id="sB") == as_row(b)
    assert buffer.get_last_screen_view(project_id="p1", profile_id="u1") == as_row(b)


def test_one_batch_applies_events_in_order(buffer: EventBuffer, redis: redis_lib.Redis) -> None:
    views = [view("s1", f"{DAY}T12:00:0{n}Z") for n in (0, 1, 3)]
    end = event("session_end", f"{DAY}T12:00:09Z", session_id="s1")
    result = buffer.apply([*views, end])
    assert result.appended == 4
    assert [(e.id, e.duration) for e in queued(redis)] == [
        (views[0].id, 1000),
        (views[1].id, 2000),
        (views[2].id, 0),
        (end.id, 0),
    ]


def test_duration_never_negative(buffer: EventBuffer, redis: redis_lib.Redis) -> None:
    buffer.apply([view("s1", f"{DAY}T12:00:05Z"), view("s1", f"{DAY}T12:00:01Z")])
    assert [e.duration for e in queued(redis)] == [0]


@pytest.mark.parametrize("window", ["0", "1000"])
def test_last_views_expire_with_the_shards_ttl(
    redis: redis_lib.Redis, redis_url: str, window: str
) -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": redis_url,
            "EVENT_BUFFER_SCREEN_VIEW_TTL_S": "77",
            "EVENT_BUFFER_SESSION_TIMEOUT_S": "60",
            "EVENT_BUFFER_SWEEP_INTERVAL_S": "10",
            "EVENT_BUFFER_REORDER_WINDOW_MS": window,
        }
    )
    clock = ManualClock()
    buffer = EventBuffer(redis, settings, clock)
    buffer.add(view("s1", T0, "u1"))
    keys = ShardKeys("eventbuffer", 0)
    clock.advance(settings.reorder_window_ms)
    release_due(buffer.scripts, keys, settings, clock)  # held by the window until now
    assert 0 < redis.ttl(keys.views) <= 77
    assert 0 < redis.ttl(keys.profile_views) <= 77


def test_active_visitors_count_distinct_profiles_in_the_window(
    buffer: EventBuffer, clock: ManualClock
) -> None:
    buffer.apply([event("a", profile_id="u1"), event("b", profile_id="u2")])
    buffer.add(event("c", profile_id="u1"))
    buffer.add(
        parse_event({"project_id": "other", "name": "x", "created_at": T0, "profile_id": "u3"})
    )
    buffer.add(event("anonymous"))
    assert buffer.get_active_visitor_count("p1") == 2
    clock.advance(200_000)
    buffer.add(event("d", profile_id="u4"))
    assert buffer.get_active_visitor_count("p1") == 3
    clock.advance(150_000)  # u1 and u2 were last seen 350 s ago: outside the 300 s window
    assert buffer.get_active_visitor_count("p1") == 1
    assert buffer.get_active_visitor_count("other") == 0


def test_buffer_size_is_exact_llen(buffer: EventBuffer, redis: redis_lib.Redis) -> None:
    buffer.apply([event("x") for _ in range(250)])
    buffer.apply([view("s1", T0), view("s1", T0)])
    assert buffer.get_buffer_size() == 251 == redis.llen(ShardKeys("eventbuffer", 0).queue)


def test_redelivered_batch_id_applies_nothing(buffer: EventBuffer) -> None:
    batch = [event("x"), view("s1", T0), view("s1", f"{DAY}T12:00:01Z")]
    first = buffer.apply(batch, batch_id="task-123")
    again = buffer.apply(batch, batch_id="task-123")
    assert (first.appended, first.duplicate) == (2, False)
    assert (again.appended, again.duplicate) == (0, True)
    assert buffer.get_buffer_size() == 2
    assert buffer.get_last_screen_view(session_id="s1") == as_row(batch[2])


def test_hostile_ids_stay_data(buffer: EventBuffer, redis: redis_lib.Redis) -> None:
    session = "{evil}:session 1"
    project = "p:{x} y"
    first = parse_event(
        {
            "project_id": project,
            "name": "screen_view",
            "created_at": T0,
            "session_id": session,
            "profile_id": "a:b",
        }
    )
    buffer.add(first)
    assert buffer.get_last_screen_view(session_id=session) == as_row(first)
    assert buffer.get_last_screen_view(project_id=project, profile_id="a:b") == as_row(first)
    # Same text split differently between project and profile is another key.
    assert buffer.get_last_screen_view(project_id="p:{x} y:a", profile_id="b") is None
    for key in redis.keys("*"):
        assert key.startswith(b"{eventbuffer:0}:")


def test_received_is_published_at_most_once_per_throttle(
    buffer: EventBuffer, redis: redis_lib.Redis, clock: ManualClock
) -> None:
    pubsub = redis.pubsub()
    pubsub.subscribe(CHANNEL_RECEIVED)
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"  # type: ignore[index]
    buffer.add(event("one"))
    buffer.add(event("two"))  # same millisecond: throttled
    clock.advance(1000)
    last = event("three")
    buffer.apply([event("three-a"), last])
    messages = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        messages.append(message)
    assert len(messages) == 2
    assert parse_event(messages[-1]["data"]).id == last.id
    pubsub.close()


def test_shards_route_by_session_and_keep_sessions_in_order(
    redis: redis_lib.Redis, redis_url: str
) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_url, "EVENT_BUFFER_SHARDS": "4"})
    clock = ManualClock()
    buffer = EventBuffer(redis, settings, clock)
    events = []
    for n in range(40):
        session = f"s{n % 10}"
        events.append(view(session, f"{DAY}T12:00:{n:02d}Z", f"u{n % 3}"))
    result = buffer.apply(events)
    clock.advance(settings.reorder_window_ms)  # the window passes: every shard releases
    for shard in buffer.shards():
        release_due(buffer.scripts, shard, settings, clock)
    assert len(result.queue_lengths) > 1, "40 events over 10 sessions should touch several shards"
    assert buffer.get_buffer_size() == 30
    for n in range(30, 40):
        assert buffer.get_last_screen_view(session_id=f"s{n % 10}") == as_row(events[n])
    # Newest view of profile u0 across shards.
    newest_u0 = max((e for e in events if e.profile_id == "u0"), key=lambda e: str(e.created_at))
    assert buffer.get_last_screen_view(project_id="p1", profile_id="u0") == as_row(newest_u0)
    # Every shard's keys share that shard's hash tag.
    for key in redis.keys("*"):
        assert key.startswith(b"{eventbuffer:")
    assert buffer.get_active_visitor_count("p1") == 3


def test_a_key_of_the_wrong_type_fails_the_whole_batch_before_any_write(
    buffer: EventBuffer, redis: redis_lib.Redis
) -> None:
    import pytest

    from worker.errors import BufferKeyTypeError

    shard = ShardKeys("eventbuffer", 0)
    buffer.add(event("custom"))
    redis.rpush(shard.profile_views, "not a hash")  # a list where the profiles' views belong
    before = {key: redis.dump(key) for key in redis.keys("*")}
    batch = [event("custom"), view("s1", T0, "u1"), view("s2", T0, "u2"), event("other")]
    with pytest.raises(BufferKeyTypeError) as raised:
        buffer.apply(batch, batch_id="b-1", dead_letters=[])
    assert raised.value.key == shard.profile_views
    # Regular rows, visitors, the first session's view, the marker: nothing was written.
    assert {key: redis.dump(key) for key in redis.keys("*")} == before

    redis.delete(shard.profile_views)  # fixed: the same batch now applies whole
    assert buffer.apply(batch, batch_id="b-1").appended == 2
    assert buffer.get_buffer_size() == 3

    redis.delete(shard.queue)
    redis.set(shard.queue, "x")
    with pytest.raises(BufferKeyTypeError, match="queue"):
        buffer.apply([event("custom")], batch_id="b-2")
    assert redis.get(shard.queue) == b"x" and not redis.exists(shard.batch("b-2"))


def test_a_held_pack_of_the_wrong_type_fails_the_whole_batch_before_any_write(
    redis: redis_lib.Redis, redis_url: str
) -> None:
    # With the reorder window, each session whose events are held has a pack (a string,
    # appended to): one of another type fails the batch, whichever session's it is.
    import pytest

    from worker.errors import BufferKeyTypeError

    settings = Settings.from_env({"REDIS_URL": redis_url})
    buffer = EventBuffer(redis, settings, ManualClock())
    shard = ShardKeys("eventbuffer", 0)
    buffer.apply([view("s1", T0, "u1")], batch_id="b-0")  # s1's pack: a string, appended to
    redis.rpush(shard.held("s3"), "not a pack")
    before = {key: redis.dump(key) for key in redis.keys("*")}
    batch = [event("custom"), view("s1", T0, "u1"), view("s2", T0), view("s3", T0), view("s4", T0)]
    with pytest.raises(BufferKeyTypeError) as raised:
        buffer.apply(batch, batch_id="b-1")
    assert raised.value.key == shard.held("s3")
    assert {key: redis.dump(key) for key in redis.keys("*")} == before

    redis.delete(shard.held("s3"))  # fixed: the same batch now applies whole
    assert buffer.apply(batch, batch_id="b-1").appended == 1
    assert set(held_packs(redis, shard)) == {"s1", "s2", "s3", "s4"}
