"""Property test: the Redis buffer + flush against a plain-Python model of the rules.

Random interleavings of regular events, screen_views and session_ends over a
few sessions (and events without a session), a few profiles and two projects,
with created_at drawn from a few values (so equal and decreasing timestamps
are common; they straddle a month boundary, so ClickHouse inserts span two
partitions), are applied through `EventBuffer.apply` in random batch splits,
with a flush round after some batches, then flushed with `Flusher` into real
chDB with small batch and chunk sizes, and compared with `Model`:

- regular event (or screen_view / session_end without a session id): queued;
- screen_view: the session's previous last view (if any) is queued with
  duration = max(0, this.created - previous.created); this view becomes the
  session's last view, and its profile's (per project and shard);
- session_end: the session's last view (if any) is queued unchanged, then the
  session_end; the session's last view and the event's profile's are cleared.

The same in-order events with a reorder window (EVENT_BUFFER_REORDER_WINDOW_MS)
match the model too, checked once each batch's window has passed.

Checked after every batch: (rows in ClickHouse) + (rows still queued) is the
model's multiset of (id, duration), and the last views in Redis (by session,
and by project + profile) are the model's. At the end the queue is empty, no
claim is open, and ClickHouse alone holds the model's multiset.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_lib
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from tests.support import dates
from tests.support.clock import ManualClock
from worker.buffer import EventBuffer
from worker.events import (
    Event,
    as_row,
    datetime_ms,
    decode_row,
    format_datetime,
    parse_datetime,
    parse_event,
)
from worker.flusher import Flusher
from worker.keys import shard_for
from worker.reorder import release_due
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink

# 3 s before this month began: created_at is BASE_MS plus a few seconds, so a
# batch spans two months (two ClickHouse partitions).
BASE_MS = dates.MONTH_START_MS - 3000
SESSIONS = ["", "s1", "s2", "s3", "odd:{sid} %1"]
PROFILES = ["", "p1", "p2"]
PROJECTS = ["proj", "proj:{2}"]
# Weighted toward one project, so session_ends often meet their profile's last view.
PROJECT_CHOICES = ["proj", "proj", "proj", "proj:{2}"]
NAMES = ["screen_view", "screen_view", "session_end", "click"]


@dataclass(frozen=True)
class Spec:
    name: str
    session: str
    profile: str
    project: str
    offset_ms: int
    duration: int


spec_strategy = st.builds(
    Spec,
    name=st.sampled_from(NAMES),
    session=st.sampled_from(SESSIONS),
    profile=st.sampled_from(PROFILES),
    project=st.sampled_from(PROJECT_CHOICES),
    # Drawn from a few values, not increasing: about half of the gaps between
    # two views are zero or negative.
    offset_ms=st.sampled_from([0, 1, 999, 1000, 2500, 4000, 7000]),
    # A producer-given duration: overwritten when a next view arrives, kept otherwise.
    duration=st.sampled_from([0, 0, 0, 5, 123_456]),
)


def build_events(specs: list[Spec]) -> list[Event]:
    events = []
    for n, spec in enumerate(specs):
        created = BASE_MS + spec.offset_ms
        raw: dict[str, object] = {
            "id": str(uuid.UUID(int=n + 1)),
            "name": spec.name,
            "project_id": spec.project,
            "created_at": created,
            "duration": spec.duration,
            "properties": {"n": n},
        }
        if spec.session:
            raw["session_id"] = spec.session
        if spec.profile:
            raw["profile_id"] = spec.profile
        events.append(parse_event(raw))
    return events


class Model:
    """The buffer's rules in plain Python, one event at a time."""

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self.flushed: Counter[tuple[str, int]] = Counter()  # rows bound for ClickHouse
        self.sessions: dict[str, Event] = {}  # session id -> last view
        self.profiles: dict[tuple[int, str, str], Event] = {}  # (shard, project, profile)

    def apply(self, event: Event) -> None:
        sid = event.session_id
        if sid and event.name == "screen_view":
            previous = self.sessions.get(sid)
            if previous is not None:
                gap = datetime_ms(str(event.created_at)) - datetime_ms(str(previous.created_at))
                self.flushed[(previous.id, max(0, gap))] += 1
            self.sessions[sid] = event
            if event.profile_id:
                self.profiles[self._profile_key(event)] = event
        elif sid and event.name == "session_end":
            previous = self.sessions.pop(sid, None)
            if previous is not None:
                self.flushed[(previous.id, previous.duration)] += 1
            self.flushed[(event.id, event.duration)] += 1
            if event.profile_id:
                self.profiles.pop(self._profile_key(event), None)
        else:
            self.flushed[(event.id, event.duration)] += 1

    def _profile_key(self, event: Event) -> tuple[int, str, str]:
        # Profile keys live in the shard of the event's session.
        return (shard_for(event.session_id, self.shards), event.project_id, event.profile_id)

    def profile_view(self, project: str, profile: str) -> str | None:
        """What get_last_screen_view(project, profile) reads: the newest over the
        shards, in shard order (the first one wins a tie)."""
        newest: tuple[int, str] | None = None
        for shard in range(self.shards):
            view = self.profiles.get((shard, project, profile))
            if view is None:
                continue
            created = datetime_ms(str(view.created_at))
            if newest is None or created > newest[0]:
                newest = (created, view.id)
        return newest[1] if newest else None


def reference(events: list[Event], shards: int) -> Model:
    model = Model(shards)
    for event in events:
        model.apply(event)
    return model


@pytest.fixture(scope="module")
def chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("model-chdb") / "clickhouse"
    holder = ChdbSink(str(path))
    holder.migrate()
    holder.close()
    yield path
    holder.close()


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[redis_lib.Redis]:
    conn = redis_lib.Redis.from_url(redis_url)
    yield conn
    conn.flushall()
    conn.close()


def check_state(
    client: redis_lib.Redis, buffer: EventBuffer, reader: ChdbSink, model: Model
) -> None:
    """Redis and ClickHouse agree with the model: every row bound for ClickHouse is
    either there or still queued (exactly once), and the waiting last views match."""
    rows = reader.query("SELECT toString(id), duration FROM events")
    stored = Counter((row_id, int(duration)) for row_id, duration in rows)
    for shard in buffer.shards():
        for raw in client.lrange(shard.queue, 0, -1):
            row = decode_row(raw)
            stored[(row.id, row.duration)] += 1
    assert stored == model.flushed

    for sid in SESSIONS[1:]:
        view = buffer.get_last_screen_view(session_id=sid)
        expected = model.sessions.get(sid)
        assert (view.id if view else None) == (expected.id if expected else None), sid
        # The waiting view is stored as it came in, producer's duration and all.
        assert view == (as_row(expected) if expected else None), sid
    for project in PROJECTS:
        for profile in PROFILES[1:]:
            view = buffer.get_last_screen_view(project_id=project, profile_id=profile)
            assert (view.id if view else None) == model.profile_view(project, profile), (
                project,
                profile,
            )


def run_example(
    client: redis_lib.Redis,
    redis_url: str,
    chdb_path: Path,
    shards: int,
    specs: list[Spec],
    batches: list[tuple[int, bool]],
    window: int = 0,
) -> None:
    """With a reorder `window`, events are applied in created_at order, and each batch
    is checked once its window has passed (the clock moves on by a window per batch)."""
    client.flushall()
    settings = Settings.from_env(
        {
            "REDIS_URL": redis_url,
            "CLICKHOUSE_URL": f"chdb://{chdb_path}",
            "EVENT_BUFFER_BATCH_SIZE": "7",
            "EVENT_BUFFER_CHUNK_SIZE": "3",
            "EVENT_BUFFER_SHARDS": str(shards),
            "EVENT_BUFFER_REORDER_WINDOW_MS": str(window),
        }
    )
    clock = ManualClock()
    # This sink stays open for the whole example, so the flushers' sinks (same
    # path, one shared chDB session) do not reopen the directory every flush.
    reader = ChdbSink(str(chdb_path))
    try:
        reader.query("TRUNCATE TABLE events")
        events = build_events(specs)
        if window:
            events.sort(key=lambda event: event.created_ms)  # stable: ties keep their order
        buffer = EventBuffer(client, settings, clock)
        flusher = Flusher(client, settings, lambda: ChdbSink(str(chdb_path)), clock)
        model = Model(shards)

        def flush_round() -> None:
            results = flusher.process_buffer().shards
            assert all(result.locked for result in results)
            assert not any(result.redriven for result in results)
            assert sum(result.dead for result in results) == 0

        # Batches of random sizes; the leftover events form a last batch. After
        # some batches one flush round runs, so claims meet later appends.
        position = 0
        plan = [*batches, (len(events), False)]
        for size, flush_after in plan:
            if position >= len(events):
                break
            batch = events[position : position + size]
            position += len(batch)
            buffer.apply(batch)
            for event in batch:
                model.apply(event)
            if window:
                clock.advance(window)
                for shard in buffer.shards():
                    assert release_due(buffer.scripts, shard, settings, clock).late == 0
            if flush_after:
                flush_round()
            check_state(client, buffer, reader, model)

        rounds = 0
        while buffer.get_buffer_size() > 0:
            rounds += 1
            assert rounds <= len(events) + 2, "the flush does not make progress"
            flush_round()

        # Everything bound for ClickHouse is there; only last views stay behind.
        assert buffer.get_buffer_size() == 0
        for shard in buffer.shards():
            assert not client.exists(shard.claim), f"claim left open on shard {shard.shard}"
        rows = reader.query("SELECT toString(id), duration FROM events")
        assert Counter((row_id, int(duration)) for row_id, duration in rows) == model.flushed
        check_state(client, buffer, reader, model)
    finally:
        reader.close()


example_settings = hyp_settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
batches_strategy = st.lists(
    st.tuples(st.integers(min_value=1, max_value=9), st.booleans()), max_size=40
)


@example_settings
@given(specs=st.lists(spec_strategy, max_size=40), batches=batches_strategy)
def test_buffer_matches_reference_model(
    client: redis_lib.Redis,
    redis_url: str,
    chdb_path: Path,
    specs: list[Spec],
    batches: list[tuple[int, bool]],
) -> None:
    run_example(client, redis_url, chdb_path, 1, specs, batches)


@example_settings
@given(specs=st.lists(spec_strategy, max_size=40), batches=batches_strategy)
def test_buffer_matches_reference_model_three_shards(
    client: redis_lib.Redis,
    redis_url: str,
    chdb_path: Path,
    specs: list[Spec],
    batches: list[tuple[int, bool]],
) -> None:
    run_example(client, redis_url, chdb_path, 3, specs, batches)


# Two sessions of one profile (in one shard) with views of equal created_at in one
# batch: the profile's last view is the later one in the batch (s1's), as in order,
# though s3's session is released after s1's (found by Hypothesis; the leading events
# without a session are not needed to fail, they are kept as it was found).
TIED_PROFILE_VIEWS = [
    *[Spec("screen_view", "", "", "proj", 0, 0)] * 12,
    Spec("screen_view", "s3", "p1", "proj", 0, 0),
    Spec("screen_view", "s1", "p1", "proj", 0, 0),
]


@example_settings
@given(specs=st.lists(spec_strategy, max_size=40), batches=batches_strategy)
@example(specs=TIED_PROFILE_VIEWS, batches=[])
def test_in_order_events_match_the_reference_model_once_the_window_has_passed(
    client: redis_lib.Redis,
    redis_url: str,
    chdb_path: Path,
    specs: list[Spec],
    batches: list[tuple[int, bool]],
) -> None:
    run_example(client, redis_url, chdb_path, 3, specs, batches, window=1000)


def test_reference_model_sanity() -> None:
    """The model itself, on a hand-checked sequence (guards against a vacuous model)."""
    specs = [
        Spec("screen_view", "s1", "p1", "proj", 1000, 9),  # A
        Spec("screen_view", "s1", "p1", "proj", 2000, 0),  # B: A queued with 1000
        Spec("screen_view", "s1", "", "proj", 1500, 0),  # C: B queued with 0 (clamped)
        Spec("session_end", "s1", "p1", "proj", 1510, 3),  # C queued as is, then the end
        Spec("screen_view", "", "p2", "proj", 0, 4),  # no session: regular
        Spec("screen_view", "s2", "p2", "proj", 0, 7),  # waits
    ]
    events = build_events(specs)
    model = reference(events, 1)
    ids = [event.id for event in events]
    assert model.flushed == Counter(
        {(ids[0], 1000): 1, (ids[1], 0): 1, (ids[2], 0): 1, (ids[3], 3): 1, (ids[4], 4): 1}
    )
    assert {sid: view.id for sid, view in model.sessions.items()} == {"s2": ids[5]}
    assert {key: view.id for key, view in model.profiles.items()} == {(0, "proj", "p2"): ids[5]}
    month = format_datetime(parse_datetime("t", BASE_MS))[:7]
    assert format_datetime(parse_datetime("t", BASE_MS + 7000))[:7] != month
