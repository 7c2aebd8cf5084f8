"""Poison rows with real embedded ClickHouse (chDB): isolation by halving, and the guard.

A poison row is one ClickHouse refuses although it is valid JSON: here a
stored row with a 3-letter `country`, which `FixedString(2)` cannot hold (no
validated producer writes one, so the tests push raw rows into the queue).
A few such rows are halved out and dead-lettered, the rest lands once, also
across a killed or failed flush in the middle of the halving. When most of a
claim is refused, the poison guard stops the flush instead, and the re-drive
after the table is fixed lands every row once.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis as redis_lib

from tests.support.dates import NOON_MS
from tests.support.flushing import flush_error
from tests.support.sinks import RecordingSink
from worker.deadletters import REASON_REJECTED, decode_dead_letter
from worker.events import encode_event, parse_event
from worker.flusher import POISON_GUARD_MIN_ROWS, SPLIT_FIELD, Flusher, PoisonGuardError
from worker.keys import ShardKeys
from worker.settings import Settings, SettingsError
from worker.sinks.base import PermanentSinkError, RetryableSinkError, Sink
from worker.sinks.chdb import ChdbSink

KEYS = ShardKeys("eventbuffer", 0)
RUNNER = Path(__file__).resolve().parent / "support" / "crash_flusher.py"
BASE_MS = NOON_MS
# The fix the guard tests apply: a column that takes any country string.
ACCEPT_ANY_COUNTRY = "ALTER TABLE events MODIFY COLUMN country LowCardinality(String)"


def good_row(n: int) -> bytes:
    """A normalized row as ingest stores it, n ms after BASE_MS (sorts by n)."""
    return encode_event(parse_event({"project_id": "p1", "name": "ok", "created_at": BASE_MS + n}))


def poison_row(n: int) -> bytes:
    """A row ClickHouse refuses (country too long for FixedString(2)), sorted at n."""
    event = parse_event({"project_id": "p1", "name": "bad", "created_at": BASE_MS + n})
    row = json.loads(encode_event(event))
    row["country"] = "SWE"
    return json.dumps(row, separators=(",", ":")).encode()


def queue_rows(redis: redis_lib.Redis, total: int, poison_at: Sequence[int]) -> list[bytes]:
    """`total` rows in the queue, poison at the given positions (in created_at order).

    The queue gets them shuffled (by a fixed permutation): the flush sorts a
    claim before cutting it into chunks, so the positions above are where
    the poison sits in the chunks.
    """
    rows = [poison_row(n) if n in poison_at else good_row(n) for n in range(total)]
    shuffled = [rows[(n * 7919) % total] for n in range(total)]  # 7919 is prime: a permutation
    assert len(set(shuffled)) == total
    redis.rpush(KEYS.queue, *shuffled)
    return [rows[n] for n in poison_at]


def settings_with(settings: Settings, **env: str) -> Settings:
    return Settings.from_env(
        {"REDIS_URL": settings.redis_url, "CLICKHOUSE_URL": settings.clickhouse_url, **env}
    )


def flusher_for(redis: redis_lib.Redis, settings: Settings, sink: Sink) -> Flusher:
    return Flusher(redis, settings, lambda: sink)


def landed(sink: Sink) -> tuple[int, int]:
    """(rows, distinct ids) in ClickHouse."""
    [(rows, distinct)] = sink.query("SELECT count(), uniqExact(id) FROM events")
    return int(rows), int(distinct)


def dead_letters(redis: redis_lib.Redis) -> list[tuple[str, str, bytes]]:
    """(reason, error, payload) of every dead letter of shard 0."""
    letters = [decode_dead_letter(entry) for entry in redis.lrange(KEYS.dead, 0, -1)]
    return [(header.reason, header.error, payload) for header, payload in letters]


def splits(redis: redis_lib.Redis) -> set[str]:
    fields = (f.decode() for f in redis.hkeys(KEYS.claim))
    return {f[len(SPLIT_FIELD) :] for f in fields if f.startswith(SPLIT_FIELD)}


# -- isolation ----------------------------------------------------------------------


def test_three_scattered_poison_rows_out_of_1000_are_dead_lettered_alone(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    poison = queue_rows(redis, 1000, (17, 500, 988))
    recording = RecordingSink(sink)
    [result] = flusher_for(redis, settings, recording).process_buffer().shards

    assert (result.rows, result.dead, result.batches) == (997, 3, 1)
    assert landed(sink) == (997, 997)
    assert sink.query("SELECT count() FROM events WHERE name = 'bad'") == [(0,)]
    letters = dead_letters(redis)
    assert sorted(payload for _, _, payload in letters) == sorted(poison)
    for reason, error, _ in letters:
        assert reason == REASON_REJECTED
        # ClickHouse's own words, so an operator can see what it refused.
        assert "Too large value for FixedString(2)" in error and "Code: 131" in error
    # Halving finds 3 rows among 1000 in a few dozen INSERTs, not 1000.
    assert len(recording.tokens) < 80
    assert redis.llen(KEYS.queue) == 0 and not redis.exists(KEYS.claim)


@pytest.mark.slow
def test_a_flusher_killed_mid_bisection_is_re_driven_without_duplicates(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    poison = queue_rows(redis, 1000, (17, 500, 988))
    sink.close()  # the child process must be able to open the chDB directory
    child = subprocess.run(
        [
            sys.executable,
            str(RUNNER),
            settings.redis_url,
            settings.clickhouse_url,
            "4",  # SIGKILL right after the 4th successful INSERT: deep in the halving
            "1000",
            "1000",
            "--lock-ttl",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    written = [json.loads(line)["write"] for line in child.stdout.splitlines()]
    claim = redis.hget(KEYS.claim, "id")
    assert claim is not None
    claim_id = claim.decode()
    assert len(written) == 4 and all(t.startswith(f"{claim_id}:0.") for t in written)
    assert f"{claim_id}:0" in splits(redis), "the halving is recorded before the halves"
    partial, distinct = landed(sink)
    assert 0 < partial == distinct < 997
    assert redis.llen(KEYS.dead) == 0, "nothing is dead-lettered before the ack"

    deadline = time.monotonic() + 5
    while redis.exists(KEYS.lock):  # the dead child's lock expires (1 s TTL)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    recording = RecordingSink(sink)
    [result] = flusher_for(redis, settings, recording).process_buffer().shards

    assert (result.redriven, result.rows, result.dead) == (1, 997, 3)
    assert result.claims == [claim_id]
    # The re-drive goes straight to the recorded halves: the same tokens the
    # child wrote come again (and ClickHouse drops them), the whole chunk never.
    assert f"{claim_id}:0" not in recording.tokens
    assert set(written) <= set(recording.tokens)
    assert landed(sink) == (997, 997)
    assert sorted(payload for _, _, payload in dead_letters(redis)) == sorted(poison)
    assert not redis.exists(KEYS.claim)


def test_a_retryable_failure_mid_bisection_is_re_driven_without_duplicates(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    config = settings_with(settings, EVENT_BUFFER_CHUNK_SIZE="250")
    poison = queue_rows(redis, 1000, (17, 500, 988))
    failing = RecordingSink(sink, fail_after=5)
    flush_error(flusher_for(redis, config, failing), RetryableSinkError)
    assert redis.llen(KEYS.dead) == 0 and redis.llen(KEYS.queue) == 1000
    partial, _ = landed(sink)
    assert 0 < partial < 997

    redis.delete(KEYS.backoff)  # as if the back-off delay had passed
    [result] = flusher_for(redis, config, RecordingSink(sink)).process_buffer().shards
    assert (result.redriven, result.rows, result.dead) == (1, 997, 3)
    assert landed(sink) == (997, 997)
    assert sorted(payload for _, _, payload in dead_letters(redis)) == sorted(poison)


def test_a_table_fixed_between_a_failed_bisection_and_its_re_drive_gets_no_duplicates(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    """The case same-token halving alone does not cover: the whole chunk would now pass.

    Had the re-drive retried chunk 0 whole (token `<claim>:0`, which
    ClickHouse never stored because it was refused), every row the halves
    had already written would land twice. Recorded halvings prevent it.
    """
    queue_rows(redis, 1000, (17, 500, 988))
    failing = RecordingSink(sink, fail_after=6)
    flush_error(flusher_for(redis, settings, failing), RetryableSinkError)
    partial, _ = landed(sink)
    assert partial > 0

    sink.query(ACCEPT_ANY_COUNTRY)
    redis.delete(KEYS.backoff)
    recording = RecordingSink(sink)
    [result] = flusher_for(redis, settings, recording).process_buffer().shards
    assert (result.redriven, result.rows, result.dead) == (1, 1000, 0)
    assert landed(sink) == (1000, 1000)
    assert sink.query("SELECT count() FROM events WHERE country = 'SWE'") == [(3,)]


# -- the poison guard ---------------------------------------------------------------


def test_the_guard_stops_a_flush_where_every_row_is_rejected(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink, caplog: pytest.LogCaptureFixture
) -> None:
    queue_rows(redis, 60, range(60))
    queued = redis.lrange(KEYS.queue, 0, -1)
    with caplog.at_level(logging.ERROR, logger="worker.flusher"):
        error = flush_error(flusher_for(redis, settings, sink), PoisonGuardError)

    assert isinstance(error, PermanentSinkError)
    # It stops as soon as more than half the claim is certainly refused.
    assert (error.rejected, error.rows) == (31, 60)
    message = str(error)
    assert message.startswith("31 of 60 rows rejected by ClickHouse on shard 0")
    assert "EVENT_BUFFER_DLQ_MAX_RATIO=0.5" in message and "schema mismatch?" in message
    assert "First error: Code: 131" in message and "FixedString(2)" in message
    assert error.code == 131
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "schema mismatch?" in caplog.records[0].getMessage()
    # Nothing acknowledged, nothing dead-lettered, nothing written.
    assert redis.lrange(KEYS.queue, 0, -1) == queued
    assert redis.hget(KEYS.claim, "count") == b"60"
    assert redis.llen(KEYS.dead) == 0
    assert landed(sink) == (0, 0)
    assert redis.pttl(KEYS.backoff) > 0, "the guard backs off like a ClickHouse failure"
    assert not redis.exists(KEYS.lock)

    # Still broken: the re-drive trips the guard again, still without dead letters.
    with pytest.raises(PoisonGuardError):
        flusher_for(redis, settings, sink).flush_shard(0, respect_backoff=False)
    assert redis.llen(KEYS.dead) == 0

    # The cause is fixed (the column takes the value): the re-drive lands everything.
    sink.query(ACCEPT_ANY_COUNTRY)
    result = flusher_for(redis, settings, sink).flush_shard(0, respect_backoff=False)
    assert (result.redriven, result.rows, result.dead) == (1, 60, 0)
    assert landed(sink) == (60, 60)
    assert redis.llen(KEYS.queue) == 0 and not redis.exists(KEYS.claim)
    assert not redis.exists(KEYS.backoff)


def test_rows_inserted_before_the_guard_tripped_do_not_land_twice(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    config = settings_with(settings, EVENT_BUFFER_CHUNK_SIZE="16")
    # 70 of 100 refused, every 10th good row among them: good halves land first.
    queue_rows(redis, 100, [n for n in range(100) if n % 10 >= 3])
    flush_error(flusher_for(redis, config, sink), PoisonGuardError)
    partial, _ = landed(sink)
    assert partial > 0, "some good rows were inserted before the guard tripped"
    assert redis.llen(KEYS.dead) == 0 and redis.llen(KEYS.queue) == 100

    sink.query(ACCEPT_ANY_COUNTRY)
    result = flusher_for(redis, config, sink).flush_shard(0, respect_backoff=False)
    assert (result.rows, result.dead) == (100, 0)
    assert landed(sink) == (100, 100)


def test_the_guard_reports_through_the_flush_task(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    from tasks.flush import process_buffer
    from worker import runtime

    queue_rows(redis, 20, range(20))
    sink.close()
    runtime.configure(settings)
    try:
        summary = process_buffer()
    finally:
        runtime.reset()
    assert summary["errors"] == 1 and summary["rows"] == 0
    [shard] = summary["shards"]
    assert "of 20 rows rejected by ClickHouse" in shard["error"]
    assert redis.llen(KEYS.queue) == 20 and redis.llen(KEYS.dead) == 0


@pytest.mark.parametrize(
    ("total", "env", "reason"),
    [
        (POISON_GUARD_MIN_ROWS - 1, {}, "below the minimum, whatever the share"),
        (40, {"EVENT_BUFFER_DLQ_MAX_RATIO": "1"}, "a ratio of 1 turns the guard off"),
    ],
)
def test_the_guard_leaves_these_to_the_dead_letters(
    redis: redis_lib.Redis,
    settings: Settings,
    sink: ChdbSink,
    total: int,
    env: dict[str, str],
    reason: str,
) -> None:
    queue_rows(redis, total, range(total))
    [result] = flusher_for(redis, settings_with(settings, **env), sink).process_buffer().shards
    assert (result.rows, result.dead) == (0, total), reason
    assert redis.llen(KEYS.dead) == total
    assert redis.llen(KEYS.queue) == 0


def test_a_lower_ratio_trips_on_fewer_rows(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    config = settings_with(settings, EVENT_BUFFER_DLQ_MAX_RATIO="0.1")
    queue_rows(redis, 200, range(0, 200, 8))  # 25 of 200: 12.5 %
    error = flush_error(flusher_for(redis, config, sink), PoisonGuardError)
    assert (error.rejected, error.rows) == (21, 200)


@pytest.mark.parametrize(("raw", "expected"), [("0.25", 0.25), (" 1 ", 1.0), ("0", 0.0), ("", 0.5)])
def test_the_ratio_setting(raw: str, expected: float) -> None:
    assert Settings.from_env({"EVENT_BUFFER_DLQ_MAX_RATIO": raw}).dlq_max_ratio == expected


@pytest.mark.parametrize("raw", ["1.5", "-0.1", "half", "nan"])
def test_a_malformed_ratio_names_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError, match="EVENT_BUFFER_DLQ_MAX_RATIO must be"):
        Settings.from_env({"EVENT_BUFFER_DLQ_MAX_RATIO": raw})


def test_a_new_claim_ignores_split_marks_left_by_another_claim(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    # A flusher that lost its lock may mark a split after the claim was acked.
    redis.hset(KEYS.claim, f"{SPLIT_FIELD}{uuid.uuid4()}:0", 1)
    queue_rows(redis, 30, (3,))
    [result] = flusher_for(redis, settings, sink).process_buffer().shards
    assert (result.rows, result.dead, result.redriven) == (29, 1, 0)
    assert not redis.exists(KEYS.claim)
