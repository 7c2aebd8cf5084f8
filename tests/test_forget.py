"""`eventbuffer forget` against real Redis and embedded ClickHouse (chDB), in process.

A person (profile `alice` of project `p1`) has events in every place the
buffer keeps them: in ClickHouse, queued, as her session's and profile's
last view, under an open claim a dead flusher left, in dead letters, and
still on their way (arriving after the request). Another person (`bob`) has
events in the same places and must come out untouched: same rows, same
durations. Real workers and Beat are in tests/test_forget_workers.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_lib

from tests.conftest import Result
from tests.support.clock import ManualClock
from tests.support.people import person_event
from worker.buffer import EventBuffer
from worker.claims import Claims
from worker.deadletters import iter_dead_letters
from worker.flusher import Flusher
from worker.ingestion import ingest
from worker.keys import Keyspace, ShardKeys
from worker.privacy.clickhouse import AUDIT_TABLE, audit_ddl
from worker.privacy.forget_request import forget
from worker.privacy.selector import Selector
from worker.privacy.tombstones import drop_forgotten_rows
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink

SHARD = ShardKeys("eventbuffer", 0)
NOW_MS = (time.time_ns() // 1_000_000 // 1000) * 1000  # whole seconds: dates round-trip
ALICE = Selector("p1", "profile", "alice")


@pytest.fixture
def clock() -> ManualClock:
    # Now, not the default 30 days back: a tombstone lives 30 days from its request,
    # and Redis and the flusher's fence expire it on the real clock.
    return ManualClock(NOW_MS)


@pytest.fixture
def flusher(redis: redis_lib.Redis, settings: Settings, sink: ChdbSink, clock: ManualClock):
    return Flusher(redis, settings, lambda: sink, clock)


def rows(sink: ChdbSink, where: str = "1") -> list[tuple[Any, ...]]:
    return sink.query(
        f"SELECT profile_id, name, toUnixTimestamp64Milli(created_at), duration FROM events "
        f"WHERE {where} ORDER BY created_at, name, profile_id"
    )


def queued(redis: redis_lib.Redis) -> list[dict[str, Any]]:
    return [json.loads(row) for row in redis.lrange(SHARD.queue, 0, -1)]


def drain(flusher: Flusher) -> None:
    """Flush until the queue is empty (one batch per run, as configured by default)."""
    while flusher.process_buffer().rows or flusher.redis.llen(SHARD.queue):
        pass


def seed(buffer: EventBuffer, flusher: Flusher, clock: ManualClock) -> None:
    """Alice and Bob in ClickHouse, in an open claim, queued, as last views, dead letters."""
    t = NOW_MS - 600_000
    # Flushed to ClickHouse: a session of views each (durations computed), and a click.
    for who in ("alice", "bob"):
        ingest(
            buffer,
            [
                person_event("screen_view", t, who, f"s-{who}-1", path="/a"),
                person_event("screen_view", t + 5_000, who, f"s-{who}-1", path="/b"),
                person_event("click", t + 6_000, who),
                person_event("session_end", t + 9_000, who, f"s-{who}-1"),
            ],
            f"flushed-{who}",
        )
    assert flusher.process_buffer().rows == 8
    # Claimed by a flusher that died before its insert: the claim stays open.
    ingest(
        buffer,
        [person_event("claimed", t + 10_000, "alice"), person_event("claimed", t + 10_000, "bob")],
        "c",
    )
    claim = Claims(buffer.redis).claim(SHARD, "dead-claim", 100, clock.now_ms(), 1000)
    assert claim is not None and len(claim.rows) == 2
    # Queued behind the claim, and last views waiting (session and profile).
    for who in ("alice", "bob"):
        ingest(
            buffer,
            [
                person_event("queued", t + 11_000, who),
                person_event("screen_view", t + 12_000, who, f"s-{who}-2", path="/c"),
                person_event("screen_view", t + 20_000, who, f"s-{who}-2", path="/d"),
            ],
            f"queued-{who}",
        )
        # A dead letter: a country of three letters.
        ingest(buffer, [person_event("bad", t + 13_000, who, country="SWE")], f"dead-{who}")


def test_forget_erases_the_person_everywhere_and_nothing_else(
    redis: redis_lib.Redis,
    settings: Settings,
    buffer: EventBuffer,
    sink: ChdbSink,
    flusher: Flusher,
    clock: ManualClock,
) -> None:
    seed(buffer, flusher, clock)
    bob_before = rows(sink, "profile_id = 'bob'")
    assert buffer.get_active_visitor_count("p1") == 2
    assert buffer.get_last_screen_view(session_id="s-alice-2") is not None

    report = forget(redis, sink, settings, ALICE, clock=clock)

    assert report.clickhouse_rows == 4
    assert report.buffer.buffer_rows == 2  # "queued" and the view /c given its duration
    assert report.buffer.claimed_rows == 1
    assert report.buffer.last_views == 1 and report.buffer.profile_last_views == 1
    assert report.buffer.dead_letters == 1
    assert report.buffer.visitors == 1
    assert report.tombstone_expires_ms == NOW_MS + 30 * 86_400_000
    assert rows(sink, "profile_id = 'alice'") == []
    assert [r["profile_id"] for r in queued(redis)] == ["alice", "bob", "bob", "bob"]  # claim
    assert buffer.get_last_screen_view(session_id="s-alice-2") is None
    assert buffer.get_last_screen_view(project_id="p1", profile_id="alice") is None
    assert buffer.get_last_screen_view(session_id="s-bob-2") is not None
    assert buffer.get_active_visitor_count("p1") == 1
    letters = list(iter_dead_letters(redis, SHARD))
    assert [json.loads(letter.payload)["profile_id"] for letter in letters] == ["bob"]

    # The open claim is re-driven: Bob's row lands, Alice's is fenced off (and is not
    # counted as inserted: this run re-drives the claim alone).
    assert flusher.process_buffer().rows == 1
    assert rows(sink, "profile_id = 'alice'") == []
    # Late events: created before the request, dropped; after it, kept.
    ingest(buffer, [person_event("late", NOW_MS - 1, "alice", "s-alice-2")], "late")
    assert all(row["profile_id"] != "alice" for row in queued(redis))  # dropped at ingest
    assert buffer.get_active_visitor_count("p1") == 1  # and not active again
    assert buffer.get_last_screen_view(session_id="s-alice-2") is None
    ingest(buffer, [person_event("new", NOW_MS + 1, "alice")], "new")
    ingest(buffer, [person_event("late", NOW_MS - 1, "bob")], "late-bob")
    flusher.process_buffer()
    assert [r[1] for r in rows(sink, "profile_id = 'alice'")] == ["new"]
    bob_after = rows(sink, "profile_id = 'bob'")
    assert bob_after[: len(bob_before)] == bob_before  # durations unchanged
    assert [r[1] for r in bob_after] == [
        "screen_view", "screen_view", "click", "session_end", "claimed", "queued",
        "screen_view", "late",
    ]  # fmt: skip
    assert buffer.get_active_visitor_count("p1") == 2  # Alice is back: a new event
    # The audit row, which forget never erases.
    [audit] = sink.query(
        f"SELECT project_id, selector, selector_id, clickhouse_rows, buffer_rows, claimed_rows, "
        f"last_views, dead_letters FROM {AUDIT_TABLE}"
    )
    assert audit == ("p1", "profile", "alice", 4, 2, 1, 2, 1)


def test_forget_again_finds_nothing_and_records_it(
    redis: redis_lib.Redis,
    settings: Settings,
    buffer: EventBuffer,
    sink: ChdbSink,
    flusher: Flusher,
    clock: ManualClock,
) -> None:
    seed(buffer, flusher, clock)
    forget(redis, sink, settings, ALICE, clock=clock)
    drain(flusher)
    bob = rows(sink)
    clock.advance(1000)
    again = forget(redis, sink, settings, ALICE, clock=clock)
    assert again.clickhouse_rows == 0
    assert again.buffer.buffer_rows == again.buffer.dead_letters == again.buffer.last_views == 0
    assert rows(sink) == bob
    assert sink.query(f"SELECT count() FROM {AUDIT_TABLE}") == [(2,)]


@pytest.mark.parametrize("kind", ["device", "session"])
def test_forget_by_device_or_session(
    redis: redis_lib.Redis,
    settings: Settings,
    buffer: EventBuffer,
    sink: ChdbSink,
    flusher: Flusher,
    clock: ManualClock,
    kind: str,
) -> None:
    seed(buffer, flusher, clock)
    value = {"device": "dev-alice", "session": "s-alice-1"}[kind]
    report = forget(redis, sink, settings, Selector("p1", kind, value), clock=clock)
    drain(flusher)
    if kind == "device":
        assert rows(sink, "profile_id = 'alice'") == []
        assert report.clickhouse_rows == 4
    else:  # only that session's views and session_end; the click had no session
        assert report.clickhouse_rows == 3
        assert [r[1] for r in rows(sink, "profile_id = 'alice'")] == [
            "click", "claimed", "queued", "screen_view",
        ]  # fmt: skip
    assert len(rows(sink, "profile_id = 'bob'")) == 7  # /d waits as the last view


def test_the_fence_costs_one_read_without_tombstones(
    redis: redis_lib.Redis, settings: Settings, buffer: EventBuffer, clock: ManualClock
) -> None:
    keyspace = Keyspace(settings.key_prefix, settings.shards)
    batch = [b'{"project_id":"p1","created_at":"2026-01-01 00:00:00.000","profile_id":"a"}']
    assert drop_forgotten_rows(redis, keyspace, batch) is batch
    forget_tombstone_only(redis, keyspace, Selector("p2", "profile", "a"), clock)
    # Another project's tombstone: the rows are not even decoded.
    assert drop_forgotten_rows(redis, keyspace, batch) is batch
    forget_tombstone_only(redis, keyspace, Selector("p1", "profile", "a"), clock)
    assert drop_forgotten_rows(redis, keyspace, batch) == []


def forget_tombstone_only(
    redis: redis_lib.Redis, keyspace: Keyspace, selector: Selector, clock: ManualClock
) -> None:
    from worker.privacy.tombstones import store_tombstone

    store_tombstone(redis, keyspace, selector, clock.now_ms(), 30, clock)


def test_a_later_request_moves_the_tombstone_forward_never_back(
    redis: redis_lib.Redis, settings: Settings, clock: ManualClock
) -> None:
    from worker.privacy.tombstones import store_tombstone

    keyspace = Keyspace(settings.key_prefix, settings.shards)
    assert store_tombstone(redis, keyspace, ALICE, NOW_MS, 30, clock)[0] == NOW_MS
    assert store_tombstone(redis, keyspace, ALICE, NOW_MS - 5, 30, clock)[0] == NOW_MS
    assert store_tombstone(redis, keyspace, ALICE, NOW_MS + 5, 30, clock)[0] == NOW_MS + 5
    ttl_days = redis.pttl(keyspace.tombstones("p1")) / 86_400_000
    assert 29.9 < ttl_days <= 30.01


def test_audit_ddl_is_idempotent(sink: ChdbSink) -> None:
    sink.query(audit_ddl())
    sink.query(audit_ddl())
    assert sink.query(f"EXISTS TABLE {AUDIT_TABLE}") == [(1,)]


# -- the command ---------------------------------------------------------------------


@pytest.fixture
def seeded(
    buffer: EventBuffer, flusher: Flusher, clock: ManualClock, sink: ChdbSink
) -> Iterator[None]:
    seed(buffer, flusher, clock)
    sink.close()  # the command opens the directory itself
    yield


def test_cli_json(run_main: Any, seeded: None) -> None:
    result: Result = run_main("forget", "--project", "p1", "--profile", "alice", "--json", "--yes")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["clickhouse_rows"] == 4
    assert data["buffer_rows"] == 2
    assert data["claimed_rows"] == 1
    assert data["last_views"] == 2
    assert data["dead_letters"] == 1
    assert data["tombstone_expires_at"].endswith("+00:00")
    assert {"project_id", "selector", "id", "requested_at", "user", "host"} <= set(data)


def test_cli_refuses_without_yes_off_a_terminal(
    run_main: Any, seeded: None, redis: redis_lib.Redis
) -> None:
    result = run_main("forget", "--project", "p1", "--profile", "alice")
    assert result.code == 2
    assert "--yes" in result.err
    assert redis.exists(Keyspace("eventbuffer", 1).tombstones("p1")) == 0


def test_cli_asks_on_a_terminal(
    run_main: Any, seeded: None, monkeypatch: pytest.MonkeyPatch, redis: redis_lib.Redis
) -> None:
    from worker.cli import common

    monkeypatch.setattr(common, "stdin_is_interactive", lambda: True)
    monkeypatch.setattr("rich.console.Console.input", lambda self, prompt: "n")
    result = run_main("forget", "--project", "p1", "--device", "dev-alice")
    assert result.code == 1 and "not confirmed" in result.err
    assert redis.exists(Keyspace("eventbuffer", 1).tombstones("p1")) == 0
    monkeypatch.setattr("rich.console.Console.input", lambda self, prompt: "y")
    result = run_main("forget", "--project", "p1", "--device", "dev-alice")
    assert result.code == 0, result.err
    assert "4 ClickHouse row(s)" in result.out


def test_cli_needs_exactly_one_selector(run_main: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_main("forget", "--project", "p1", "--profile", "a", "--device", "b")
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        run_main("forget", "--project", "p1")


# -- dead letters, held events, durations ----------------------------------------------


def test_dead_letters_lose_the_person_only(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink, clock: ManualClock
) -> None:
    from worker.deadletters import REASON_INGEST_FAILED, DeadLetter, encode_dead_letter

    t = NOW_MS - 60_000
    header = DeadLetter(
        reason=REASON_INGEST_FAILED, error="boom", source="ingest", at=t, shard=0, claim="b"
    )
    alice, bob = person_event("click", t, "alice"), person_event("click", t, "bob")
    later = person_event(
        "click", NOW_MS + 5_000, "alice"
    )  # after the request: not hers to erase yet
    batch = encode_dead_letter(header, json.dumps([alice, bob]).encode())
    body = encode_dead_letter(header, json.dumps([[[alice]], {"kwargs": {}}]).encode())
    junk = encode_dead_letter(header, b'not json "p1" ... "alice"')
    other_junk = encode_dead_letter(header, b'not json "p1" ... "bob"')
    kept = encode_dead_letter(header, json.dumps(later).encode())
    redis.rpush(SHARD.dead, batch, body, junk, other_junk, kept)

    report = forget(redis, sink, settings, ALICE, clock=clock)

    assert report.buffer.dead_letters == 2  # the task body and the junk, whole
    assert report.buffer.dead_letters_rewritten == 1  # the batch, without Alice
    left = redis.lrange(SHARD.dead, 0, -1)
    assert left[1:] == [other_junk, kept]
    head, _, payload = left[0].partition(b"\n")
    assert head == batch.partition(b"\n")[0]
    assert json.loads(payload) == [bob]


def test_held_events_are_released_then_erased(
    redis: redis_lib.Redis, redis_url: str, chdb_url: str, sink: ChdbSink, clock: ManualClock
) -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": redis_url,
            "CLICKHOUSE_URL": chdb_url,
            "EVENT_BUFFER_REORDER_WINDOW_MS": "500",
        }
    )
    buffer = EventBuffer(redis, settings, clock)
    t = NOW_MS - 60_000
    for who in ("alice", "bob"):
        ingest(
            buffer,
            [person_event("screen_view", t, who, f"s-{who}", path="/a"),
             person_event("screen_view", t + 3_000, who, f"s-{who}", path="/b")],
            f"held-{who}",
        )  # fmt: skip
    assert redis.zcard(SHARD.held_due) == 2
    clock.advance(600)  # the window after the tombstone: what forget's settle wait is for
    report = forget(redis, sink, settings, ALICE, clock=clock, settle_s=0)
    assert report.buffer.buffer_rows == 1 and report.buffer.last_views == 1
    assert [(r["profile_id"], r["path"], r.get("duration", 0)) for r in queued(redis)] == [
        ("bob", "/a", 3_000)
    ]
    assert redis.zcard(SHARD.held_due) == 0


def test_the_view_before_a_forgotten_one_keeps_its_duration(
    redis: redis_lib.Redis,
    settings: Settings,
    buffer: EventBuffer,
    sink: ChdbSink,
    flusher: Flusher,
    clock: ManualClock,
) -> None:
    """One session: Bob's view A, then a view X under Alice's profile, then (after the
    request) Bob's view B. A lasts until X, as it did before the request; B starts anew."""
    t = NOW_MS - 60_000
    ingest(buffer, [person_event("screen_view", t, "bob", "shared", path="/a")], "a")
    ingest(buffer, [person_event("screen_view", t + 4_000, "alice", "shared", path="/x")], "x")
    forget(redis, sink, settings, ALICE, clock=clock)
    ingest(buffer, [person_event("screen_view", NOW_MS + 1_000, "bob", "shared", path="/b")], "b")
    ingest(buffer, [person_event("session_end", NOW_MS + 2_000, "bob", "shared")], "end")
    drain(flusher)
    assert sink.query("SELECT path, duration FROM events ORDER BY created_at") == [
        ("/a", 4_000), ("/b", 0), ("", 0)
    ]  # fmt: skip
