"""Hostile values stay data: event fields never reach a Redis key name unescaped,
nor SQL text."""

from __future__ import annotations

import pytest
import redis as redis_lib
from redis.crc import key_slot

from tests.support.clock import ManualClock
from tests.support.dates import now_ms
from worker.buffer import EventBuffer
from worker.events import as_row, parse_event
from worker.flusher import Flusher
from worker.reorder import release_due
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink

HOSTILE = [
    "{",
    "}",
    "{eventbuffer:0}",
    "}{eventbuffer:1}{",
    "a:b:c",
    "*",
    "?",
    "[a-z]",
    "[",
    "\\",
    "with space",
    "new\nline",
    "tab\tcr\r",
    "%",
    "%7B",  # must not meet "{" once percent-encoded
    "ünïcødé ✓ 😀",
    "'; DROP TABLE events; --",
    "{x:String}",
    "..",
]


@pytest.fixture
def sharded(redis_url: str, chdb_url: str) -> Settings:
    return Settings.from_env(
        {"REDIS_URL": redis_url, "CLICKHOUSE_URL": chdb_url, "EVENT_BUFFER_SHARDS": "3"}
    )


def test_hostile_ids_never_change_a_key_name(
    redis: redis_lib.Redis, sharded: Settings, sink: ChdbSink
) -> None:
    clock = ManualClock(now_ms())
    buffer = EventBuffer(redis, sharded, clock)
    at = now_ms() - 60_000
    views, others = {}, []
    for n, text in enumerate(HOSTILE):
        view = parse_event(
            {
                "project_id": f"proj{text}",
                "name": "screen_view",
                "session_id": text,
                "profile_id": text,
                "created_at": at + n,
                "path": text,
                "properties": {text: text, "nested": {text: [text]}},
            }
        )
        views[text] = view
        others.append(
            parse_event(
                {"project_id": f"proj{text}", "name": text, "profile_id": text, "created_at": at}
            )
        )
    buffer.apply(list(views.values()) + others)
    clock.advance(sharded.reorder_window_ms)  # the views were held by the reorder window
    for shard in buffer.shards():
        release_due(buffer.scripts, shard, sharded, clock)

    # Every key sits in its shard's hash slot, under the deployment's prefix.
    tags = {f"{{eventbuffer:{n}}}" for n in range(3)}
    keys = [key.decode() for key in redis.scan_iter(count=1000)]
    assert keys
    for key in keys:
        tag = key[: key.index("}") + 1]
        assert tag in tags, key
        assert key_slot(key.encode()) == key_slot(tag.encode()), key
    # Distinct ids, distinct keys: "%7B" and "{" do not collide, and every id reads back.
    for text, view in views.items():
        assert buffer.get_last_screen_view(session_id=text) == as_row(view)
        assert buffer.get_last_screen_view(project_id=f"proj{text}", profile_id=text) == as_row(
            view
        )
        assert buffer.get_active_visitor_count(f"proj{text}") == 1
    assert buffer.active_projects() == sorted(f"proj{text}" for text in HOSTILE)

    # session_end queues every view; the flush writes the rows intact.
    buffer.apply(
        [
            parse_event(
                {"project_id": f"proj{t}", "name": "session_end", "session_id": t, "created_at": at}
            )
            for t in HOSTILE
        ]
    )
    clock.advance(sharded.reorder_window_ms)
    flusher = Flusher(redis, sharded, lambda: sink, clock)  # releases the ends, then flushes
    assert sum(result.rows for result in flusher.process_buffer().shards) == 3 * len(HOSTILE)
    for text, view in views.items():
        [row] = sink.query(
            "SELECT session_id, profile_id, project_id, path, properties FROM events "
            "WHERE toString(id) = {id:String}",
            {"id": view.id},
        )
        assert row == (
            text,
            text,
            f"proj{text}",
            text,
            {text: text, f"nested.{text}.0": text},
        )


SQL_HOSTILE = [
    "'; DROP TABLE events; --",
    '"; DROP TABLE events; --',
    "{x:String}",
    "{id:UUID}",
    "\\'); SELECT 1; --",
    "`events`",
    "$$ FORMAT CSV $$",
    "0x00 \x00 nul",
]


def test_sql_looking_values_land_verbatim_and_the_table_survives(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    buffer = EventBuffer(redis, settings)
    at = now_ms()
    events = [
        parse_event(
            {
                "project_id": text,
                "name": text,
                "path": text,
                "referrer": text,
                "created_at": at,
                "properties": {text: text},
            }
        )
        for text in SQL_HOSTILE
    ]
    buffer.apply(events)
    [result] = Flusher(redis, settings, lambda: sink).process_buffer().shards
    assert (result.rows, result.dead) == (len(SQL_HOSTILE), 0)
    assert sink.query("SELECT count() FROM events") == [(len(SQL_HOSTILE),)]
    for text in SQL_HOSTILE:
        # Server-side parameters: the value is never part of the SQL text.
        rows = sink.query(
            "SELECT name, path, referrer, project_id, properties FROM events "
            "WHERE name = {value:String}",
            {"value": text},
        )
        assert rows == [(text, text, text, text, {text: text})]
