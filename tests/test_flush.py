"""The flush against real Redis and real embedded ClickHouse (chDB)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

import msgspec
import pytest
import redis as redis_lib

from tests.support.dates import DAY, NOON_MS
from tests.support.flushing import flush_error
from tests.support.sinks import RecordingSink
from worker.buffer import EventBuffer
from worker.deadletters import REASON_INVALID_JSON, REASON_REJECTED, decode_dead_letter
from worker.errors import FlushError
from worker.events import Event, encode_event, parse_event
from worker.flusher import Flusher
from worker.keys import CHANNEL_SAVED, ShardKeys
from worker.lock import FlushLock
from worker.settings import Settings
from worker.sinks.base import PermanentSinkError, RetryableSinkError, Sink
from worker.sinks.chdb import ChdbSink, path_from_url

KEYS = ShardKeys("eventbuffer", 0)


def event(name: str, created_at: str, **fields: Any) -> Event:
    return parse_event({"project_id": "p1", "name": name, "created_at": created_at, **fields})


def settings_with(redis_url: str, chdb_url: str, **env: str) -> Settings:
    return Settings.from_env({"REDIS_URL": redis_url, "CLICKHOUSE_URL": chdb_url, **env})


def flusher_for(redis: redis_lib.Redis, settings: Settings, sink: Sink) -> Flusher:
    return Flusher(redis, settings, lambda: sink)


def test_rows_land_with_the_right_durations(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    buffer = EventBuffer(redis, settings)
    views = [
        event("screen_view", t, session_id="s1", profile_id="u1")
        for t in (f"{DAY}T12:00:00Z", f"{DAY}T12:00:01Z", f"{DAY}T12:00:03Z")
    ]
    end = event("session_end", f"{DAY}T12:00:10Z", session_id="s1", profile_id="u1")
    for item in [*views, end]:
        buffer.add(item)
    [result] = flusher_for(redis, settings, sink).process_buffer().shards
    assert (result.locked, result.rows, result.dead, result.batches) == (True, 4, 0, 1)
    rows = sink.query("SELECT toString(id), name, duration FROM events ORDER BY created_at")
    assert rows == [
        (views[0].id, "screen_view", 1000),
        (views[1].id, "screen_view", 2000),
        (views[2].id, "screen_view", 0),
        (end.id, "session_end", 0),
    ]
    assert buffer.get_buffer_size() == 0


def test_fields_round_trip_into_clickhouse(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    item = parse_event(
        {
            "project_id": "p1",
            "name": "purchase",
            "created_at": f"{DAY}T14:00:00.123+02:00",
            "properties": {"plan": "pro", "seats": 3, "nested": {"ok": True}},
            "country": "SE",
            "longitude": 18.06,
            "latitude": None,
            "imported_at": NOON_MS,
        }
    )
    EventBuffer(redis, settings).add(item)
    flusher_for(redis, settings, sink).process_buffer()
    [row] = sink.query(
        "SELECT toString(created_at), properties, country, round(longitude, 2), latitude, "
        "toString(imported_at) FROM events"
    )
    assert row == (
        f"{DAY} 12:00:00.123",
        {"plan": "pro", "seats": "3", "nested.ok": "true"},
        "SE",
        18.06,
        None,
        f"{DAY} 12:00:00",
    )


def test_chunks_of_chunk_size(redis: redis_lib.Redis, redis_url: str, chdb_url: str) -> None:
    settings = settings_with(redis_url, chdb_url, EVENT_BUFFER_CHUNK_SIZE="2")
    inner = ChdbSink(path_from_url(chdb_url))
    inner.migrate()
    sink = RecordingSink(inner)
    EventBuffer(redis, settings).apply([event("x", f"{DAY}T12:00:0{n}Z") for n in range(4)])
    [result] = flusher_for(redis, settings, sink).process_buffer().shards
    assert [size for size, _ in sink.writes] == [2, 2]
    claim = result.claims[0]
    assert [token for _, token in sink.writes] == [f"{claim}:0", f"{claim}:1"]
    assert sink.query("SELECT count() FROM events") == [(4,)]


def test_takes_at_most_batch_size_oldest_events_sorted_by_time(
    redis: redis_lib.Redis, redis_url: str, chdb_url: str
) -> None:
    settings = settings_with(redis_url, chdb_url, EVENT_BUFFER_BATCH_SIZE="4")
    sink = ChdbSink(path_from_url(chdb_url))
    sink.migrate()
    items = [event(f"e{n}", f"{DAY}T12:00:{59 - n:02d}Z") for n in range(6)]
    EventBuffer(redis, settings).apply(items)
    [result] = flusher_for(redis, settings, sink).process_buffer().shards
    assert result.rows == 4
    landed = sink.query("SELECT name FROM events ORDER BY created_at")
    assert landed == [("e3",), ("e2",), ("e1",), ("e0",)]
    assert redis.llen(KEYS.queue) == 2
    [result] = flusher_for(redis, settings, sink).process_buffer(max_batches=5).shards
    assert (result.rows, result.batches) == (2, 1)


def test_a_held_lock_makes_a_second_flush_return_at_once(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    EventBuffer(redis, settings).add(event("x", f"{DAY}T12:00:00Z"))
    other = FlushLock(redis, KEYS.lock, 30)
    assert other.acquire()
    try:
        [result] = flusher_for(redis, settings, sink).process_buffer().shards
        assert (result.locked, result.rows) == (False, 0)
        assert redis.llen(KEYS.queue) == 1
    finally:
        other.release()
    [result] = flusher_for(redis, settings, sink).process_buffer().shards
    assert (result.locked, result.rows) == (True, 1)


def test_concurrent_flushes_one_does_the_work(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    EventBuffer(redis, settings).apply(
        [event("x", f"{DAY}T12:00:{n % 60:02d}Z") for n in range(500)]
    )
    barrier = threading.Barrier(4)
    results = []

    def run() -> None:
        barrier.wait()
        results.extend(flusher_for(redis, settings, sink).process_buffer().shards)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.rows for r in results) == 500
    assert sink.query("SELECT count(), uniqExact(id) FROM events") == [(500, 500)]


def test_invalid_json_and_rejected_rows_are_dead_lettered_the_rest_lands(
    redis: redis_lib.Redis, redis_url: str, chdb_url: str
) -> None:
    settings = settings_with(redis_url, chdb_url, EVENT_BUFFER_CHUNK_SIZE="4")
    sink = ChdbSink(path_from_url(chdb_url))
    sink.migrate()
    good = [event("ok", f"{DAY}T12:00:0{n}Z") for n in range(9)]
    EventBuffer(redis, settings).apply(good)
    # Entries no validated producer would write: corrupt bytes, and a row
    # ClickHouse refuses (FixedString(2) cannot hold a 3-letter country).
    bad_row = (
        b'{"id":"00000000-0000-4000-8000-000000000001","name":"bad","project_id":"p1",'
        b'"created_at":"%b 12:00:04.500","country":"SWE"}' % DAY.encode()
    )
    redis.rpush(KEYS.queue, b"{not json", bad_row)
    [result] = flusher_for(redis, settings, sink).process_buffer().shards
    assert (result.rows, result.dead) == (9, 2)
    assert sink.query("SELECT count() FROM events WHERE name = 'ok'") == [(9,)]
    letters = [decode_dead_letter(entry) for entry in redis.lrange(KEYS.dead, 0, -1)]
    by_reason = {header.reason: (header, payload) for header, payload in letters}
    assert by_reason[REASON_INVALID_JSON][1] == b"{not json"
    header, payload = by_reason[REASON_REJECTED]
    assert payload == bad_row
    assert "FixedString" in header.error
    assert header.claim == result.claims[0]
    assert redis.llen(KEYS.queue) == 0


def test_a_row_that_is_not_utf8_is_dead_lettered_the_rest_lands(
    redis: redis_lib.Redis, redis_url: str, chdb_url: str
) -> None:
    # chDB takes the statement as bytes and ClickHouse stores a String's bytes as they
    # come: a row that is not UTF-8 (in a field the flush's own decoding skips) must
    # not be stored, but found and dead-lettered like any row ClickHouse refuses.
    settings = settings_with(redis_url, chdb_url, EVENT_BUFFER_CHUNK_SIZE="4")
    sink = ChdbSink(path_from_url(chdb_url))
    sink.migrate()
    good = [event("ok", f"{DAY}T12:00:0{n}Z", city="Malmö") for n in range(5)]
    EventBuffer(redis, settings).apply(good)
    bad_row = (
        b'{"id":"00000000-0000-4000-8000-000000000002","name":"bad","project_id":"p1",'
        b'"created_at":"%b 12:00:02.500","city":"M\xfcnchen"}' % DAY.encode()
    )
    redis.rpush(KEYS.queue, bad_row)
    [result] = flusher_for(redis, settings, sink).process_buffer().shards
    assert (result.rows, result.dead) == (5, 1)
    assert sink.query("SELECT count(), countIf(city = 'Malmö') FROM events") == [(5, 5)]
    [(header, payload)] = [decode_dead_letter(entry) for entry in redis.lrange(KEYS.dead, 0, -1)]
    assert (header.reason, payload) == (REASON_REJECTED, bad_row)
    assert "UTF-8" in header.error


def test_saved_notice_carries_per_project_counts(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    pubsub = redis.pubsub()
    pubsub.subscribe(CHANNEL_SAVED)
    pubsub.get_message(timeout=1)
    buffer = EventBuffer(redis, settings)
    buffer.apply([event("a", f"{DAY}T12:00:00Z"), event("b", f"{DAY}T12:00:00Z")])
    buffer.add(parse_event({"project_id": "p2", "name": "c", "created_at": f"{DAY}T12:00:00Z"}))
    [result] = flusher_for(redis, settings, sink).process_buffer().shards
    message = pubsub.get_message(timeout=2)
    assert message is not None
    notice = msgspec.json.decode(message["data"])
    assert notice == {
        "shard": 0,
        "claim": result.claims[0],
        "rows": 3,
        "projects": {"p1": 2, "p2": 1},
    }
    pubsub.close()


def test_a_retryable_failure_keeps_the_claim_and_the_redrive_writes_no_duplicates(
    redis: redis_lib.Redis, redis_url: str, chdb_url: str
) -> None:
    settings = settings_with(redis_url, chdb_url, EVENT_BUFFER_CHUNK_SIZE="3")
    inner = ChdbSink(path_from_url(chdb_url))
    inner.migrate()
    EventBuffer(redis, settings).apply([event("x", f"{DAY}T12:00:{n:02d}Z") for n in range(10)])
    failing = RecordingSink(inner, fail_after=2, error=RetryableSinkError("server went away"))
    flush_error(flusher_for(redis, settings, failing), RetryableSinkError)
    assert redis.hget(KEYS.claim, "count") == b"10"
    assert inner.query("SELECT count() FROM events") == [(6,)]
    redis.delete(KEYS.backoff)  # as if the back-off delay had passed
    retry = RecordingSink(inner)
    [result] = flusher_for(redis, settings, retry).process_buffer().shards
    assert (result.redriven, result.batches) == (1, 1)
    # Same claim, same chunks, same tokens: the two chunks already written are dropped.
    claim = failing.writes[0][1].rsplit(":", 1)[0]
    assert result.claims == [claim]
    assert failing.tokens == [f"{claim}:0", f"{claim}:1", f"{claim}:2"]
    assert failing.accepted == [f"{claim}:0", f"{claim}:1"]
    assert [t for _, t in retry.writes] == [f"{claim}:{n}" for n in range(4)]
    assert inner.query("SELECT count(), uniqExact(id) FROM events") == [(10, 10)]
    assert not redis.exists(KEYS.claim)


def test_a_missing_table_stops_the_flush_without_dead_letters(
    redis: redis_lib.Redis, settings: Settings
) -> None:
    unmigrated = ChdbSink(path_from_url(settings.clickhouse_url))
    EventBuffer(redis, settings).add(event("x", f"{DAY}T12:00:00Z"))
    error = flush_error(flusher_for(redis, settings, unmigrated), PermanentSinkError)
    assert error.code == 60
    assert redis.llen(KEYS.dead) == 0
    assert redis.llen(KEYS.queue) == 1
    unmigrated.close()


def test_clickhouse_failures_back_off_with_a_doubling_delay(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    EventBuffer(redis, settings).add(event("x", f"{DAY}T12:00:00Z"))
    down = RecordingSink(sink, fail_after=0, error=RetryableSinkError("connection refused"))
    with pytest.raises(RetryableSinkError):
        flusher_for(redis, settings, down).flush_shard(0)
    assert 1500 < redis.pttl(KEYS.backoff) <= 2000
    assert not redis.exists(KEYS.lock)

    untouched = RecordingSink(sink)
    waiting = flusher_for(redis, settings, untouched).flush_shard(0)
    assert 0 < waiting.backoff_s <= 2 and waiting.rows == 0
    assert untouched.writes == [], "no ClickHouse call while backing off"

    redis.delete(KEYS.backoff)  # as if 2 s had passed
    again = RecordingSink(sink, fail_after=0, error=RetryableSinkError("connection refused"))
    with pytest.raises(RetryableSinkError):
        flusher_for(redis, settings, again).flush_shard(0)
    assert 3500 < redis.pttl(KEYS.backoff) <= 4000, "the delay doubles"

    # An operator's explicit flush does not wait, and success resets the back-off.
    result = flusher_for(redis, settings, sink).flush_shard(0, respect_backoff=False)
    assert result.rows == 1
    assert not redis.exists(KEYS.backoff) and not redis.exists(KEYS.failures)


def test_one_sink_serves_every_shard_of_a_run(
    redis: redis_lib.Redis, redis_url: str, chdb_url: str
) -> None:
    """On chDB a sink is a session: one per run, not one per shard (each one leaks memory)."""
    settings = settings_with(redis_url, chdb_url, EVENT_BUFFER_SHARDS="3")
    inner = ChdbSink(path_from_url(chdb_url))
    inner.migrate()
    opened: list[RecordingSink] = []
    closed: list[RecordingSink] = []

    class Counted(RecordingSink):
        def close(self) -> None:
            closed.append(self)
            super().close()

    def factory() -> Sink:
        opened.append(Counted(ChdbSink(path_from_url(chdb_url))))
        return opened[-1]

    buffer = EventBuffer(redis, settings)
    buffer.apply([event("x", f"{DAY}T12:00:00Z", session_id=f"s{n}") for n in range(30)])
    assert all(length for length in buffer.queue_lengths().values())  # rows in every shard
    summary = Flusher(redis, settings, factory).process_buffer()
    assert (summary.rows, len(summary.shards)) == (30, 3)
    assert len(opened) == 1 and closed == opened
    assert len({token.split(":")[0] for _, token in opened[0].writes}) == 3
    assert inner.query("SELECT count() FROM events") == [(30,)]
    inner.close()


def test_a_lost_lock_names_its_shard_and_lock(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    class Stolen(RecordingSink):
        def write(self, rows: Any, token: str) -> None:
            redis.set(KEYS.lock, "another flusher", px=30_000)  # taken over mid-flush
            super().write(rows, token)

    EventBuffer(redis, settings).add(event("x", f"{DAY}T12:00:00Z"))
    [result] = flusher_for(redis, settings, Stolen(sink)).process_buffer().shards
    assert isinstance(result.error, FlushError)
    assert (result.error.shard, result.error.lock) == (0, KEYS.lock)


def test_chunks_reach_chdb_through_a_file_that_is_removed_after(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink, tmp_path: Any, monkeypatch: Any
) -> None:
    # The rows go to chDB by `FROM INFILE` (its binding scans a statement's whole text);
    # the file is removed once inserted, and a file a killed process left is removed
    # by the next process's first chunk.
    from worker.sinks import chdb as chdb_module

    monkeypatch.setattr(chdb_module, "_chunk_dir", lambda: str(tmp_path))
    monkeypatch.setattr(chdb_module, "_swept", set())
    dead = subprocess_pid_that_exited()
    orphan = tmp_path / f"eventbuffer-chunk-{dead}-abc.rows"
    orphan.write_bytes(b"{}")
    alive = tmp_path / f"eventbuffer-chunk-{os.getpid()}-def.rows"
    alive.write_bytes(b"{}")
    unrelated = tmp_path / "other.rows"
    unrelated.write_bytes(b"{}")
    seen: list[str] = []
    real_run = sink._run

    def recording_run(sql: str | bytes, *args: Any, **kwargs: Any) -> Any:
        seen.append(sql if isinstance(sql, str) else sql[:200].decode())
        return real_run(sql, *args, **kwargs)

    monkeypatch.setattr(sink, "_run", recording_run)
    EventBuffer(redis, settings).apply([event("a", f"{DAY}T12:00:0{n}Z") for n in range(3)])
    [result] = flusher_for(redis, settings, sink).process_buffer().shards
    assert result.rows == 3
    assert sink.query("SELECT count() FROM events") == [(3,)]
    inserts = [sql for sql in seen if sql.startswith("INSERT")]
    assert len(inserts) == 1 and "FROM INFILE" in inserts[0]
    left = sorted(path.name for path in tmp_path.iterdir() if path.name.endswith(".rows"))
    assert left == sorted([alive.name, unrelated.name])


def test_chunks_go_in_the_statement_when_no_file_can_be_written(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink, tmp_path: Any, monkeypatch: Any
) -> None:
    from worker.sinks import chdb as chdb_module

    monkeypatch.setattr(chdb_module, "_chunk_dir", lambda: str(tmp_path / "missing"))
    EventBuffer(redis, settings).apply([event("a", f"{DAY}T12:00:0{n}Z") for n in range(3)])
    [result] = flusher_for(redis, settings, sink).process_buffer().shards
    assert result.rows == 3
    assert sink.query("SELECT count() FROM events") == [(3,)]


def test_chunk_files_are_written_on_a_thread_while_other_chunks_are_inserted(
    redis: redis_lib.Redis,
    redis_url: str,
    chdb_url: str,
    sink: ChdbSink,
    tmp_path: Any,
    monkeypatch: Any,
) -> None:
    # Claims of 4 rows in chunks of 2, three claims: every chunk but the run's first is
    # prepared (joined, written to its file) on the sink's thread, asked for before the
    # INSERT of the chunk before it (by the read-ahead for the first chunk of a claim).
    # Every row lands once; no file is left.
    from worker.sinks import chdb as chdb_module

    monkeypatch.setattr(chdb_module, "_chunk_dir", lambda: str(tmp_path))
    settings = settings_with(
        redis_url,
        chdb_url,
        EVENT_BUFFER_REORDER_WINDOW_MS="0",
        EVENT_BUFFER_BATCH_SIZE="4",
        EVENT_BUFFER_CHUNK_SIZE="2",
        EVENT_BUFFER_MAX_BATCHES_PER_FLUSH="10",
    )
    prepared: dict[tuple[bytes, ...], str] = {}  # a chunk's rows -> the thread that wrote it
    inserted: list[tuple[bytes, ...]] = []
    real_prepare = chdb_module._prepare
    real_run = sink._run

    def prepare(rows: Any) -> Any:
        prepared[tuple(sorted(rows))] = threading.current_thread().name
        return real_prepare(rows)

    def run(sql: str | bytes, *args: Any, **kwargs: Any) -> Any:
        if isinstance(sql, str) and sql.startswith("INSERT"):
            path = sql.split("FROM INFILE '")[1].split("'")[0]
            with open(path, "rb") as file:
                inserted.append(tuple(sorted(file.read().split(b"\n"))))
        return real_run(sql, *args, **kwargs)

    monkeypatch.setattr(chdb_module, "_prepare", prepare)
    monkeypatch.setattr(sink, "_run", run)
    EventBuffer(redis, settings).apply(
        [event("a", f"{DAY}T12:00:{n:02}Z", session_id=f"s{n}") for n in range(12)]
    )
    [result] = flusher_for(redis, settings, sink).process_buffer().shards
    assert (result.rows, result.batches, result.chunk_rows) == (12, 3, [2] * 6)
    assert sink.query("SELECT count(), uniqExact(id) FROM events") == [(12, 12)]
    assert len(inserted) == 6 and len({row for rows in inserted for row in rows}) == 12
    threads = [prepared[rows] for rows in inserted]
    assert threads[0] == threading.current_thread().name
    assert all(name.startswith("chdb-chunks") for name in threads[1:]), threads
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".rows")]


def test_a_prepared_chunk_is_inserted_only_for_the_very_rows_it_holds(
    sink: ChdbSink, tmp_path: Any, monkeypatch: Any
) -> None:
    # The flush prepares a chunk before the fence runs; a chunk the fence shortened is
    # written from its own rows, never from the file prepared for the whole chunk.
    from worker.sinks import chdb as chdb_module

    monkeypatch.setattr(chdb_module, "_chunk_dir", lambda: str(tmp_path))
    rows = [encode_event(event("a", f"{DAY}T12:00:0{n}Z")) for n in range(3)]
    sink.prepare(rows)
    sink.write(rows[:2], "t:0")  # the fence dropped the last row
    assert sink.query("SELECT count() FROM events") == [(2,)]
    sink.write(list(rows), "t:1")  # the same row objects: the prepared file
    assert sink.query("SELECT count() FROM events") == [(5,)]
    sink.prepare(rows[:1])
    sink.close()  # a prepared chunk never written: its file is removed
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".rows")]


def subprocess_pid_that_exited() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
