"""The reorder window against a real Redis: durations follow created_at, not arrival.

`OrderedModel` is OpenPanel's rules applied to each session's events sorted
by created_at (ties in arrival order). The property test applies random
sessions in random arrival orders, every event displaced by less than the
window, through `EventBuffer.apply` in batches at their arrival times (a
manual clock), releases what is due, and compares the queued rows and the
waiting last views with the model. The other tests pin the rules for events
later than the window (worker/reorder.py).
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Sequence

import pytest
import redis as redis_lib
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from tests.support.clock import ManualClock
from tests.support.dates import BASE_MS
from tests.support.sinks import DelegatingSink
from worker import stored_view
from worker.buffer import EventBuffer
from worker.events import Event, decode_row, parse_event
from worker.flusher import Flusher
from worker.held_pack import FIELD_END, HEADER, held_events
from worker.keys import ShardKeys
from worker.reorder import held_packs, held_rows, release_due
from worker.reorder_release import release_in_redis
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink

WINDOW = 1000


def window_settings(redis_url: str, window: int = WINDOW, shards: int = 1) -> Settings:
    return Settings.from_env(
        {
            "REDIS_URL": redis_url,
            "EVENT_BUFFER_REORDER_WINDOW_MS": str(window),
            "EVENT_BUFFER_SHARDS": str(shards),
        }
    )


def make_event(
    n: int, name: str, session: str, created_ms: int, duration: int = 0, profile: str = ""
) -> Event:
    raw: dict[str, object] = {
        "id": str(uuid.UUID(int=n + 1)),
        "name": name,
        "project_id": "proj",
        "created_at": created_ms,
        "duration": duration,
    }
    if session:
        raw["session_id"] = session
    if profile:
        raw["profile_id"] = profile
    return parse_event(raw)


class OrderedModel:
    """OpenPanel's rules over each session's events in created_at order (ties: arrival)."""

    def __init__(self, arrivals: Sequence[Event]) -> None:
        self.queued: Counter[tuple[str, int]] = Counter()
        self.last_views: dict[str, str] = {}  # session -> id of its waiting view
        self._created: dict[str, int] = {}
        self._own: dict[str, int] = {}
        ordered = sorted(enumerate(arrivals), key=lambda pair: (pair[1].created_ms, pair[0]))
        for _, event in ordered:
            self._apply(event)

    def _apply(self, event: Event) -> None:
        session = event.session_id
        if not session or event.name not in ("screen_view", "session_end"):
            self.queued[(event.id, event.duration)] += 1
            return
        previous = self.last_views.pop(session, None)
        if event.name == "screen_view":
            if previous is not None:
                gap = event.created_ms - self._created[previous]
                self.queued[(previous, max(0, gap))] += 1
            self.last_views[session] = event.id
        else:
            if previous is not None:
                self.queued[(previous, self._own[previous])] += 1
            self.queued[(event.id, event.duration)] += 1
        self._created[event.id] = event.created_ms
        self._own[event.id] = event.duration


def queued_rows(redis: redis_lib.Redis, buffer: EventBuffer) -> Counter[tuple[str, int]]:
    rows: Counter[tuple[str, int]] = Counter()
    for shard in buffer.shards():
        for raw in redis.lrange(shard.queue, 0, -1):
            row = decode_row(raw)
            rows[(row.id, row.duration)] += 1
    return rows


def release_all(buffer: EventBuffer, clock: ManualClock) -> int:
    """Release whatever is due on every shard; the late events it found."""
    late = 0
    for shard in buffer.shards():
        late += release_due(buffer.scripts, shard, buffer.settings, clock).late
    return late


def held(redis: redis_lib.Redis, buffer: EventBuffer) -> int:
    return sum(
        len(held_rows(pack)) for s in buffer.shards() for pack in held_packs(redis, s).values()
    )


def waiting_views(buffer: EventBuffer, sessions: Sequence[str]) -> dict[str, str]:
    found = {}
    for session in sessions:
        view = buffer.get_last_screen_view(session_id=session)
        if view is not None:
            found[session] = view.id
    return found


# -- the property: any arrival order inside the window gives created_at order ----------

KINDS = ["screen_view", "screen_view", "screen_view", "session_end", "click"]

session_strategy = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.integers(min_value=0, max_value=1500),  # gap to the session's previous event, ms
        st.sampled_from([0, 0, 7, 123]),  # own duration
    ),
    min_size=1,
    max_size=8,
)


@hyp_settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    sessions=st.lists(session_strategy, min_size=1, max_size=6),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    shards=st.sampled_from([1, 3]),
)
def test_durations_follow_created_at_for_any_arrival_inside_the_window(
    redis: redis_lib.Redis,
    redis_url: str,
    sessions: list[list[tuple[str, int, int]]],
    seed: int,
    shards: int,
) -> None:
    redis.flushall()
    rng = random.Random(seed)
    events: list[Event] = []
    for s, specs in enumerate(sessions):
        created = rng.randrange(0, 2000)
        for name, gap, duration in specs:
            created += gap
            profile = rng.choice(["", "u1", "u2"])
            events.append(
                make_event(len(events), name, f"s{s}", BASE_MS + created, duration, profile)
            )
    # Each event arrives less than a window after its created_at (relative to BASE_MS):
    # so it arrives less than a window after every event of its session created after it.
    arrival = {e.id: e.created_ms - BASE_MS + rng.randrange(0, WINDOW) for e in events}
    order = sorted(events, key=lambda e: (arrival[e.id], rng.random()))

    clock = ManualClock(BASE_MS)
    buffer = EventBuffer(redis, window_settings(redis_url, shards=shards), clock)
    late = 0
    position = 0
    while position < len(order):  # one batch per arrival ms, sometimes split
        at = arrival[order[position].id]
        end = position
        while end < len(order) and arrival[order[end].id] == at:
            end += 1
        end = rng.randint(position + 1, end)
        clock.set(BASE_MS + at)
        buffer.apply(order[position:end])
        if rng.random() < 0.3:  # a flush runs now: it releases what is due
            late += release_all(buffer, clock)
        position = end
    clock.advance(WINDOW)
    late += release_all(buffer, clock)

    model = OrderedModel(order)
    assert queued_rows(redis, buffer) == model.queued
    names = [f"s{s}" for s in range(len(sessions))]
    assert waiting_views(buffer, names) == model.last_views
    assert held(redis, buffer) == 0
    assert late == 0


def test_model_sanity() -> None:
    """The model on a hand-checked case (guards against a vacuous model)."""
    v1 = make_event(0, "screen_view", "s", BASE_MS, 9)
    v3 = make_event(1, "screen_view", "s", BASE_MS + 3000)
    v2 = make_event(2, "screen_view", "s", BASE_MS + 1000)
    end = make_event(3, "session_end", "s", BASE_MS + 5000, 4)
    model = OrderedModel([v1, v3, end, v2])
    assert model.queued == Counter(
        {(v1.id, 1000): 1, (v2.id, 2000): 1, (v3.id, 0): 1, (end.id, 4): 1}
    )
    assert model.last_views == {}


# -- what happens in order, and beyond the window -----------------------------------


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(BASE_MS)


@pytest.fixture
def held_buffer(redis: redis_lib.Redis, redis_url: str, clock: ManualClock) -> EventBuffer:
    return EventBuffer(redis, window_settings(redis_url), clock)


def test_views_wait_for_the_window_then_follow_the_seed(
    redis: redis_lib.Redis, held_buffer: EventBuffer, clock: ManualClock
) -> None:
    v1 = make_event(0, "screen_view", "s", BASE_MS)
    click = make_event(1, "click", "s", BASE_MS + 10)
    v2 = make_event(2, "screen_view", "s", BASE_MS + 400)
    held_buffer.apply([v1, click])
    assert queued_rows(redis, held_buffer) == Counter({(click.id, 0): 1})  # not held
    clock.advance(400)
    held_buffer.apply([v2])
    assert held(redis, held_buffer) == 2
    assert waiting_views(held_buffer, ["s"]) == {}
    clock.advance(WINDOW - 400)  # v1's window has passed, v2's has not
    held_buffer.apply([])  # an empty batch writes nothing
    assert release_all(held_buffer, clock) == 0
    assert waiting_views(held_buffer, ["s"]) == {"s": v1.id}
    clock.advance(400)
    held_buffer.apply([make_event(3, "screen_view", "other", BASE_MS + 2000)])
    assert release_all(held_buffer, clock) == 0
    assert (v1.id, 400) in queued_rows(redis, held_buffer)
    assert waiting_views(held_buffer, ["s"]) == {"s": v2.id}
    assert held(redis, held_buffer) == 1  # the other session's view, in its window


def test_a_view_applied_after_its_session_end_within_the_window_takes_its_place(
    redis: redis_lib.Redis, held_buffer: EventBuffer, clock: ManualClock
) -> None:
    v1 = make_event(0, "screen_view", "s", BASE_MS, profile="u1")
    end = make_event(1, "session_end", "s", BASE_MS + 10_000, 3, profile="u1")
    v2 = make_event(2, "screen_view", "s", BASE_MS + 5000, 8, profile="u1")
    held_buffer.apply([v1])
    clock.advance(100)
    held_buffer.apply([end])
    clock.advance(500)
    held_buffer.apply([v2])  # the other worker was slower
    clock.advance(WINDOW)
    assert release_all(held_buffer, clock) == 0
    assert queued_rows(redis, held_buffer) == Counter(
        {(v1.id, 5000): 1, (v2.id, 8): 1, (end.id, 3): 1}
    )
    assert waiting_views(held_buffer, ["s"]) == {}
    assert held_buffer.get_last_screen_view(project_id="proj", profile_id="u1") is None


def test_a_view_later_than_the_window_after_its_session_end_is_queued_at_once(
    redis: redis_lib.Redis, held_buffer: EventBuffer, clock: ManualClock
) -> None:
    v1 = make_event(0, "screen_view", "s", BASE_MS)
    end = make_event(1, "session_end", "s", BASE_MS + 10_000)
    v2 = make_event(2, "screen_view", "s", BASE_MS + 5000, 8)
    held_buffer.apply([v1, end])
    clock.advance(WINDOW + 1)
    assert release_all(held_buffer, clock) == 0
    clock.advance(5000)
    held_buffer.apply([v2])  # held like any view: its lateness shows at its release
    clock.advance(WINDOW)
    assert release_all(held_buffer, clock) == 1
    assert queued_rows(redis, held_buffer) == Counter(
        {(v1.id, 0): 1, (end.id, 0): 1, (v2.id, 8): 1}
    )
    assert waiting_views(held_buffer, ["s"]) == {}  # never a last view after the end
    assert held(redis, held_buffer) == 0


def test_a_late_view_in_an_open_session_keeps_its_neighbours_durations(
    redis: redis_lib.Redis, held_buffer: EventBuffer, clock: ManualClock
) -> None:
    v1 = make_event(0, "screen_view", "s", BASE_MS)
    v3 = make_event(1, "screen_view", "s", BASE_MS + 10_000)
    v2 = make_event(2, "screen_view", "s", BASE_MS + 4000, 5)
    held_buffer.apply([v1, v3])
    clock.advance(WINDOW)
    release_all(held_buffer, clock)
    clock.advance(WINDOW * 3)
    held_buffer.apply([v2])
    clock.advance(WINDOW)
    assert release_all(held_buffer, clock) == 1
    assert queued_rows(redis, held_buffer) == Counter({(v1.id, 10_000): 1, (v2.id, 5): 1})
    assert waiting_views(held_buffer, ["s"]) == {"s": v3.id}


def test_a_late_session_end_still_closes_its_session(
    redis: redis_lib.Redis, held_buffer: EventBuffer, clock: ManualClock
) -> None:
    v1 = make_event(0, "screen_view", "s", BASE_MS)
    v2 = make_event(1, "screen_view", "s", BASE_MS + 9000, 2)
    end = make_event(2, "session_end", "s", BASE_MS + 5000)
    held_buffer.apply([v1, v2])
    clock.advance(WINDOW)
    release_all(held_buffer, clock)
    clock.advance(WINDOW * 2)
    held_buffer.apply([end])
    clock.advance(WINDOW)
    assert release_all(held_buffer, clock) == 1
    assert queued_rows(redis, held_buffer) == Counter(
        {(v1.id, 9000): 1, (v2.id, 2): 1, (end.id, 0): 1}
    )
    assert waiting_views(held_buffer, ["s"]) == {}


def test_an_event_after_the_session_end_reopens_the_session_as_in_order(
    redis: redis_lib.Redis, held_buffer: EventBuffer, clock: ManualClock
) -> None:
    end = make_event(0, "session_end", "s", BASE_MS)
    v1 = make_event(1, "screen_view", "s", BASE_MS + 1000)
    held_buffer.apply([end])
    clock.advance(WINDOW * 2)
    release_all(held_buffer, clock)
    held_buffer.apply([v1])
    clock.advance(WINDOW)
    assert release_all(held_buffer, clock) == 0
    assert waiting_views(held_buffer, ["s"]) == {"s": v1.id}  # as OpenPanel's buffer


def test_a_closed_session_is_forgotten_after_its_ttl(
    redis: redis_lib.Redis, redis_url: str, clock: ManualClock
) -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": redis_url,
            "EVENT_BUFFER_REORDER_WINDOW_MS": str(WINDOW),
            "EVENT_BUFFER_CLOSED_SESSION_TTL_S": "60",
        }
    )
    buffer = EventBuffer(redis, settings, clock)
    shard = next(iter(buffer.shards()))
    buffer.apply([make_event(0, "session_end", "s", BASE_MS)])
    clock.advance(WINDOW)
    release_all(buffer, clock)
    assert redis.hget(shard.closed, "s") == str(BASE_MS).encode()
    clock.advance(59_000)
    release_all(buffer, clock)
    assert redis.hlen(shard.closed) == 1
    clock.advance(2000)
    release_all(buffer, clock)  # every release forgets what was closed longer ago than the TTL
    assert redis.hlen(shard.closed) == 0
    assert redis.zcard(shard.closed_at) == 0


def test_a_window_of_zero_holds_nothing(
    redis: redis_lib.Redis, redis_url: str, clock: ManualClock
) -> None:
    buffer = EventBuffer(redis, window_settings(redis_url, window=0), clock)
    v1 = make_event(0, "screen_view", "s", BASE_MS + 5000)
    v2 = make_event(1, "screen_view", "s", BASE_MS)
    buffer.apply([v1])
    buffer.apply([v2])  # out of order: applied as it comes, like OpenPanel's buffer
    assert queued_rows(redis, buffer) == Counter({(v1.id, 0): 1})
    assert waiting_views(buffer, ["s"]) == {"s": v2.id}
    assert held(redis, buffer) == 0


def test_held_events_of_odd_session_ids_stay_apart(
    redis: redis_lib.Redis, held_buffer: EventBuffer, clock: ManualClock
) -> None:
    """Session ids that are prefixes of each other, or hold '|', '}' and '%', never mix."""
    ids = ["a", "a|1", "a}", "a%7C1", "ab", "{x}:y %"]
    events = [
        make_event(n * 2 + k, "screen_view", sid, BASE_MS + 100 * k + n)
        for n, sid in enumerate(ids)
        for k in range(2)
    ]
    held_buffer.apply(list(reversed(events)))
    clock.advance(WINDOW)
    assert release_all(held_buffer, clock) == 0
    model = OrderedModel(events)
    assert queued_rows(redis, held_buffer) == model.queued
    assert waiting_views(held_buffer, ids) == model.last_views


def test_release_survives_a_script_cache_flush(
    redis: redis_lib.Redis, held_buffer: EventBuffer, clock: ManualClock
) -> None:
    v1 = make_event(0, "screen_view", "s", BASE_MS)
    v2 = make_event(1, "screen_view", "s", BASE_MS + 300)
    held_buffer.apply([v1, v2])
    clock.advance(WINDOW)
    redis.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT, then reloads
    release_all(held_buffer, clock)
    assert queued_rows(redis, held_buffer) == Counter({(v1.id, 300): 1})


def test_a_damaged_session_key_does_not_stop_the_flush_of_other_rows(
    redis: redis_lib.Redis, redis_url: str, clock: ManualClock, sink: ChdbSink, settings: Settings
) -> None:
    held_settings = window_settings(redis_url)
    buffer = EventBuffer(redis, held_settings, clock)
    click = make_event(0, "click", "", BASE_MS)
    buffer.apply([click, make_event(1, "screen_view", "s", BASE_MS)])
    shard = next(iter(buffer.shards()))
    redis.delete(shard.views)
    redis.rpush(shard.views, "not a hash")  # the release cannot read the sessions' views
    clock.advance(WINDOW)
    flusher = Flusher(redis, held_settings, lambda: ChdbSink(sink.path, sink.table), clock)
    [result] = flusher.process_buffer().shards
    assert result.rows == 1 and result.error is None
    assert len(held_packs(redis, shard)) == 1  # kept, for a release once the key is repaired


class _SlowSink(DelegatingSink):
    """Each INSERT takes a window of the manual clock: a long flush run."""

    def __init__(self, inner: ChdbSink, clock: ManualClock) -> None:
        super().__init__(inner)
        self.clock = clock

    def write(self, rows: Sequence[bytes], token: str) -> None:
        super().write(rows, token)
        self.clock.advance(WINDOW)


def test_a_long_flush_run_releases_what_falls_due_between_its_batches(
    redis: redis_lib.Redis, redis_url: str, clock: ManualClock, sink: ChdbSink
) -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": redis_url,
            "CLICKHOUSE_URL": f"chdb://{sink.path}",
            "EVENT_BUFFER_REORDER_WINDOW_MS": str(WINDOW),
            "EVENT_BUFFER_BATCH_SIZE": "2",
        }
    )
    buffer = EventBuffer(redis, settings, clock)
    clicks = [make_event(n, "click", "", BASE_MS + n) for n in range(4)]
    view = make_event(10, "screen_view", "s", BASE_MS, 7)
    end = make_event(11, "session_end", "s", BASE_MS + 100)
    buffer.apply([*clicks, view, end])
    flusher = Flusher(
        redis, settings, lambda: _SlowSink(ChdbSink(sink.path, sink.table), clock), clock
    )
    result = flusher.flush_shard(0, max_batches=10)
    # Nothing was due when the run began; the first batch's insert took a window.
    assert result.released == 2 and result.batches == 3
    assert sorted(sink.query("SELECT toString(id), duration FROM events")) == sorted(
        [(e.id, 0) for e in clicks] + [(view.id, 7), (end.id, 0)]
    )


def test_events_held_before_the_window_was_set_to_zero_are_still_released(
    redis: redis_lib.Redis, held_buffer: EventBuffer, clock: ManualClock, redis_url: str
) -> None:
    v1 = make_event(0, "screen_view", "s", BASE_MS)
    v2 = make_event(1, "screen_view", "s", BASE_MS + 200)
    held_buffer.apply([v1, v2])
    clock.advance(WINDOW)
    no_window = window_settings(redis_url, window=0)
    shard = next(iter(held_buffer.shards()))
    assert release_due(held_buffer.scripts, shard, no_window, clock).rows == 1
    assert queued_rows(redis, held_buffer) == Counter({(v1.id, 200): 1})
    assert held(redis, held_buffer) == 0


def earlier_record(event: Event, deadline: int, tag: str, pfield: str = "") -> bytes:
    """A held record as the version before the current record form appended it:
    "<length>:<header><profile field>|<stored view>" (worker/held_pack.py)."""
    kind = b"v" if event.name == "screen_view" else b"e"
    record = b"%015d%015d%b%b%b|%b" % (
        event.created_ms, deadline, tag.encode(), kind, pfield.encode(), stored_view.of_event(event)
    )  # fmt: skip
    return b"%d:%b" % (len(record), record)


@pytest.mark.parametrize("in_redis", [False, True], ids=["python", "lua"])
def test_a_pack_an_earlier_version_began_is_released_in_created_order(
    redis: redis_lib.Redis, held_buffer: EventBuffer, clock: ManualClock, in_redis: bool
) -> None:
    """A rolling upgrade: an earlier version's apply held v1 (its record form), this one
    then appended v3 and the session_end to the same pack, and the earlier one v2 after
    them (created before v3). The release reads both forms, in created_at order."""
    pfield = ShardKeys.profile_field("proj", "u1")
    v1 = make_event(0, "screen_view", "s", BASE_MS, profile="u1")
    v2 = make_event(1, "screen_view", "s", BASE_MS + 300, 4, profile="u1")
    v3 = make_event(2, "screen_view", "s", BASE_MS + 1000, 7, profile="u1")
    end = make_event(3, "session_end", "s", BASE_MS + 2000, profile="u1")
    shard = next(iter(held_buffer.shards()))
    deadline = clock.now_ms() + WINDOW
    redis.append(shard.held("s"), earlier_record(v1, deadline, "0000000a000000", pfield))
    redis.zadd(shard.held_due, {"s": deadline})
    held_buffer.apply([v3, end])
    redis.append(shard.held("s"), earlier_record(v2, deadline, "0000000b000000", pfield))
    pack = held_packs(redis, shard)["s"]
    forms = [pack[e.start + HEADER : e.start + HEADER + 1] == FIELD_END for e in held_events(pack)]
    assert forms == [False, True, True, False]
    assert [decode_row(row).id for row in held_rows(pack)] == [v1.id, v3.id, end.id, v2.id]
    clock.advance(WINDOW)
    if in_redis:
        released = release_in_redis(redis, shard, ["s"], clock.now_ms(), 60, 60)
    else:
        released = release_due(held_buffer.scripts, shard, held_buffer.settings, clock)
    assert (released.rows, released.late) == (4, 0)
    assert [
        (row.id, row.duration) for row in map(decode_row, redis.lrange(shard.queue, 0, -1))
    ] == [(v1.id, 300), (v2.id, 700), (v3.id, 7), (end.id, 0)]
    assert held(redis, held_buffer) == 0 and redis.zcard(shard.held_due) == 0
    assert held_buffer.get_last_screen_view(project_id="proj", profile_id="u1") is None
