"""Claims by position, and the next claim's rows read ahead (worker/claims.py).

claim.lua returns a claim's size and position (rows ever removed from the
queue's head), and its rows are read by LRANGE checked against that
position; rows read ahead of a claim are used only at their own position.
Against a real Redis, and a real chDB for the flush.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import msgspec
import pytest
import redis as redis_lib

from tests.support.dates import DAY
from worker.buffer import EventBuffer
from worker.claims import AckResult, Claim, Claims, Head, QueueRows, order
from worker.errors import LockLostError, QueueMovedError
from worker.events import Event, RowHead, parse_event
from worker.flusher import Flusher
from worker.keys import ShardKeys
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink, path_from_url

KEYS = ShardKeys("eventbuffer", 0)


def events(n: int) -> list[Event]:
    return [
        parse_event({"project_id": "p1", "name": f"e{i}", "created_at": f"{DAY}T12:00:{i:02d}Z"})
        for i in range(n)
    ]


def claim(scripts: Claims, claim_id: str, rows: int, ahead: QueueRows | None = None) -> Claim:
    made = scripts.claim(KEYS, claim_id, rows, 0, 1000, ahead=ahead)
    assert made is not None
    return made


def ack(scripts: Claims, made: Claim) -> None:
    result = scripts.ack(
        KEYS,
        lock_token=b"nobody holds the lock",
        claim_id=made.id,
        now_ms=0,
        rows_inserted=len(made.rows),
        dead_letters=[],
        saved=None,
    )
    assert result == AckResult.ACKED


def test_rows_are_taken_only_at_the_position_they_were_read_from() -> None:
    read = QueueRows(position=8, rows=[b"a", b"b", b"c"])
    assert read.take(8, 2) == [b"a", b"b"]
    assert read.take(8, 5) == [b"a", b"b", b"c"]
    assert read.take(7, 2) == [] and read.take(9, 2) == []


def test_claims_are_named_by_position_and_rows_read_ahead_are_the_next_claims(
    redis: redis_lib.Redis, settings: Settings
) -> None:
    EventBuffer(redis, settings).apply(events(10))
    queue = redis.lrange(KEYS.queue, 0, -1)
    scripts = Claims(redis)

    first = claim(scripts, "c1", 4)
    assert (first.position, first.rows, first.redriven) == (0, queue[:4], False)
    ahead = scripts.read_ahead(KEYS, first, 4)
    assert (ahead.position, ahead.rows) == (4, queue[4:8])
    # Handed back unacknowledged, the open claim has the same position and rows.
    again = claim(scripts, "ignored", 4)
    assert (again.id, again.position, again.rows, again.redriven) == ("c1", 0, queue[:4], True)

    ack(scripts, first)
    second = claim(scripts, "c2", 5, ahead=ahead)  # 4 rows read ahead, 1 more read now
    assert (second.position, second.rows) == (4, queue[4:9])
    ack(scripts, second)
    # Rows read at another position are never taken for a claim's.
    third = claim(scripts, "c3", 5, ahead=QueueRows(position=4, rows=queue[4:9]))
    assert (third.position, third.rows) == (9, queue[9:])


class AckedMeanwhile(Claims):
    """Claims where another flusher acknowledges 2 rows between a claim and its read."""

    def rows(self, shard: ShardKeys, start: int, count: int) -> Any:
        self.redis.ltrim(shard.queue, 2, -1)
        self.redis.hincrby(shard.stats, "removed_total", 2)
        return super().rows(shard, start, count)


def test_a_head_that_moved_before_the_rows_were_read_stops_the_claim(
    redis: redis_lib.Redis, settings: Settings
) -> None:
    EventBuffer(redis, settings).apply(events(6))
    with pytest.raises(QueueMovedError, match="moved \\(from 0 to 2 rows removed\\)") as raised:
        AckedMeanwhile(redis).claim(KEYS, "c1", 4, 0, 1000)
    assert isinstance(raised.value, LockLostError)  # the flush stops as for a lost lock
    assert (raised.value.shard, raised.value.lock) == (0, KEYS.lock)


def test_a_flush_of_many_claims_reads_each_claims_rows_ahead(
    redis: redis_lib.Redis, redis_url: str, chdb_url: str
) -> None:
    settings = Settings.from_env(
        {"REDIS_URL": redis_url, "CLICKHOUSE_URL": chdb_url, "EVENT_BUFFER_BATCH_SIZE": "5"}
    )
    sent = events(23)
    EventBuffer(redis, settings).apply(sent)
    sink = ChdbSink(path_from_url(chdb_url))
    sink.migrate()
    flusher = Flusher(redis, settings, lambda: sink)
    reads: list[str] = []
    scripts = flusher.claims
    real_rows, real_ahead = scripts.rows, scripts.read_ahead

    def rows(shard: ShardKeys, start: int, count: int) -> Any:
        reads.append("read")
        return real_rows(shard, start, count)

    def read_ahead(shard: ShardKeys, made: Claim, count: int) -> QueueRows:
        reads.append("ahead")
        return real_ahead(shard, made, count)

    scripts.rows, scripts.read_ahead = rows, read_ahead  # type: ignore[method-assign]
    [result] = flusher.process_buffer(max_batches=10).shards
    assert (result.rows, result.batches) == (23, 5)
    # Only the first claim read its own rows; each later one had them read ahead
    # (every read ahead reads through rows() too, once).
    assert reads.count("ahead") == 5
    assert reads.count("read") - reads.count("ahead") == 1
    landed = sink.query("SELECT toString(id) FROM events")
    assert sorted(i for (i,) in landed) == sorted(e.id for e in sent)
    assert redis.llen(KEYS.queue) == 0


def test_the_read_ahead_begins_with_its_claims_insert_and_the_session_opens_meanwhile(
    redis: redis_lib.Redis, redis_url: str, chdb_url: str, monkeypatch: Any
) -> None:
    # The rows behind a claim are read once the claim's first INSERT goes out (after
    # its fence), not beside the claim's own decode and sort; the run's chDB session is
    # opened on the sink's thread while the first claim's rows are read, and closed
    # with the sink. The claim's own work is slowed down here so that a read begun at
    # once would come first.
    import threading
    import time

    from worker import flusher as flusher_module
    from worker.sinks import chdb as chdb_module

    settings = Settings.from_env(
        {"REDIS_URL": redis_url, "CLICKHOUSE_URL": chdb_url, "EVENT_BUFFER_BATCH_SIZE": "5"}
    )
    sent = events(12)
    EventBuffer(redis, settings).apply(sent)
    sink = ChdbSink(path_from_url(chdb_url))
    sink.migrate()
    sink.close()
    flusher = Flusher(redis, settings, lambda: sink)
    seen: list[str] = []
    scripts = flusher.claims
    real_ahead, real_ordered = scripts.read_ahead, flusher_module.ordered_rows
    real_fenced, real_open = flusher_module.write_fenced, chdb_module._Handle.open

    def read_ahead(shard: ShardKeys, made: Claim, count: int) -> QueueRows:
        seen.append("ahead")
        return real_ahead(shard, made, count)

    def ordered_rows(*args: Any) -> Any:
        time.sleep(0.2)
        return real_ordered(*args)

    def write_fenced(*args: Any, **kwargs: Any) -> Any:
        seen.append("insert")
        return real_fenced(*args, **kwargs)

    def open_session(handle: Any, readonly: bool = False) -> Any:
        if handle.session is None:
            seen.append(f"open on {threading.current_thread().name}")
        return real_open(handle, readonly)

    scripts.read_ahead = read_ahead  # type: ignore[method-assign]
    monkeypatch.setattr(flusher_module, "ordered_rows", ordered_rows)
    monkeypatch.setattr(flusher_module, "write_fenced", write_fenced)
    monkeypatch.setattr(chdb_module._Handle, "open", open_session)
    [result] = flusher.process_buffer(max_batches=10).shards
    assert (result.rows, result.batches) == (12, 3)
    [opened] = [what for what in seen if what.startswith("open")]
    assert opened.startswith("open on chdb-chunks"), seen
    assert [what for what in seen if not what.startswith("open")] == [
        "insert", "ahead", "insert", "ahead", "insert", "ahead"
    ]  # fmt: skip
    assert chdb_module._handle_for(path_from_url(chdb_url)).session is None
    landed = sink.query("SELECT toString(id) FROM events")
    assert sorted(i for (i,) in landed) == sorted(e.id for e in sent)


@pytest.mark.parametrize("nul", [False, True], ids=["plain", "with-nul"])
def test_insert_order_is_created_at_then_id_then_bytes_whatever_the_strings_hold(
    nul: bool,
) -> None:
    # `order` sorts by one string per row (created_at NUL id): the order must be the
    # tuple's, which a re-drive by an older flusher also cuts its chunks by, even for a
    # created_at that is a prefix of another, a NUL inside either string, or ties.
    stamps = ["2026-11-07 12:00:00.000", "2026-11-07 12:00:00", "2026", ""]
    ids = ["a", "ab", ""]
    if nul:  # a row no validated producer writes
        stamps += ["2026\0a", "2026\0"]
        ids += ["a\0", "\0", "a\0b"]
    rows: list[bytes] = []
    heads: list[Head] = []
    for n, (stamp, event_id) in enumerate(itertools.product(stamps, ids)):
        for copy in (2, 1):  # the same pair twice: ordered by the rows' bytes
            rows.append(
                msgspec.json.encode({"created_at": stamp, "id": event_id, "n": n, "c": copy})
            )
            heads.append(RowHead(id=event_id, created_at=stamp, project_id=f"p{copy}"))
    rows.append(b"{not json")
    heads.append("not a JSON row")
    shuffled = list(zip(rows, heads, strict=True))
    random.Random(7).shuffle(shuffled)
    ordered = order([r for r, _ in shuffled], [h for _, h in shuffled])
    expected = sorted(
        (h.created_at, h.id, r, h.project_id) for r, h in shuffled if isinstance(h, RowHead)
    )
    assert ordered.rows == [item[2] for item in expected]
    assert ordered.projects == [item[3] for item in expected]
    assert ordered.invalid == [(b"{not json", "not a JSON row")]
