"""`eventbuffer flush` and `eventbuffer status` against real Redis and embedded ClickHouse."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable

import pytest
import redis as redis_lib

from tests.conftest import Result
from tests.support.cli import (
    SHARD,
    chdb_count,
    event,
)
from tests.support.dates import BASE_MS
from worker.buffer import EventBuffer
from worker.claims import Claims
from worker.ingestion import ingest
from worker.lock import FlushLock
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink


def test_flush_drains_the_buffer(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    settings: Settings,
    sink: ChdbSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EVENT_BUFFER_BATCH_SIZE", "5000")
    buffer = EventBuffer(redis, settings)
    base = BASE_MS
    for start in range(0, 12_000, 2_000):
        buffer.apply(
            [event("click", base + n, profile_id=f"u{n % 7}") for n in range(start, start + 2_000)]
        )
    buffer.apply(
        [
            event("screen_view", base, session_id="s1"),
            event("screen_view", base + 4_000, session_id="s1"),
            event("session_end", base + 9_000, session_id="s1"),
            event("screen_view", base, session_id="s2"),  # stays: its session goes on
        ]
    )
    assert buffer.get_buffer_size() == 12_003

    result = run_main("flush")
    assert (result.code, result.err) == (0, "")
    assert "Flushed 12,003 rows" in result.out
    assert "3 batches, 0 re-driven, 0 dead letters" in result.out
    assert "1 screen_view(s) wait as their session's last view" in result.out
    assert buffer.get_buffer_size() == 0
    assert chdb_count(settings.clickhouse_url, "SELECT count() FROM events") == 12_003
    durations = sink.query(
        "SELECT duration FROM events WHERE session_id = 's1' ORDER BY created_at"
    )
    sink.close()
    assert [int(d) for (d,) in durations] == [4000, 0, 0]

    empty = run_main("flush")
    assert empty.code == 0
    assert "nothing to flush" in empty.out


def test_flush_skips_a_shard_whose_live_holder_keeps_its_lock(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    settings: Settings,
    sink: ChdbSink,
) -> None:
    """A live flusher (this process: its pid is alive, its watchdog extends the lock
    every third of its 1 s TTL) keeps the lock past the 1 s it had left: `flush` waits
    that long, then skips the shard with one line naming the holder, and exits 1."""
    EventBuffer(redis, settings).apply([event("click", BASE_MS)])
    lock = FlushLock(redis, SHARD.lock, 1)
    assert lock.acquire()
    try:
        result = run_main("flush")
        assert lock.token == redis.get(SHARD.lock)  # still its own: never taken over
    finally:
        lock.release()
    assert result.code == 1
    holder = f"{socket.gethostname()}:{os.getpid()}"
    assert re.search(
        f"Shard 0: its flush lock is held by {re.escape(holder)} \\(heartbeat [01] s ago, fresh\\)",
        result.out,
    )
    assert re.search("waiting up to [01] s for it", result.out)
    [line] = result.err.strip().splitlines()
    assert f"skipped shard 0: its flush lock is held by {holder} (heartbeat" in line
    assert re.search("past the [01] s it had left: a live flusher extends it", line)
    assert redis.llen(SHARD.queue) == 1


def test_status_json_matches_redis(
    run_main: Callable[..., Result], redis: redis_lib.Redis, settings: Settings
) -> None:
    buffer = EventBuffer(redis, settings)
    now = int(time.time() * 1000)
    buffer.apply(
        [
            event("click", now, profile_id="u1"),
            event("click", now, profile_id="u2"),
            event("click", now, profile_id="u1"),
            event("screen_view", now, project_id="p2", profile_id="u3", session_id="s9"),
            event("click", now, project_id="[/p3]", profile_id="u4"),
        ]
    )
    ingest(buffer, [{"project_id": "p1", "name": "bad", "created_at": "yesterday"}], "b1")
    # Two session events held by a reorder window (another buffer's settings).
    window = Settings.from_env({"REDIS_URL": settings.redis_url})
    EventBuffer(redis, window).apply(
        [
            event("screen_view", now, session_id="s10"),
            event("session_end", now + 1, session_id="s10"),
        ]
    )
    claim = Claims(redis).claim(SHARD, "claim-1", 2, now - 5_000, 1000)
    assert claim is not None
    redis.hset(
        SHARD.stats,
        mapping={"at": now - 60_000, "rows": 17, "dead": 1, "claim": "c0", "claimed": 18},
    )
    lock = FlushLock(redis, SHARD.lock, 60)
    assert lock.acquire()
    token = lock.token.decode()
    try:
        result = run_main("status", "--json")
        human = run_main("status")
    finally:
        lock.release()

    assert (result.code, result.err) == (0, "")
    data = json.loads(result.out)
    [shard] = data["shards"]
    assert shard["queued"] == redis.llen(SHARD.queue) == 4
    assert shard["claimed"]["id"] == "claim-1" and shard["claimed"]["count"] == 2
    assert shard["claimed"]["age_s"] >= 5
    assert shard["dead_letters"] == redis.llen(SHARD.dead) == 1
    assert shard["waiting_views"] == 1
    assert shard["held_sessions"] == redis.zcard(SHARD.held_due) == 1
    assert shard["lock"]["token"] == token
    assert 0 < shard["lock"]["ttl_ms"] <= 60_000
    # Who holds it, and its heartbeat: fresh (it was just taken).
    assert shard["lock"]["holder"]["host"] == socket.gethostname()
    assert shard["lock"]["holder"]["pid"] == os.getpid()
    assert shard["lock"]["holder_ttl_ms"] == 60_000
    assert 0 <= shard["lock"]["heartbeat_age_ms"] < 20_000
    assert shard["lock"]["stale"] is False
    assert shard["last_flush"]["rows"] == 17 and shard["last_flush"]["at_ms"] == now - 60_000
    assert data["totals"] == {
        "queued": 4,
        "claimed": 2,
        "dead_letters": 1,
        "waiting_views": 1,
        "held_sessions": 1,
    }
    assert data["active_visitors"] == {"[/p3]": 1, "p1": 2, "p2": 1}
    assert human.code == 0
    assert "[/p3]" in human.out and "claimed" in human.out
    assert re.search(r"busy \d+s", human.out)
    holder = f"{socket.gethostname()}:{os.getpid()}"
    assert re.search(
        f"Shard 0 lock: {re.escape(holder)}, heartbeat \\d+ s ago, fresh: a flush is at work",
        human.out,
    )
