"""A flusher SIGKILLed between chunks, then `eventbuffer flush` (or the next
`process_buffer`) at once: the dead holder's lock is taken over and its claim
re-driven, exactly once; and `eventbuffer flush` against a held lock waits as long
as the lock can live, or takes a stale one over."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib

from tests.conftest import Result
from tests.support.celery_procs import project_env
from tests.support.celery_procs import worker as celery_worker
from tests.support.dates import BASE_MS
from tests.support.exactly_once import assert_exactly_once, open_claim, stored
from tests.support.flushing import eventbuffer_flush
from tests.support.polling import wait_until
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.events import parse_event
from worker.flusher import Flusher
from worker.keys import ShardKeys
from worker.lock import Process, make_token, read_lock
from worker.settings import Settings
from worker.sinks import RetryableSinkError
from worker.sinks.chdb import ChdbSink

ROOT = Path(__file__).resolve().parent.parent


SHARD = ShardKeys("eventbuffer", 0)


FAR_AWAY = Process("far-away", 4242, 123, "feedfacecafe")  # another host's process


# The lock TTL these flushers ran with before the takeover: a dead holder kept a
# shard from being flushed until it ran out.
OLD_TTL_S = 60


TOOK_OVER = re.compile(
    r"Shard 0: took its flush lock over from (\S+): its process (is gone|has exited)"
)


def crash_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Claims of 9 rows in 3 chunks; the production lock TTL (no EVENT_BUFFER_LOCK_TTL_S)."""
    return project_env(
        REDIS_URL=settings.redis_url,
        CLICKHOUSE_URL=settings.clickhouse_url,
        EVENT_BUFFER_BATCH_SIZE="9",
        EVENT_BUFFER_CHUNK_SIZE="3",
        **extra,
    )


def send_events(redis: redis_lib.Redis, settings: Settings, count: int) -> set[str]:
    events = [
        parse_event(
            {
                "id": str(uuid.UUID(int=n + 1)),
                "name": "click",
                "project_id": "proj",
                "created_at": BASE_MS + n * 1000,
            }
        )
        for n in range(count)
    ]
    EventBuffer(redis, settings).apply(events)
    return {event.id for event in events}


def left_behind(redis: redis_lib.Redis, settings: Settings, sink: ChdbSink) -> tuple[str, Process]:
    """What the killed flush left: its claim open with one chunk of three in ClickHouse,
    and its lock, held by the dead process with most of its TTL left (it would turn
    other flushers away for a while yet). Returns the claim id and the lock's holder."""
    claim = open_claim(redis, settings)
    assert claim is not None
    state = read_lock(redis, SHARD.lock)
    assert state is not None and state.holder is not None, "the dead flusher's lock is gone"
    assert state.ttl_ms > 5_000 and not state.stale
    # A SIGKILLed pool process may still be dying, its chDB directory still locked.
    counts: list[tuple[int, int]] = []

    def read() -> bool:
        try:
            rows, distinct, _ = stored(sink)
        except RetryableSinkError:
            return False
        counts.append((rows, distinct))
        return True

    wait_until(read, 15, "the killed flusher's ClickHouse directory to be free", interval=0.2)
    assert counts[-1] == (3, 3)
    return claim, state.holder


def assert_recovered(
    redis: redis_lib.Redis,
    settings: Settings,
    sink: ChdbSink,
    sent: set[str],
    claim: str,
    done: subprocess.CompletedProcess[str],
    seconds: float,
) -> None:
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert done.stderr == ""
    assert TOOK_OVER.search(done.stdout), done.stdout
    assert "Flushed 9 rows" in done.stdout and "1 re-driven" in done.stdout, done.stdout
    assert seconds < OLD_TTL_S / 2, f"took {seconds:.1f} s"
    assert_exactly_once(redis, settings, sink, sent)
    assert redis.hget(SHARD.stats, "claim") == claim.encode()
    assert not redis.exists(SHARD.lock)


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_celery_worker_killed_mid_flush_then_eventbuffer_flush_at_once(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink, tmp_path: Path, pool: str
) -> None:
    """`process_buffer` in a real Celery worker (the flush worker's solo pool, or a prefork
    pool process as an ingest worker's back-pressure flush runs) SIGKILLed with its whole
    process group after the first of three chunks; then the operator's flush, at once."""
    env = crash_env(settings)
    config = Settings.from_env(env)
    sent = send_events(redis, config, 9)
    proc = celery_worker(
        {**env, "DIE_AFTER_WRITES": "1"},
        tmp_path / "worker.log",
        "-Q",
        "flush",
        "-P",
        pool,
        "-c",
        "1",
        app="tests.support.dying_flush",
    )
    app = create_app(config)
    try:
        proc.wait_for("ready.")
        app.send_task("eventbuffer.process_buffer", queue="flush")
        assert proc.process is not None
        proc.process.wait(60)
    finally:
        proc.kill()
        app.close()
    assert proc.process.returncode == -signal.SIGKILL, proc.text()
    claim, holder = left_behind(redis, config, sink)
    if pool == "solo":
        assert holder.pid == proc.process.pid
    else:  # the pool process ran the task
        assert holder.pid != proc.process.pid

    done, seconds = eventbuffer_flush(env)

    assert_recovered(redis, config, sink, sent, claim, done, seconds)


@pytest.mark.slow
def test_eventbuffer_flush_killed_mid_flush_then_eventbuffer_flush_at_once(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    env = crash_env(settings)
    config = Settings.from_env(env)
    sent = send_events(redis, config, 9)
    dying, _ = eventbuffer_flush({**env, "DIE_AFTER_WRITES": "1"}, "tests.support.dying_flush")
    assert dying.returncode == -signal.SIGKILL, dying.stderr
    claim, _ = left_behind(redis, config, sink)
    assert json.loads(dying.stderr.splitlines()[-1]) == {"write": f"{claim}:0"}

    done, seconds = eventbuffer_flush(env)

    assert_recovered(redis, config, sink, sent, claim, done, seconds)


@pytest.mark.slow
def test_process_buffer_takes_over_a_dead_flushers_lock_at_its_next_run(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    """Beat's next tick and the back-pressure flush run `Flusher.process_buffer`: a
    flusher (tests/support/crash_flusher.py, the production Flusher, lock TTL 60 s) SIGKILLed
    after one chunk of three leaves its lock with a minute to live; the next run takes
    it over at once and re-drives the claim."""
    config = Settings.from_env(crash_env(settings))
    sent = send_events(redis, config, 9)
    crashed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "support" / "crash_flusher.py"), config.redis_url,
         config.clickhouse_url, "1", "9", "3", "--lock-ttl", str(OLD_TTL_S)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    claim, holder = left_behind(redis, config, sink)
    left = read_lock(redis, SHARD.lock)
    assert left is not None and left.ttl_ms > 50_000

    flusher = Flusher(redis, config, lambda: ChdbSink(sink.path, sink.table))
    [result] = flusher.process_buffer().shards

    assert result.took_over == f"{holder.name}: its process is gone"
    assert (result.redriven, result.claims, result.rows) == (1, [claim], 9)
    assert_exactly_once(redis, config, sink, sent)


def one_event(redis: redis_lib.Redis, settings: Settings) -> None:
    send_events(redis, settings, 1)


@pytest.mark.slow
def test_eventbuffer_flush_waits_as_long_as_the_lock_can_live(
    run_main: Callable[..., Result], redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    """A holder that does not name itself (an older version) and died: nobody can tell,
    so its lock lives out its TTL, 11 s here, longer than `flush` used to wait (10 s)."""
    one_event(redis, settings)
    token = uuid.uuid1().hex
    redis.set(SHARD.lock, token, px=11_000)
    result = run_main("flush")
    assert result.code == 0, result.err
    assert re.search(
        f"Shard 0: its flush lock is held by {token} \\(1[01] s left\\); waiting up to 1[01] s",
        result.out,
    )
    assert "Flushed 1 rows" in result.out
    assert_exactly_once(redis, settings, sink, {str(uuid.UUID(int=1))})


def test_eventbuffer_flush_takes_over_a_stale_lock_from_another_host(
    run_main: Callable[..., Result], redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    """Its holder on another host extended it to 3 s and fell silent: once 2 s have gone
    without a heartbeat, `flush` takes the lock over, before it would expire."""
    one_event(redis, settings)
    redis.set(SHARD.lock, make_token(3_000, FAR_AWAY), px=3_000)
    result = run_main("flush")
    assert result.code == 0, result.err
    assert "its flush lock is held by far-away:4242 (heartbeat 0 s ago, fresh)" in result.out
    assert re.search(
        "Shard 0: took its flush lock over from far-away:4242: its heartbeat is 2 s old",
        result.out,
    )
    assert_exactly_once(redis, settings, sink, {str(uuid.UUID(int=1))})


def test_eventbuffer_flush_waits_at_most_the_ttl_setting(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    settings: Settings,
    sink: ChdbSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lock with a minute to live, set by something that does not name itself: `flush`
    waits EVENT_BUFFER_LOCK_TTL_S (1 s here), not a minute, and says so."""
    one_event(redis, settings)
    token = uuid.uuid1().hex
    redis.set(SHARD.lock, token, px=60_000)
    monkeypatch.setenv("EVENT_BUFFER_LOCK_TTL_S", "1")
    result = run_main("flush")
    assert result.code == 1
    assert "waiting up to 1 s for it" in result.out
    [line] = result.err.strip().splitlines()
    assert f"skipped shard 0: its flush lock is held by {token} (" in line
    assert "which kept it past EVENT_BUFFER_LOCK_TTL_S (1 s)" in line
    assert redis.get(SHARD.lock) == token.encode()
    assert EventBuffer(redis, settings).get_buffer_size() == 1
