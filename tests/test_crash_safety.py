"""Crash safety with real processes really SIGKILLed in the middle of a flush.

`tests/support/crash_flusher.py` runs the production Flusher in a child process whose
sink (a real ChdbSink) sends the process SIGKILL right after its K-th
successful INSERT: rows are in ClickHouse, the claim is not acknowledged.
The parent then flushes normally and checks that the open claim was
re-driven with the same dedup tokens, so ClickHouse ends up with every event
exactly once and Redis with no open claim.

The parent never holds the chDB directory while a child runs (embedded chDB
is one process at a time); a SIGKILLed child's file lock dies with it. Its
flush lock does not: children run with a 1 s lock TTL, and the next flush
waits for the dead child's lock to expire (a flush on the same host takes a
dead holder's lock over at once: tests/test_lock_takeover.py).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from tests.support.dates import DAY_MS, MONTH_START_MS
from tests.support.exactly_once import assert_exactly_once, open_claim, stored
from worker.buffer import EventBuffer
from worker.events import decode_row, parse_event
from worker.flusher import Flusher
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).resolve().parent / "support" / "crash_flusher.py"
# created_at across the start of this month (never beyond the accepted future):
# sorted claims put the month boundary inside a chunk, so some INSERTs (and
# their re-drives) span two partitions.
START_MS = MONTH_START_MS - 20 * DAY_MS
SPREAD_MS = 20 * DAY_MS + max(3_600_000, min(int(time.time() * 1000) - MONTH_START_MS, DAY_MS))


@dataclass
class Run:
    returncode: int
    writes: list[str] = field(default_factory=list)
    flushes: list[dict[str, Any]] = field(default_factory=list)
    lock_lost: str | None = None
    stderr: str = ""


def parse_run(returncode: int, stdout: str, stderr: str) -> Run:
    run = Run(returncode, stderr=stderr)
    for line in stdout.splitlines():
        item = json.loads(line)
        if "write" in item:
            run.writes.append(item["write"])
        elif "flush" in item:
            run.flushes.append(item["flush"])
        elif "lock_lost" in item:
            run.lock_lost = item["lock_lost"]
    return run


def runner_args(
    redis_url: str, chdb_url: str, kill_after: int, batch: int, chunk: int, *extra: str
) -> list[str]:
    return [
        sys.executable,
        str(RUNNER),
        redis_url,
        chdb_url,
        str(kill_after),
        str(batch),
        str(chunk),
        *extra,
    ]


def run_flusher(
    redis_url: str, chdb_url: str, kill_after: int, batch: int, chunk: int, *extra: str
) -> Run:
    """Run the flusher child to its end (or death). Its lock TTL is 1 s: a killed
    flusher's lock outlives it until the TTL runs out, as in production."""
    done = subprocess.run(
        runner_args(redis_url, chdb_url, kill_after, batch, chunk, "--lock-ttl", "1", *extra),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return parse_run(done.returncode, done.stdout, done.stderr)


def make_events(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Regular events with distinct ids, created_at spread over three months."""
    return [
        {
            "id": str(uuid.UUID(int=(seed << 32) + n + 1)),
            "name": "click",
            "project_id": "proj",
            "profile_id": f"u{n % 7}",
            "created_at": START_MS + (n * 7_919_000_003) % SPREAD_MS,
            "properties": {"n": n},
        }
        for n in range(count)
    ]


def send(redis: redis_lib.Redis, settings: Settings, events: list[dict[str, Any]]) -> set[str]:
    buffer = EventBuffer(redis, settings)
    parsed = [parse_event(raw) for raw in events]
    for start in range(0, len(parsed), 25):
        buffer.apply(parsed[start : start + 25])
    return {event.id for event in parsed}


def crash_settings(settings: Settings, batch: int, chunk: int) -> Settings:
    return Settings.from_env(
        {
            "REDIS_URL": settings.redis_url,
            "CLICKHOUSE_URL": settings.clickhouse_url,
            "EVENT_BUFFER_BATCH_SIZE": str(batch),
            "EVENT_BUFFER_CHUNK_SIZE": str(chunk),
        }
    )


def queued_ids(redis: redis_lib.Redis, settings: Settings) -> set[str]:
    buffer = EventBuffer(redis, settings)
    return {
        decode_row(raw).id for shard in buffer.shards() for raw in redis.lrange(shard.queue, 0, -1)
    }


def wait_for_lock_expiry(redis: redis_lib.Redis, settings: Settings, seconds: float = 5) -> None:
    """A SIGKILLed flusher's lock is not released: it expires after its TTL."""
    lock = EventBuffer(redis, settings).keyspace.shard(0).lock
    deadline = time.monotonic() + seconds
    while redis.exists(lock):
        assert time.monotonic() < deadline, "the dead flusher's lock did not expire"
        time.sleep(0.02)


def flush_until_empty(redis: redis_lib.Redis, settings: Settings, sink: ChdbSink) -> list[Any]:
    """A normal in-process flush; the sink factory hands out fresh sinks on its path."""
    wait_for_lock_expiry(redis, settings)
    buffer = EventBuffer(redis, settings)
    flusher = Flusher(redis, settings, lambda: ChdbSink(sink.path, sink.table))
    results = []
    for _ in range(1000):
        if buffer.get_buffer_size() == 0:
            break
        results += flusher.process_buffer().shards
    assert buffer.get_buffer_size() == 0
    assert all(result.locked for result in results)
    return results


@pytest.fixture
def chdb_dir(sink: ChdbSink, settings: Settings) -> Iterator[str]:
    """The migrated table's URL, with the directory closed in this process."""
    sink.close()
    yield settings.clickhouse_url


def test_kill_after_last_chunk_before_ack(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink, chdb_dir: str
) -> None:
    """(a) Every chunk of the claim is in ClickHouse, the ack never ran."""
    config = crash_settings(settings, 9, 3)
    sent = send(redis, config, make_events(9))

    child = run_flusher(settings.redis_url, chdb_dir, 3, 9, 3)

    assert child.returncode == -signal.SIGKILL, child.stderr
    claim = open_claim(redis, config)
    assert claim is not None
    assert child.writes == [f"{claim}:0", f"{claim}:1", f"{claim}:2"]
    assert child.flushes == []  # it never got to report a finished flush
    rows, distinct, ids = stored(sink)
    assert (rows, distinct, ids) == (9, 9, sent)  # all in, but still claimed in Redis
    assert queued_ids(redis, config) == sent

    results = flush_until_empty(redis, config, sink)

    assert results[0].redriven == 1
    assert results[0].claims == [claim]
    assert results[0].rows == 9  # sent again, dropped by ClickHouse as duplicates
    assert_exactly_once(redis, config, sink, sent)
    stats = EventBuffer(redis, config).keyspace.shard(0).stats
    assert redis.hget(stats, "claim") == claim.encode()


def test_kill_between_chunks(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink, chdb_dir: str
) -> None:
    """(b) Killed after the first of three chunks; the recovery runs in another process."""
    config = crash_settings(settings, 9, 3)
    sent = send(redis, config, make_events(9))

    child = run_flusher(settings.redis_url, chdb_dir, 1, 9, 3)

    assert child.returncode == -signal.SIGKILL, child.stderr
    claim = open_claim(redis, config)
    assert child.writes == [f"{claim}:0"]
    rows, distinct, ids = stored(sink)
    assert rows == distinct == 3
    assert ids | queued_ids(redis, config) == sent

    wait_for_lock_expiry(redis, config)
    recovery = run_flusher(settings.redis_url, chdb_dir, 0, 9, 3)

    assert recovery.returncode == 0, recovery.stderr
    assert f"re-driving unacknowledged claim {claim}" in recovery.stderr
    # The same claim, split into the same chunks under the same tokens.
    assert recovery.writes == [f"{claim}:0", f"{claim}:1", f"{claim}:2"]
    assert recovery.flushes[0]["redriven"] == 1
    assert recovery.flushes[0]["claims"] == [claim]
    assert_exactly_once(redis, config, sink, sent)


def test_repeated_kills(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink, chdb_dir: str
) -> None:
    """(c) Ten flushers killed in a row at varying points over 150 events.

    Claims of 20 rows go out in chunks of 6, 6, 6, 2: K=4 kills right after
    a claim's last chunk, before its ack; other Ks kill between chunks, and
    K=1 kills a flusher that had only re-driven the first chunk of the open
    claim. Between kills: no duplicate in ClickHouse, and every event is in
    ClickHouse or still in the queue.
    """
    config = crash_settings(settings, 20, 6)
    sent = send(redis, config, make_events(150, seed=3))
    kills = [1, 4, 3, 7, 1, 5, 8, 2, 4, 6]
    redrives = 0

    for number, kill_after in enumerate(kills):
        wait_for_lock_expiry(redis, config)
        before = open_claim(redis, config)
        child = run_flusher(settings.redis_url, chdb_dir, kill_after, 20, 6)

        assert child.returncode == -signal.SIGKILL, (number, child.stderr)
        assert len(child.writes) == kill_after
        if before is not None:
            # It started by re-driving the claim its predecessor left open.
            assert f"re-driving unacknowledged claim {before}" in child.stderr
            assert child.writes[0] == f"{before}:0"
            redrives += 1
        after = open_claim(redis, config)
        assert after is not None
        assert child.writes[-1].startswith(f"{after}:")
        rows, distinct, ids = stored(sink)
        assert rows == distinct, f"kill {number}: {rows - distinct} duplicates"
        assert ids | queued_ids(redis, config) == sent, f"kill {number}: events lost"

    assert redrives == len(kills) - 1
    results = flush_until_empty(redis, config, sink)
    assert results[0].redriven == 1
    assert sum(result.redriven for result in results) == 1
    assert_exactly_once(redis, config, sink, sent)
