"""A Redis at maxmemory (noeviction): nothing accepted is lost, and the drain still works.

Real servers throughout: the session's own redis-server (buffer and broker on
it, as the default layout has them), made full with `CONFIG SET maxmemory 1`
(every command that may grow memory is refused, as on a Redis that filled
up), real Celery workers and Beat, embedded ClickHouse.

- Ingest tasks that Redis refuses wait in place, unacknowledged: none is
  lost (Celery's `Task.retry()` would publish into the full broker, fail,
  and acknowledge the original), none spins, and they land once memory is back.
- The flush needs no free memory: lock, release, claim and ack run at
  maxmemory, and Beat's flush ticks reach a full broker.
- A producer sees back-pressure, not loss.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from kombu.exceptions import OperationalError

from tests.support.celery_procs import CeleryProcess, beat, ingest_backlog, project_env, worker
from tests.support.dates import BASE_MS
from tests.support.polling import wait_until
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.errors import BufferFull, ProducerError
from worker.flusher import Flusher
from worker.ingestion import ingest
from worker.keys import ShardKeys
from worker.lock import FlushLock
from worker.producer import EventProducer
from worker.settings import Settings
from worker.sinks import open_sink

pytestmark = pytest.mark.slow

SHARD = ShardKeys("eventbuffer", 0)


def batch(project: str, n: int, size: int = 50, views: bool = True) -> list[dict[str, Any]]:
    """`size` events of one session; every fifth a screen_view (with `views`)."""
    return [
        {
            "id": str(uuid.uuid4()),
            "project_id": project,
            "name": "screen_view" if views and i % 5 == 0 else "click",
            "session_id": f"{project}-s{n}",
            "created_at": BASE_MS + n * 1000 + i,
        }
        for i in range(size)
    ]


@pytest.fixture
def full(redis: redis_lib.Redis) -> Iterator[Callable[[bool], None]]:
    """Makes the session's Redis full (every write that may grow memory refused) or not."""

    def set_full(on: bool) -> None:
        redis.config_set("maxmemory", 1 if on else 0)

    try:
        yield set_full
    finally:
        redis.config_set("maxmemory", 0)


def refused_applies(redis: redis_lib.Redis) -> int:
    """Applies Redis refused so far, from INFO commandstats: each attempt's MULTI has its
    one RPUSH to the shard's queue refused (inside MULTI, Redis refuses every command)."""
    stats = redis.info("commandstats")
    return int(stats.get("cmdstat_rpush", {}).get("rejected_calls", 0))


def queued_ids(redis: redis_lib.Redis) -> list[str]:
    return [json.loads(row)["id"] for row in redis.lrange(SHARD.queue, 0, -1)]


def test_a_full_redis_pauses_ingest_and_loses_no_task(
    redis_url: str, redis: redis_lib.Redis, full: Callable[[bool], None], tmp_path: Path
) -> None:
    app = create_app(Settings.from_env({"REDIS_URL": redis_url}))
    sent = [batch("full", n, views=False) for n in range(20)]
    for events in sent:
        app.send_task("eventbuffer.ingest_events", args=[events], queue="ingest")
    app.close()
    full(True)
    env = project_env(REDIS_URL=redis_url, EVENT_BUFFER_REORDER_WINDOW_MS="0")
    proc = worker(env, tmp_path / "worker.log", "-Q", "ingest", "-P", "solo")
    try:
        proc.wait_for("ingest paused: Redis refuses writes (OutOfMemoryError", 60)
        refused = refused_applies(redis)
        proc.wait_for("ingest paused", 1)
        # It waits instead of spinning: ~4 attempts in 6 s (1 s, 2 s, 4 s backoff).
        time.sleep(6)
        assert proc.alive()
        attempts = refused_applies(redis) - refused
        assert 1 <= attempts <= 8, attempts
        assert redis.llen(SHARD.queue) == 0
        # Every task is still in the broker: in its queue or in the worker's keeping.
        assert ingest_backlog(redis) == len(sent)
        full(False)
        wait_until(lambda: redis.llen(SHARD.queue) == 20 * 50, 60, "the batches", alive=proc.alive)
        proc.wait_for("ingest resumed: Redis takes writes again", 10)
    finally:
        full(False)
        proc.stop()
    ids = queued_ids(redis)
    assert sorted(ids) == sorted(e["id"] for events in sent for e in events)  # each once
    log = proc.text()
    assert log.count("ingest paused") == 1 and log.count("ingest resumed") == 1, log
    assert "reject requeue=False" not in log and "Retry in" not in log, log


def test_a_flush_drains_a_full_redis(
    redis: redis_lib.Redis, settings: Settings, full: Callable[[bool], None], tmp_path: Path
) -> None:
    """Lock, claim, ack (and the reorder window's release) need no free memory."""
    windowed = Settings.from_env(
        {
            "REDIS_URL": settings.redis_url,
            "CLICKHOUSE_URL": settings.clickhouse_url,
            "EVENT_BUFFER_REORDER_WINDOW_MS": "1",
        }
    )
    buffer = EventBuffer(redis, windowed)
    events = [e for n in range(4) for e in batch("drain", n)]
    ingest(buffer, events, "b1")
    sink = open_sink(settings.clickhouse_url)
    sink.migrate()
    sink.close()
    full(True)
    with pytest.raises(redis_lib.exceptions.OutOfMemoryError):
        ingest(buffer, batch("drain", 9), "b2")  # ingest is refused ...
    lock = FlushLock(redis, SHARD.lock, 30)
    assert lock.acquire()  # ... the lock is not
    lock.release()
    flusher = Flusher(redis, windowed, lambda: open_sink(settings.clickhouse_url))
    summary = flusher.process_buffer()
    assert summary.errors == [], summary.as_dict()
    full(False)
    # Every view was released by the window and written; the last view of each session
    # waits for its session's next event, as always.
    sink = open_sink(settings.clickhouse_url)
    try:
        [(count,)] = sink.query("SELECT count() FROM events")
    finally:
        sink.close()
    assert count == summary.rows == len(events) - 4
    assert redis.llen(SHARD.queue) == 0


def test_beat_and_a_flush_worker_drain_a_full_broker(
    redis_url: str, redis: redis_lib.Redis, full: Callable[[bool], None], tmp_path: Path
) -> None:
    """The broker is the full Redis too: Beat's ticks still reach the flush worker."""
    chdb_url = f"chdb://{tmp_path / 'ch'}"
    sink = open_sink(chdb_url)
    sink.migrate()
    sink.close()
    settings = Settings.from_env(
        {"REDIS_URL": redis_url, "CLICKHOUSE_URL": chdb_url, "EVENT_BUFFER_REORDER_WINDOW_MS": "0"}
    )
    events = [e for n in range(10) for e in batch("beat", n) if e["name"] != "screen_view"]
    ingest(EventBuffer(redis, settings), events, "b1")
    full(True)
    env = project_env(
        REDIS_URL=redis_url, CLICKHOUSE_URL=chdb_url, EVENT_BUFFER_FLUSH_INTERVAL_S="1"
    )
    procs: list[CeleryProcess] = []
    try:
        procs.append(worker(env, tmp_path / "flush.log", "-Q", "flush", "-P", "solo"))
        procs.append(beat(env, tmp_path / "beat.log", tmp_path / "schedule"))
        wait_until(
            lambda: redis.llen(SHARD.queue) == 0,
            90,
            "the flush of the full Redis",
            alive=lambda: all(p.alive() for p in procs),
        )
        time.sleep(3)  # more ticks on the full Redis: the summaries cannot be stored
        assert all(p.alive() for p in procs), procs[0].text()[-3000:]
    finally:
        for proc in procs:
            proc.stop()
        full(False)
    sink = open_sink(chdb_url)
    try:
        [(count, unique)] = sink.query("SELECT count(), uniqExact(id) FROM events")
    finally:
        sink.close()
    assert (count, unique) == (len(events), len(events))
    assert "Couldn't apply scheduled task" not in procs[1].text()
    assert "Unrecoverable error" not in procs[0].text()


def test_a_producer_holds_what_a_full_broker_refuses(
    redis_url: str, redis: redis_lib.Redis, full: Callable[[bool], None]
) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_url})
    full(True)
    producer = EventProducer(settings=settings, batch_size=10, batch_ms=0, max_pending=30)
    try:
        for event in batch("producer", 0, size=30):
            producer.send(event)
        with pytest.raises(BufferFull):
            producer.send(batch("producer", 1, size=1)[0])
        with pytest.raises(ProducerError) as raised:
            producer.flush(timeout=1)
        assert raised.value.unsent == 30
        assert producer.stats.pending == 30  # held, not lost
        full(False)
        producer.flush(timeout=20)
        stats = producer.stats
    finally:
        full(False)
        producer.close(timeout=5)
    # Every held event went out once, each batch as one task.
    assert (stats.sent_events, stats.pending) == (30, 0)
    assert redis.llen("ingest") == stats.sent_batches


def test_a_plain_send_task_into_a_full_broker_raises(
    redis_url: str,
    redis: redis_lib.Redis,
    full: Callable[[bool], None],
) -> None:
    """What the README tells a foreign producer to expect (and catch, and retry)."""
    app = create_app(Settings.from_env({"REDIS_URL": redis_url}))
    full(True)
    try:
        with pytest.raises(OperationalError) as raised:
            app.send_task("eventbuffer.ingest_events", args=[batch("plain", 0)], queue="ingest")
    finally:
        full(False)
        app.close()
    assert "maxmemory" in str(raised.value)
    assert redis.llen("ingest") == 0


def test_a_producer_leaves_the_last_of_a_broker_redis_to_the_workers(
    redis_url: str, redis: redis_lib.Redis, full: Callable[[bool], None]
) -> None:
    """Past 95 % of the broker's maxmemory, EventProducer holds its batches (so queued tasks
    cannot take the room every apply needs: a full Redis of tasks and an empty buffer
    would be stuck), and sends them once there is room."""
    used = int(redis.info("memory")["used_memory"])
    redis.config_set("maxmemory", int(used / 0.97))  # ~97 % used: writes still accepted
    producer = EventProducer(settings=Settings.from_env({"REDIS_URL": redis_url}), batch_ms=0)
    try:
        for event in batch("headroom", 0, size=20):
            producer.send(event)
        with pytest.raises(ProducerError, match="over 95 %"):
            producer.flush(timeout=1)
        assert redis.llen("ingest") == 0  # held by the producer, not refused by Redis
        redis.lpush("not-a-producer", b"x")  # Redis itself still takes writes
        full(False)
        producer.flush(timeout=20)
        stats = producer.stats
    finally:
        full(False)
        producer.close(timeout=5)
    assert (stats.sent_events, stats.pending) == (20, 0)


def test_a_producer_waits_for_headroom_a_few_seconds_not_forever(
    redis_url: str, redis: redis_lib.Redis
) -> None:
    """Memory Redis holds apart from the buffer may keep it above 95 % for good: after
    HEADROOM_WAIT_MAX_S a batch goes out anyway (a producer stuck on it would be a new
    way to stop ingest). The broker reads as 99 % full here, whatever Redis says."""
    from worker.headroom import Headroom
    from worker.producer_sender import HEADROOM_WAIT_MAX_S

    class AlwaysNearlyFull(Headroom):
        def ratio(self) -> float:
            return 0.99

    producer = EventProducer(settings=Settings.from_env({"REDIS_URL": redis_url}), batch_ms=0)
    producer._core.headroom = AlwaysNearlyFull("")
    try:
        for event in batch("courtesy", 0, size=20):
            producer.send(event)
        started = time.monotonic()
        producer.flush(timeout=HEADROOM_WAIT_MAX_S + 20)
        waited = time.monotonic() - started
        stats = producer.stats
    finally:
        producer.close(timeout=5)
    assert (stats.sent_events, stats.pending) == (20, 0)
    assert redis.llen("ingest") == stats.sent_batches
    assert waited >= HEADROOM_WAIT_MAX_S - 1.5  # it did hold the batch first
