"""A flush that makes no progress gives its lock up; one that progresses keeps it.

The lock's watchdog is a thread: it would extend the lock of a flush whose
main thread hangs in an INSERT forever. The flusher reports progress (a chunk
inserted, a batch acknowledged) and the watchdog stops extending once the last
report is older than `EVENT_BUFFER_FLUSH_STALL_S`. Time is a `ManualClock`
here: the watchdog's judgement is tested by calling its step directly
(`keep_alive_once`), and inside a real flush by a sink that moves the clock as
a slow INSERT would. Redis and ClickHouse (chDB) are real; the frozen-server
case, with real processes, is tests/test_hung_clickhouse.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import pytest
import redis as redis_lib

from tests.support.clock import ManualClock
from tests.support.exactly_once import assert_exactly_once, open_claim
from tests.support.polling import wait_until
from tests.support.sinks import DelegatingSink
from tests.test_lock_expiry import flush_all, send
from worker import metrics
from worker.errors import LockLostError
from worker.flusher import Flusher
from worker.keys import ShardKeys
from worker.lock import FlushLock, read_lock
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink

SHARD = ShardKeys("eventbuffer", 0)
STALLED = "made no progress"


def stall_settings(settings: Settings, lock_ttl_s: int) -> Settings:
    """A stall bound of 3 s (over the 1 s + 1 s connect and insert timeouts), 3 chunks."""
    return Settings.from_env(
        {
            "REDIS_URL": settings.redis_url,
            "CLICKHOUSE_URL": settings.clickhouse_url,
            "EVENT_BUFFER_BATCH_SIZE": "9",
            "EVENT_BUFFER_CHUNK_SIZE": "3",
            "EVENT_BUFFER_LOCK_TTL_S": str(lock_ttl_s),
            "EVENT_BUFFER_CLICKHOUSE_CONNECT_TIMEOUT_S": "1",
            "EVENT_BUFFER_CLICKHOUSE_INSERT_TIMEOUT_S": "1",
            "EVENT_BUFFER_FLUSH_STALL_S": "3",
        }
    )


def stalls_counted() -> float:
    """This process's eventbuffer_flush_stalls_total."""
    counted = metrics.metrics().registry.get_sample_value("eventbuffer_flush_stalls_total")
    return counted or 0.0


def stall_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if STALLED in r.getMessage()]


def test_watchdog_extends_while_progress_is_recent_then_gives_the_lock_up(
    redis: redis_lib.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.lock")
    clock = ManualClock()
    # A 60 s TTL: the watchdog thread's first step is 20 s away; the test takes the steps.
    lock = FlushLock(redis, SHARD.lock, 60, stall_s=10, clock=clock, what="shard 0")
    assert lock.acquire()
    try:
        redis.pexpire(SHARD.lock, 5_000)
        clock.advance(9_000)  # 9 s since the lock was taken: within the bound
        assert lock.keep_alive_once()
        assert redis.pttl(SHARD.lock) > 55_000

        lock.progress()  # a chunk inserted
        clock.advance(9_000)  # 18 s since the lock was taken, 9 s since progress
        assert lock.keep_alive_once()
        lock.check()

        redis.pexpire(SHARD.lock, 5_000)
        clock.advance(1_001)  # 10.001 s since progress
        assert not lock.keep_alive_once()
        assert redis.pttl(SHARD.lock) <= 5_000  # not extended: it will go stale
        assert lock.lost and lock.stalled
        with pytest.raises(LockLostError, match="no progress for over 10 s"):
            lock.check()
        [warning] = stall_warnings(caplog)
        assert "shard 0 made no progress for 10 s" in warning.getMessage()
        assert SHARD.lock in warning.getMessage()
        assert redis.get(SHARD.lock) == lock.token  # given up, not released
    finally:
        lock.release()
    assert not redis.exists(SHARD.lock)  # still its own when released: deleted


def test_without_a_stall_bound_the_watchdog_extends_forever(redis: redis_lib.Redis) -> None:
    """What every lock did before the bound (and `stall_s=None` still does)."""
    clock = ManualClock()
    lock = FlushLock(redis, SHARD.lock, 60, clock=clock)
    assert lock.acquire()
    try:
        clock.advance(10 * 3_600_000)
        assert lock.keep_alive_once()
        lock.check()
    finally:
        lock.release()


class Steps:
    """The steps the lock's watchdog thread took, to wait for one."""

    def __init__(self) -> None:
        self.taken = 0
        self.stopped = False
        self.changed = threading.Condition()

    def record(self, extended: bool) -> None:
        with self.changed:
            self.taken += 1
            self.stopped = self.stopped or not extended
            self.changed.notify_all()

    def wait_for_next(self) -> None:
        """Until a step that began after this call has ended, or the watchdog stopped."""
        with self.changed:
            # The step after the next began after the next ended: after this call.
            target = self.taken + 2
            ok = self.changed.wait_for(lambda: self.taken >= target or self.stopped, 30)
            assert ok, "the lock's watchdog took no step"


class ClockedSink(DelegatingSink):
    """A real ChdbSink whose INSERTs take `took_ms` of the manual clock each, and wait
    (really) for the lock's watchdog to take a step, so that it judges the flush while
    the INSERT is in progress."""

    def __init__(self, inner: ChdbSink, clock: ManualClock, took_ms: int, steps: Steps) -> None:
        super().__init__(inner)
        self.clock = clock
        self.took_ms = took_ms
        self.steps = steps
        self.writes: list[str] = []

    def write(self, rows: Sequence[bytes], token: str) -> None:
        self.clock.advance(self.took_ms)
        self.steps.wait_for_next()
        self.inner.write(rows, token)
        self.writes.append(token)


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> Steps:
    """Counts the steps every lock's watchdog thread takes."""
    steps = Steps()
    step = FlushLock.keep_alive_once

    def observed(self: FlushLock) -> bool:
        extended = False
        try:
            extended = step(self)
            return extended
        finally:
            steps.record(extended)

    monkeypatch.setattr(FlushLock, "keep_alive_once", observed)
    return steps


def test_a_flush_that_progresses_keeps_its_lock_past_the_bound(
    redis: redis_lib.Redis,
    settings: Settings,
    sink: ChdbSink,
    caplog: pytest.LogCaptureFixture,
    watched: Steps,
) -> None:
    """Three INSERTs of 2 s each (6 s, twice the 3 s bound): each is progress, the
    watchdog extends the lock throughout, and the batch is acknowledged."""
    caplog.set_level(logging.WARNING, logger="worker.lock")
    config = stall_settings(settings, lock_ttl_s=1)
    sent = send(redis, config, 9)
    clock = ManualClock()
    clocked = ClockedSink(ChdbSink(sink.path, sink.table), clock, 2_000, watched)
    result = Flusher(redis, config, lambda: clocked, clock).flush_shard(0)
    assert result.error is None and result.batches == 1
    assert len(clocked.writes) == 3
    assert stall_warnings(caplog) == []
    assert_exactly_once(redis, config, sink, sent)


def test_a_flush_stuck_in_an_insert_gives_its_lock_up_and_is_fenced(
    redis: redis_lib.Redis,
    settings: Settings,
    sink: ChdbSink,
    caplog: pytest.LogCaptureFixture,
    watched: Steps,
) -> None:
    """The first INSERT takes 3.5 s of the clock: the watchdog stops extending while it
    runs (one WARNING naming the shard), the lock's heartbeat goes stale, and the stuck
    flusher stops at its next check without acknowledging. Another flusher takes the
    shard over and re-drives the claim: every event once."""
    caplog.set_level(logging.WARNING, logger="worker.lock")
    config = stall_settings(settings, lock_ttl_s=1)
    sent = send(redis, config, 9)
    clock = ManualClock()
    clocked = ClockedSink(ChdbSink(sink.path, sink.table), clock, 3_500, watched)
    stalls = stalls_counted()
    result = Flusher(redis, config, lambda: clocked, clock).process_buffer().shards[0]
    assert stalls_counted() == stalls + 1
    assert isinstance(result.error, LockLostError), result
    assert "no progress" in str(result.error)
    assert clocked.writes == [f"{open_claim(redis, config)}:0"]  # stopped after it
    [warning] = stall_warnings(caplog)
    assert "flush of shard 0 made no progress for" in warning.getMessage()

    results = flush_all(redis, config, sink)
    assert results[0].redriven == 1
    assert_exactly_once(redis, config, sink, sent)


def test_a_stalled_holder_goes_stale_and_is_taken_over(
    redis: redis_lib.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The watchdog's real thread, a 1 s TTL and a bound already passed: the lock is
    no longer extended and the next flusher takes it over on its stale heartbeat."""
    caplog.set_level(logging.WARNING, logger="worker.lock")
    clock = ManualClock()
    stuck = FlushLock(redis, SHARD.lock, 1, stall_s=3, clock=clock, what="shard 0")
    assert stuck.acquire()
    clock.advance(3_001)
    try:
        wait_until(lambda: stuck.stalled, 10, "the watchdog to give the lock up")
        wait_until(
            lambda: (state := read_lock(redis, SHARD.lock)) is None or state.stale,
            10,
            "the lock's heartbeat to go stale",
        )
        other = FlushLock(redis, SHARD.lock, 15)
        assert other.acquire()
        other.release()
    finally:
        stuck.release()
    assert len(stall_warnings(caplog)) == 1
