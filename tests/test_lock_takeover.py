"""Taking a flush lock over from a dead holder, against a real Redis and real processes.

A lock's token names its holder (host, pid, process start time, pid space)
and its heartbeat is the watchdog's extension, read from the lock's PTTL.
A holder is taken over when it is provably dead: its process is gone from
this pid space (reaped, a zombie, or its pid now another process's), or its
heartbeat is stale (no extension for two thirds of its TTL: the only
evidence there is for a holder on another host). A live holder keeps its
lock; a frozen one taken over is fenced when it wakes.

The holders here are real processes (`HOLDER`: a FlushLock in a child,
SIGKILLed or SIGSTOPped), this process (alive), or tokens that name a
process on another host (its pid cannot be checked from here). Stale
heartbeats are made with a real PTTL: a token that says its holder extends
to 15 s, set with 4 s left, has not been extended for 11 s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
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
from worker.claims import AckResult, Claims
from worker.events import parse_event
from worker.flush import Flusher
from worker.keys import ShardKeys
from worker.lock import FlushLock, Process, make_token, read_lock, this_process
from worker.scripts import Scripts
from worker.settings import Settings
from worker.sinks import RetryableSinkError
from worker.sinks.chdb import ChdbSink

ROOT = Path(__file__).resolve().parent.parent
SHARD = ShardKeys("eventbuffer", 0)
FAR_AWAY = Process("far-away", 4242, 123, "feedfacecafe")  # another host's process

# A FlushLock held by a child process: prints its token, then whether it lost
# the lock (its watchdog's extension failed) and what ack.lua answered it.
HOLDER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import redis
from worker.keys import ShardKeys
from worker.lock import FlushLock
from worker.claims import Claims
client = redis.Redis.from_url(sys.argv[2])
shard = ShardKeys("eventbuffer", 0)
lock = FlushLock(client, shard.lock, float(sys.argv[3]))
assert lock.acquire()
print(json.dumps({"token": lock.token.decode()}), flush=True)
while not lock.lost:
    time.sleep(0.02)
claim = client.hget(shard.claim, "id").decode()
ack = Claims(client).ack(shard, lock_token=lock.token, claim_id=claim, now_ms=0,
                         rows_inserted=0, dead_letters=[], saved=None)
print(json.dumps({"lost": True, "ack": int(ack)}), flush=True)
"""


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[str]]]:
    """Holder processes started by a test; none left running or stopped after it."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.send_signal(signal.SIGCONT)
            child.kill()
        child.wait()


def start_holder(
    redis_url: str, ttl_s: float, holders: list[subprocess.Popen[str]]
) -> tuple[subprocess.Popen[str], str]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(ROOT), redis_url, str(ttl_s)],
        stdout=subprocess.PIPE,
        text=True,
    )
    holders.append(child)
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, "the holder process did not take the lock"
    return child, json.loads(line)["token"]


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


# -- the rules ----------------------------------------------------------------------------


def test_a_live_holder_keeps_its_lock(redis: redis_lib.Redis) -> None:
    """This process holds it: its pid is alive and its heartbeat fresh."""
    first = FlushLock(redis, SHARD.lock, 15)
    assert first.acquire()
    try:
        second = FlushLock(redis, SHARD.lock, 15)
        assert not second.acquire()
        assert second.took_over is None
        assert redis.get(SHARD.lock) == first.token
        state = read_lock(redis, SHARD.lock)
        assert state is not None and state.holder == this_process()
        assert state.holder_ttl_ms == 15_000 and not state.stale
        assert state.heartbeat_age_ms is not None and 0 <= state.heartbeat_age_ms < 5_000
    finally:
        first.release()


def test_a_live_holder_on_another_host_keeps_its_lock(redis: redis_lib.Redis) -> None:
    """Its pid cannot be checked from here; its heartbeat is 1 s old: fresh."""
    token = make_token(15_000, FAR_AWAY)
    redis.set(SHARD.lock, token, px=14_000)
    lock = FlushLock(redis, SHARD.lock, 15)
    assert not lock.acquire()
    assert redis.get(SHARD.lock) == token.encode()
    state = read_lock(redis, SHARD.lock)
    assert state is not None and state.holder == FAR_AWAY and not state.stale


def test_a_holder_that_does_not_name_itself_is_left_to_its_ttl(redis: redis_lib.Redis) -> None:
    """A token of an older version (redis-py's uuid1): nobody can tell whether it is dead."""
    redis.set(SHARD.lock, uuid.uuid1().hex, px=1_000)
    assert not FlushLock(redis, SHARD.lock, 15).acquire()
    state = read_lock(redis, SHARD.lock)
    assert state is not None and state.holder is None and state.heartbeat_age_ms is None
    assert not state.stale


def test_a_holder_whose_process_is_gone_is_taken_over_at_once(
    redis: redis_lib.Redis, redis_url: str, holders: list[subprocess.Popen[str]]
) -> None:
    """SIGKILLed and reaped: its lock has nearly all of its 60 s left, and is taken now."""
    child, token = start_holder(redis_url, 60, holders)
    child.kill()
    child.wait()
    lock = FlushLock(redis, SHARD.lock, 15)
    try:
        assert lock.acquire()
        assert lock.took_over == f"{this_process().host}:{child.pid}: its process is gone"
        assert redis.get(SHARD.lock) == lock.token != token.encode()
        assert 14_000 < redis.pttl(SHARD.lock) <= 15_000  # now ours, with our TTL
    finally:
        lock.release()
    assert not redis.exists(SHARD.lock)


def test_a_holder_killed_but_not_yet_reaped_is_taken_over(
    redis: redis_lib.Redis, redis_url: str, holders: list[subprocess.Popen[str]]
) -> None:
    """A zombie (its parent, this test, has not waited for it) is dead too."""
    child, _ = start_holder(redis_url, 60, holders)
    os.kill(child.pid, signal.SIGKILL)
    wait_until(lambda: process_state(child.pid) == "Z", 10, "the holder to become a zombie")
    lock = FlushLock(redis, SHARD.lock, 15)
    try:
        assert lock.acquire()
        assert lock.took_over is not None and lock.took_over.endswith("its process has exited")
    finally:
        lock.release()


def test_a_holder_whose_pid_was_reused_is_taken_over(
    redis: redis_lib.Redis, holders: list[subprocess.Popen[str]]
) -> None:
    """The token names a live pid of this pid space, but a process that started at another
    time: the pid belongs to someone else now, and the holder is gone."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], text=True)
    holders.append(other)
    me = this_process()
    reused = Process(me.host, other.pid, me.started - 1, me.pidspace)
    redis.set(SHARD.lock, make_token(60_000, reused), px=60_000)
    lock = FlushLock(redis, SHARD.lock, 15)
    try:
        assert lock.acquire()
        assert lock.took_over == f"{me.host}:{other.pid}: its pid belongs to another process now"
    finally:
        lock.release()


def test_a_stale_heartbeat_is_taken_over_on_any_host(redis: redis_lib.Redis) -> None:
    """No extension for 11 s of a 15 s TTL (over two thirds of it): taken over before it
    would expire, though its pid on another host cannot be checked."""
    redis.set(SHARD.lock, make_token(15_000, FAR_AWAY), px=4_000)
    state = read_lock(redis, SHARD.lock)
    assert state is not None and state.stale
    assert state.heartbeat_age_ms is not None and 11_000 <= state.heartbeat_age_ms < 12_000
    lock = FlushLock(redis, SHARD.lock, 15)
    try:
        assert lock.acquire()
        assert lock.took_over is not None
        assert lock.took_over.startswith("far-away:4242: its heartbeat is 1")
        assert redis.get(SHARD.lock) == lock.token
    finally:
        lock.release()


# -- the script's compare-and-swap --------------------------------------------------------


def test_takeover_script_swaps_only_the_token_it_judged_dead(redis: redis_lib.Redis) -> None:
    scripts = Scripts(redis)
    redis.set(SHARD.lock, "current", px=4_000)
    # Another token than the one judged dead (someone else took it over first): refused.
    assert not scripts.take_over_lock(SHARD.lock, "judged-dead", "mine", 15_000, -1)
    assert redis.get(SHARD.lock) == b"current"
    # Extended since it was judged stale (more left than when it was read): refused.
    assert not scripts.take_over_lock(SHARD.lock, "current", "mine", 15_000, 3_000)
    assert redis.get(SHARD.lock) == b"current"
    # Still as stale as when it was read: taken, with the new holder's TTL.
    assert scripts.take_over_lock(SHARD.lock, "current", "mine", 15_000, 4_000)
    assert redis.get(SHARD.lock) == b"mine"
    assert 14_000 < redis.pttl(SHARD.lock) <= 15_000
    # A lock without expiry is never judged stale; a gone process's lock is taken anyway.
    redis.set(SHARD.lock, "forever")
    assert not scripts.take_over_lock(SHARD.lock, "forever", "mine", 15_000, 4_000)
    assert scripts.take_over_lock(SHARD.lock, "forever", "mine", 15_000, -1)
    # A free lock is not the script's to take (SET NX is).
    redis.delete(SHARD.lock)
    assert not scripts.take_over_lock(SHARD.lock, "forever", "mine", 15_000, -1)
    assert not redis.exists(SHARD.lock)


# -- fencing ------------------------------------------------------------------------------


def test_a_frozen_holder_taken_over_is_fenced_when_it_wakes(
    redis: redis_lib.Redis, redis_url: str, holders: list[subprocess.Popen[str]]
) -> None:
    """The holder (6 s TTL, so stale after 4 s without an extension) is SIGSTOPped: alive,
    but silent. It is taken over on its stale heartbeat, before its lock would expire.
    When it wakes (SIGCONT), its watchdog's extension fails and ack.lua refuses it."""
    redis.hset(SHARD.claim, mapping={"id": "claim-1", "count": 0, "at": 0, "chunk": 5})
    child, token = start_holder(redis_url, 6, holders)
    child.send_signal(signal.SIGSTOP)
    wait_until(lambda: process_state(child.pid) == "T", 10, "the holder to stop")

    def stale() -> bool:
        state = read_lock(redis, SHARD.lock)
        return state is not None and state.stale

    wait_until(stale, 10, "its heartbeat to go stale")
    lock = FlushLock(redis, SHARD.lock, 15)
    assert lock.acquire()
    try:
        holder = f"{this_process().host}:{child.pid}"
        assert re.fullmatch(
            f"{re.escape(holder)}: its heartbeat is [45] s old", lock.took_over or ""
        )
        # The frozen holder's own ack, as it would send it: refused, the claim stays open.
        ack = Claims(redis).ack(
            SHARD,
            lock_token=token.encode(),
            claim_id="claim-1",
            now_ms=0,
            rows_inserted=0,
            dead_letters=[],
            saved=None,
        )
        assert ack == AckResult.LOCK_HELD_BY_OTHER
        assert redis.hget(SHARD.claim, "id") == b"claim-1"

        child.send_signal(signal.SIGCONT)
        assert child.stdout is not None
        woke = json.loads(child.stdout.readline())
        assert child.wait(10) == 0
        # Its watchdog's extension failed (the lock holds our token): it knows it lost.
        assert woke == {"lost": True, "ack": int(AckResult.LOCK_HELD_BY_OTHER)}
        assert redis.get(SHARD.lock) == lock.token
        assert redis.hget(SHARD.claim, "id") == b"claim-1"
    finally:
        lock.release()


# -- a flusher SIGKILLed between chunks, then `eventbuffer flush` at once -------------------

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


# -- `eventbuffer flush` and a held lock --------------------------------------------------


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
