"""Checks that every event sent landed in ClickHouse exactly once, for the crash tests."""

from __future__ import annotations

import redis as redis_lib

from worker.buffer import EventBuffer
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink


def stored(sink: ChdbSink) -> tuple[int, int, set[str]]:
    """(rows, distinct ids, ids) in ClickHouse; closes the directory again."""
    try:
        ((rows, distinct),) = sink.query("SELECT count(), uniqExact(id) FROM events")
        ids = {row[0] for row in sink.query("SELECT toString(id) FROM events")}
    finally:
        sink.close()
    return int(rows), int(distinct), ids


def open_claim(redis: redis_lib.Redis, settings: Settings) -> str | None:
    shard = EventBuffer(redis, settings).keyspace.shard(0)
    claim = redis.hget(shard.claim, "id")
    return claim.decode() if claim is not None else None


def assert_exactly_once(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink, sent: set[str]
) -> None:
    rows, distinct, ids = stored(sink)
    assert rows == len(sent), f"{rows} rows in ClickHouse for {len(sent)} events"
    assert distinct == rows, f"{rows - distinct} duplicate rows"
    assert ids == sent
    assert open_claim(redis, settings) is None
    assert EventBuffer(redis, settings).get_buffer_size() == 0
