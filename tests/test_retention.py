"""Retention (EVENT_BUFFER_RETENTION_DAYS), on embedded chDB and real Redis: the
TTL migration on a new table and on an existing one, changed and removed; ingest
dead-letters an event already past the retention.
"""

from __future__ import annotations

import uuid

import redis as redis_lib

from tests.support.migrations import (
    DAY_MS,
    ONCE,
    PREVIOUS_RELEASE_DDL,
    RETENTION,
    applied_details,
    engine_full,
    ids,
    now_ms,
    row,
    versions,
)
from worker.buffer import EventBuffer
from worker.deadletters import REASON_INVALID_EVENT, iter_dead_letters
from worker.ingestion import ingest
from worker.retention import REASON_PAST_RETENTION
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink
from worker.sinks.migrations import read_records


def test_retention_on_a_new_table(embedded: ChdbSink) -> None:
    report = embedded.migrate(retention_days=30)
    assert applied_details(report)[RETENTION].startswith("TTL created_at + INTERVAL 30 DAY DELETE")
    assert "TTL created_at + toIntervalDay(30)" in engine_full(embedded)
    old, recent = str(uuid.UUID(int=1)), str(uuid.UUID(int=2))
    embedded.write(
        [row(now_ms() - 40 * DAY_MS, id=old), row(now_ms() - 2 * DAY_MS, id=recent)], "t:0"
    )
    embedded.query("OPTIMIZE TABLE events FINAL")
    assert ids(embedded) == [recent]
    # A caller not told the setting (retention_days=None) leaves the TTL alone.
    assert embedded.migrate().applied == []
    assert "TTL created_at + toIntervalDay(30)" in engine_full(embedded)


def test_retention_on_an_existing_table_then_changed_and_removed(embedded: ChdbSink) -> None:
    embedded.query(PREVIOUS_RELEASE_DDL)
    old, recent, older = (str(uuid.UUID(int=n)) for n in (1, 2, 3))
    embedded.write(
        [row(now_ms() - 40 * DAY_MS, id=old), row(now_ms() - 2 * DAY_MS, id=recent)], "t:0"
    )
    embedded.query("OPTIMIZE TABLE events FINAL")
    assert ids(embedded) == [old, recent]  # no TTL yet: the merge keeps both

    embedded.migrate(retention_days=30)
    embedded.query("OPTIMIZE TABLE events FINAL")
    assert ids(embedded) == [recent]

    # A longer retention later: applied again (recorded as another row of 3).
    assert [v for v, _, _ in embedded.migrate(retention_days=90).applied] == [RETENTION]
    assert "toIntervalDay(90)" in engine_full(embedded)
    # 0 removes the TTL: an old row then stays.
    removed = embedded.migrate(retention_days=0)
    assert applied_details(removed) == {RETENTION: "retention TTL removed"}
    assert " TTL " not in engine_full(embedded)
    embedded.write([row(now_ms() - 200 * DAY_MS, id=older)], "t:1")
    embedded.query("OPTIMIZE TABLE events FINAL")
    assert ids(embedded) == sorted([recent, older])
    assert versions(read_records(embedded.query, None)) == ONCE | {RETENTION: 3}
    assert embedded.migrate(retention_days=0).applied == []


def test_ingest_dead_letters_an_event_past_retention(
    redis: redis_lib.Redis, settings: Settings
) -> None:
    kept = Settings.from_env({"REDIS_URL": settings.redis_url, "EVENT_BUFFER_RETENTION_DAYS": "30"})
    buffer = EventBuffer(redis, kept)
    old = {"id": str(uuid.UUID(int=1)), "name": "a", "project_id": "p"}
    recent = {"id": str(uuid.UUID(int=2)), "name": "b", "project_id": "p"}
    payload = [
        {**old, "created_at": now_ms() - 31 * DAY_MS},
        {**recent, "created_at": now_ms() - 29 * DAY_MS},
    ]
    result = ingest(buffer, payload, "batch-1")
    assert (result.accepted, result.invalid) == (1, 1)
    letters = [letter for shard in buffer.shards() for letter in iter_dead_letters(redis, shard)]
    assert [letter.reason for letter in letters] == [REASON_PAST_RETENTION]
    assert letters[0].header is not None and letters[0].header.field == "created_at"
    assert "retention of 30 days" in letters[0].header.error
    # Without retention the same event is valid (only max_past_days bounds it).
    redis.flushall()
    forever = EventBuffer(redis, Settings.from_env({"REDIS_URL": settings.redis_url}))
    assert ingest(forever, payload, "batch-2").accepted == 2
    assert REASON_INVALID_EVENT != REASON_PAST_RETENTION
