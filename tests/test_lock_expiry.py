"""A flush lock that expires while its flusher is still at work.

Two simulations:

1. A real process frozen past its lock TTL (`test_frozen_flusher_*`). The
   child flusher (tests/support/crash_flusher.py, lock TTL 1 s) sends itself SIGSTOP
   right after a chunk INSERT: the whole process stops, its lock watchdog
   too, exactly like a long GC pause, a VM steal or a debugger. Redis lets the
   lock expire on its own TTL. A second flusher (this process) takes the lock,
   re-drives the open claim and acknowledges it. Then the frozen child gets
   SIGCONT and carries on from where it stopped, with a stale claim and a
   lost lock. This proves, without relying on the watchdog noticing in
   time, that the stale flusher can neither duplicate rows (its remaining
   INSERTs carry the tokens ClickHouse already saw) nor lose or trim anyone
   else's rows (ack.lua refuses another holder's lock and a claim id that is
   no longer open). The one artifact: embedded chDB can be open in one
   process at a time, so the child closes the directory after each INSERT
   (`--release-between-writes`); with a ClickHouse server it would not have
   to. Nothing in Redis depends on it.

2. One process, two flushers in two threads (`test_watchdog_*`). The first
   blocks inside its sink after a chunk; its lock key is deleted (the state
   Redis is in when a TTL runs out before the watchdog could extend it) and
   the second flusher re-drives and acknowledges. This proves the in-process
   defence: the watchdog's failed extension marks the lock lost, and the
   first flusher stops at the next chunk boundary with LockLostError instead
   of writing on.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from tests.support.dates import BASE_MS
from tests.support.exactly_once import assert_exactly_once, open_claim
from tests.support.polling import wait_until
from tests.support.sinks import DelegatingSink
from worker.buffer import EventBuffer
from worker.claims import Claims
from worker.events import parse_event
from worker.flusher import Flusher, FlushResult
from worker.lock import FlushLock, LockLostError
from worker.settings import Settings
from worker.sinks import open_sink
from worker.sinks.chdb import ChdbSink

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).resolve().parent / "support" / "crash_flusher.py"
EXIT_LOCK_LOST = 3


def make_settings(settings: Settings, lock_ttl_s: int = 60) -> Settings:
    return Settings.from_env(
        {
            "REDIS_URL": settings.redis_url,
            "CLICKHOUSE_URL": settings.clickhouse_url,
            "EVENT_BUFFER_BATCH_SIZE": "9",
            "EVENT_BUFFER_CHUNK_SIZE": "3",
            "EVENT_BUFFER_LOCK_TTL_S": str(lock_ttl_s),
        }
    )


def send(redis: redis_lib.Redis, settings: Settings, count: int, first: int = 0) -> set[str]:
    events = [
        parse_event(
            {
                "id": str(uuid.UUID(int=first + n + 1)),
                "name": "click",
                "project_id": "proj",
                "created_at": BASE_MS + (first + n) * 1000,
            }
        )
        for n in range(count)
    ]
    EventBuffer(redis, settings).apply(events)
    return {event.id for event in events}


def flush_all(redis: redis_lib.Redis, settings: Settings, sink: ChdbSink) -> list[FlushResult]:
    flusher = Flusher(redis, settings, lambda: ChdbSink(sink.path, sink.table))
    buffer = EventBuffer(redis, settings)
    results: list[FlushResult] = []
    while buffer.get_buffer_size() > 0:
        assert len(results) < 100
        results += flusher.process_buffer().shards
    assert all(result.locked for result in results)
    return results


def process_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


@pytest.fixture
def frozen_child() -> Iterator[list[subprocess.Popen[str]]]:
    """Children started by a test; never left stopped or running after it."""
    children: list[subprocess.Popen[str]] = []
    yield children
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait()


def start_frozen_flusher(
    settings: Settings, stop_after: int, children: list[subprocess.Popen[str]]
) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [
            sys.executable,
            str(RUNNER),
            settings.redis_url,
            settings.clickhouse_url,
            str(stop_after),
            str(settings.batch_size),
            str(settings.chunk_size),
            "--signal",
            "STOP",
            "--lock-ttl",
            "1",
            "--release-between-writes",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    children.append(child)
    wait_until(lambda: child.poll() is not None or process_state(child.pid) == "T", 60, "SIGSTOP")
    assert child.poll() is None, child.communicate()
    return child


def resume(child: subprocess.Popen[str]) -> tuple[int, list[dict[str, Any]], str]:
    child.send_signal(signal.SIGCONT)
    stdout, stderr = child.communicate(timeout=30)
    return child.returncode, [json.loads(line) for line in stdout.splitlines()], stderr


@pytest.mark.parametrize("stop_after", [1, 3], ids=["between-chunks", "before-ack"])
def test_frozen_flusher_resumes_after_takeover(
    redis: redis_lib.Redis,
    settings: Settings,
    sink: ChdbSink,
    frozen_child: list[subprocess.Popen[str]],
    stop_after: int,
) -> None:
    """Frozen after chunk 1 of 3 (it resumes into two more INSERTs, then its ack),
    or after chunk 3 of 3 (it resumes straight into its ack)."""
    config = make_settings(settings)
    sent = send(redis, config, 9)
    lock_key = EventBuffer(redis, config).keyspace.shard(0).lock

    child = start_frozen_flusher(config, stop_after, frozen_child)
    claim = open_claim(redis, config)
    assert claim is not None
    # The lock expires by its own TTL: the frozen watchdog cannot extend it.
    wait_until(lambda: not redis.exists(lock_key), 5, "the frozen flusher's lock to expire")
    assert process_state(child.pid) == "T"

    results = flush_all(redis, config, sink)
    assert results[0].redriven == 1
    assert results[0].claims == [claim]
    assert_exactly_once(redis, config, sink, sent)

    returncode, lines, stderr = resume(child)

    writes = [line["write"] for line in lines if "write" in line]
    lost = [line["lock_lost"] for line in lines if "lock_lost" in line]
    if returncode == EXIT_LOCK_LOST:
        # Its watchdog woke first and its next lock.check() stopped it.
        assert lost, stderr
    else:
        # Its main thread won the race: it wrote the remaining chunks (dropped as
        # duplicates by ClickHouse) and its ack found the claim already gone.
        assert returncode == 0, stderr
        assert writes == [f"{claim}:0", f"{claim}:1", f"{claim}:2"]
        assert f"claim {claim} was acknowledged by another flusher" in stderr
    assert all(write.startswith(f"{claim}:") for write in writes)
    assert_exactly_once(redis, config, sink, sent)
    stats = EventBuffer(redis, config).keyspace.shard(0).stats
    assert redis.hget(stats, "claim") == claim.encode()


def test_frozen_flusher_resumes_while_new_holder_is_mid_claim(
    redis: redis_lib.Redis,
    settings: Settings,
    sink: ChdbSink,
    frozen_child: list[subprocess.Popen[str]],
) -> None:
    """The stale flusher wakes up while the new lock holder has its own claim
    open: whatever it does, it must not acknowledge (trim) that claim."""
    config = make_settings(settings)
    sent = send(redis, config, 9)
    shard = EventBuffer(redis, config).keyspace.shard(0)

    child = start_frozen_flusher(config, 1, frozen_child)
    stale_claim = open_claim(redis, config)
    wait_until(lambda: not redis.exists(shard.lock), 5, "the frozen flusher's lock to expire")
    results = flush_all(redis, config, sink)
    assert results[0].claims == [stale_claim]
    assert results[0].redriven == 1

    # A new flusher is in the middle of the next claim when the stale one wakes.
    sent |= send(redis, config, 6, first=100)
    lock = FlushLock(redis, shard.lock, config.lock_ttl_s)
    assert lock.acquire()
    try:
        new_claim = Claims(redis).claim(
            shard, str(uuid.uuid4()), config.batch_size, 0, config.chunk_size
        )
        assert new_claim is not None
        assert not new_claim.redriven

        returncode, lines, stderr = resume(child)

        assert returncode == EXIT_LOCK_LOST, stderr
        assert any("lock_lost" in line for line in lines)
        # Nothing of the new holder's was touched.
        assert open_claim(redis, config) == new_claim.id
        assert redis.llen(shard.queue) == 6
        assert redis.hget(shard.stats, "claim") == stale_claim.encode()
        assert lock.token == redis.get(shard.lock)
    finally:
        lock.release()

    # The new holder "dies" with its claim open; the next flush re-drives it.
    results = flush_all(redis, config, sink)
    assert results[0].claims == [new_claim.id]
    assert results[0].redriven == 1
    assert_exactly_once(redis, config, sink, sent)


class GatedSink(DelegatingSink):
    """A real ChdbSink that, after its first INSERT, waits until the test lets it go on."""

    def __init__(self, inner: ChdbSink) -> None:
        super().__init__(inner)
        self.writes: list[str] = []
        self.entered = threading.Event()
        self.proceed = threading.Event()

    def write(self, rows: Sequence[bytes], token: str) -> None:
        self.inner.write(rows, token)
        self.writes.append(token)
        if len(self.writes) == 1:
            self.entered.set()
            assert self.proceed.wait(30)


def test_watchdog_stops_a_flusher_whose_lock_expired(
    redis: redis_lib.Redis,
    settings: Settings,
    sink: ChdbSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_settings(settings, lock_ttl_s=1)
    sent = send(redis, config, 9)
    shard = EventBuffer(redis, config).keyspace.shard(0)
    gated = GatedSink(ChdbSink(sink.path, sink.table))
    first = Flusher(redis, config, lambda: gated)
    outcome: list[BaseException | list[FlushResult]] = []

    def run_first() -> None:
        try:
            outcome.append(first.process_buffer().shards)
        except BaseException as exc:
            outcome.append(exc)

    caplog.set_level(logging.WARNING, logger="worker.lock")
    thread = threading.Thread(target=run_first)
    thread.start()
    try:
        assert gated.entered.wait(30)
        claim = open_claim(redis, config)
        assert gated.writes == [f"{claim}:0"]

        redis.delete(shard.lock)  # its TTL ran out before the watchdog extended it
        results = flush_all(redis, config, sink)
        assert results[0].redriven == 1
        assert results[0].claims == [claim]

        wait_until(
            lambda: any("could not be extended" in r.getMessage() for r in caplog.records),
            5,
            "the first flusher's watchdog to notice",
        )
    finally:
        gated.proceed.set()
        thread.join(30)
    assert not thread.is_alive()

    assert len(outcome) == 1
    [stopped] = outcome[0]  # process_buffer reports the shard's failure, it does not raise
    assert isinstance(stopped, FlushResult) and isinstance(stopped.error, LockLostError)
    assert stopped.batches == 0
    assert gated.writes == [f"{claim}:0"]  # it stopped at the next chunk boundary
    assert_exactly_once(redis, config, sink, sent)


def test_lock_released_when_the_sink_cannot_be_built(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    """Regression: a sink factory that raises (here the real `open_sink` on a
    CLICKHOUSE_URL with a malformed port, which Settings lets through) used to
    leave the lock held and its watchdog extending it for the life of the
    process: every later flush, in any process, reported `locked=False`."""
    config = make_settings(settings, lock_ttl_s=1)
    sent = send(redis, config, 4)
    shard = EventBuffer(redis, config).keyspace.shard(0)
    broken = Flusher(redis, config, lambda: open_sink("clickhouse://ch:notaport/db"))

    with pytest.raises(ValueError, match="notaport"):
        broken.process_buffer()

    assert not redis.exists(shard.lock)
    assert not [t for t in threading.enumerate() if t.name.startswith("lock-watchdog:")]
    time.sleep(0.5)  # past the watchdog's interval: nothing extends or re-takes it
    assert not redis.exists(shard.lock)
    results = flush_all(redis, config, sink)
    assert results[0].locked
    assert_exactly_once(redis, config, sink, sent)
