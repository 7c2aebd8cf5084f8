"""Ingest workers SIGKILLed again and again while the producer keeps sending.

(a) RabbitMQ broker, whole workers (main process and pool, the process
    group) killed: the broker redelivers everything unacknowledged when the
    dead connection closes; a batch applied before the kill is skipped by its
    batch marker. Must be exactly once. The worker consumes `flush` too, as
    the issue 13 operator's did, at the production lock TTL: kills land on
    its `process_buffer` runs as well, and one more kill is made while one of
    them holds the shard's lock with a claim open. Then a plain `eventbuffer
    flush`, as an operator runs it after an incident, must drain the buffer
    at once (the dead holder's lock taken over) and exit 0.
(b) Redis broker, pool processes killed: the main process sees
    WorkerLostError and rejects the task back to the queue
    (task_reject_on_worker_lost). Must be exactly once.
(c) Redis broker, whole workers killed, 30 times: with the reliable
    transport (worker/broker) a task never leaves Redis before its ack; a
    killed worker's in-flight tasks are put back by the next one once the
    dead worker's heartbeat expires. Must be exactly once.
(c') The same with kombu's stock transport, which pops a task (BRPOP) before
    it records it as unacknowledged, so a kill in that instant loses the task
    it was receiving. Informational (only bounded: at most one task per
    kill), and opt-in: FAULTS_STOCK_TRANSPORT=1 runs it.

Where the kills land: an ingest task takes a millisecond or two, so a kill at
a random moment mostly finds the pool idle. To put a task in flight at the
moment of a kill, half of the kills (and all of (b)'s) are made while the
buffer Redis (a server apart from the broker) is paused for writes
(`CLIENT PAUSE WRITE`, a stalled Redis): a task received meanwhile is blocked
inside its apply call when its process dies. Some of those kills are made
just after the pause ends instead, when the blocked apply has run but its
task is likely not acknowledged yet (the batch marker's case). The other
kills come at random moments, right after the worker caught up on the
backlog of its restart.

Each task holds whole sessions (see tests/support/fault_load.py), so redelivery order
cannot change durations.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import time
from collections import Counter

import pytest

from tests.support.celery_procs import CeleryProcess
from tests.support.fault_load import Load, wait
from tests.support.fault_processes import LogTail, logs, pool_children
from tests.support.fault_stack import Stack, assert_exactly_once
from tests.support.flushing import eventbuffer_flush
from tests.support.traffic import EVENTS_PER_SESSION
from worker.lock import LockState, read_lock
from worker.settings import Settings

pytestmark = pytest.mark.faults

KILLS = 10
WHOLE_KILLS_REDIS = 30
# Whole-worker kills on Redis: small tasks, faster, so the main process is
# receiving one (the stock transport's gap) at many more of the kills.
FETCH_RATE = 500
FETCH_SESSIONS_PER_TASK = 1
RATE = 250  # events per second
SESSIONS_PER_TASK = 4
PAUSE_MS = 1500


def _pause_buffer(stack: Stack) -> None:
    stack.redis.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")


def _unpause_buffer(stack: Stack) -> None:
    stack.redis.execute_command("CLIENT", "UNPAUSE")


def _task_in_flight(stack: Stack, proc: CeleryProcess) -> bool:
    """Pause the buffer's writes until the worker receives a task (then blocked in its apply)."""
    tail = LogTail(proc.log, " received")
    _pause_buffer(stack)
    deadline = time.monotonic() + PAUSE_MS / 1000 - 0.5
    while tail.poll() == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # the pool process has it and waits on Redis
    return tail.count > 0


def _kill_whole_workers(
    stack: Stack,
    kills_wanted: int,
    seed: int,
    rate: float = RATE,
    sessions_per_task: int = SESSIONS_PER_TASK,
    queues: str = "ingest",
) -> tuple[int, float, Load, CeleryProcess]:
    """SIGKILL the ingest worker's process group `kills_wanted` times under load.

    Returns with the load still running and the last worker started. A worker
    that consumes `flush` too is the only flusher; else a flush worker runs beside.
    """
    rng = random.Random(seed)
    if "flush" not in queues.split(","):
        stack.flush_worker().wait_for("ready.")
    stack.beat()
    ingest = stack.ingest_worker("-c", "2", queues=queues)
    load = stack.load(rate, sessions_per_batch=sessions_per_task)
    ingest.wait_for("ready.")
    load.start()
    kills = 0
    last_kill = time.monotonic()
    while kills < kills_wanted:
        wait(
            lambda proc=ingest: proc.text().count(" succeeded in ") >= 1,  # type: ignore[misc]
            30,
            "the ingest worker to run tasks",
        )
        mode = kills % 4
        if mode in (0, 2):  # a task blocked in its apply call
            _task_in_flight(stack, ingest)
            if mode == 2:  # ... or just let go: applied, likely not acknowledged yet
                _unpause_buffer(stack)
            ingest.kill()
            _unpause_buffer(stack)
        else:  # at random, while it catches up on the backlog of its restart
            time.sleep(rng.uniform(0.0, 0.03) if mode == 1 else rng.uniform(0.0, 0.4))
            ingest.kill()
        kills += 1
        last_kill = time.monotonic()
        ingest = stack.ingest_worker("-c", "2", queues=queues)
        if kills < kills_wanted:
            ingest.wait_for("ready.")
    return kills, last_kill, load, ingest


def _kill_mid_flush(stack: Stack, proc: CeleryProcess, attempts: int = 5) -> tuple[int, LockState]:
    """SIGKILL the worker's process group while one of its processes holds the shard's
    flush lock with a claim open; restart it and try again if that flush ended first.

    Returns the attempts it took and the lock the dead process left behind.
    """

    def held_by_worker() -> LockState | None:
        assert proc.process is not None
        state = read_lock(stack.redis, stack.shard.lock)
        if state is None or state.holder is None or stack.claim_open() is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(state.holder.pid) == proc.process.pid:
                return state
        return None

    for attempt in range(1, attempts + 1):
        proc.wait_for("ready.")
        deadline = time.monotonic() + 60
        while (held := held_by_worker()) is None:
            assert time.monotonic() < deadline, "no flush of the worker held the lock"
            time.sleep(0.002)
        proc.kill()
        left = read_lock(stack.redis, stack.shard.lock)
        if left is not None and left.token == held.token:
            return attempt, left
        proc = stack.ingest_worker("-c", "2", queues="ingest,flush")
    raise AssertionError(f"{attempts} kills all came after the flush had released its lock")


def _redelivered(stack: Stack) -> int:
    """Tasks received more than once over every ingest worker's life."""
    received = Counter(re.findall(r"ingest_events\[([0-9a-f-]+)\] received", logs(stack, "ingest")))
    return sum(1 for n in received.values() if n > 1)


def test_whole_workers_killed_on_amqp(stacks, amqp_url: str) -> None:
    ttl_s = Settings().lock_ttl_s  # the production default, not the suite's 3 s
    stack: Stack = stacks(broker=amqp_url, EVENT_BUFFER_LOCK_TTL_S=str(ttl_s))
    kills, _, load, ingest = _kill_whole_workers(stack, KILLS, seed=1, queues="ingest,flush")
    attempts, dead_lock = _kill_mid_flush(stack, ingest)
    last_kill = time.monotonic()
    load.finish()  # into the broker: nobody consumes it until the worker is back

    # The operator's flush, at once: no retry loop around it.
    done, _ = eventbuffer_flush(stack.env)
    flushed_in = time.monotonic() - last_kill
    assert done.returncode == 0, (done.stdout, done.stderr)
    took_over = f"Shard 0: took its flush lock over from {dead_lock.who}: its process"
    assert took_over in done.stdout, done.stdout
    assert "1 re-driven" in done.stdout, done.stdout
    assert flushed_in < 30, f"eventbuffer flush took {flushed_in:.1f} s after the kill"
    assert stack.queued() == 0 and stack.claim_open() is None

    stack.ingest_worker("-c", "2", queues="ingest,flush")  # the tasks the broker redelivers
    drained = stack.wait_drained(load.count, timeout=90)
    tally = stack.finish(load)
    skipped = logs(stack, "ingest").count("was applied before: skipped")
    redelivered = _redelivered(stack)
    stack.record(
        "ingest worker killed (whole, AMQP)",
        tally,
        drained - last_kill,
        f"{kills} SIGKILLs of the worker group, +{attempts} mid-flush",
        note=f"{redelivered} tasks delivered again after kills, {skipped} of them skipped by "
        "their batch marker (applied before the kill); then `eventbuffer flush` took the dead "
        f"flusher's lock over ({dead_lock.ttl_ms / 1000:.0f} s of its {ttl_s} s TTL left) and "
        f"drained the buffer {flushed_in:.1f} s after the kill, exit 0",
    )
    assert redelivered >= 1, "no kill caught a task in flight"
    assert_exactly_once(stack, tally)


def test_pool_processes_killed_on_redis_broker(stacks) -> None:
    stack: Stack = stacks(broker="redis", EVENT_BUFFER_VISIBILITY_TIMEOUT_S="3")
    flush = stack.flush_worker()
    stack.beat()
    ingest = stack.ingest_worker("-c", "2")
    load = stack.load(RATE, sessions_per_batch=SESSIONS_PER_TASK)
    flush.wait_for("ready.")
    ingest.wait_for("ready.")
    load.start()
    kills = 0
    last_kill = time.monotonic()
    killed: set[int] = set()
    in_flight_kills = 0
    while kills < KILLS:
        load.wait_for((kills + 1) * RATE, 30)  # spread over ~10 s of load
        wait(
            lambda killed=killed: len(set(pool_children(ingest)) - killed) >= 2,  # type: ignore[misc]
            30,
            "the pool to be respawned",
        )
        in_flight = _task_in_flight(stack, ingest)
        pool = set(pool_children(ingest)) - killed
        for pid in pool:  # the whole pool, the process running the task among them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed |= pool
        _unpause_buffer(stack)
        kills += 1
        in_flight_kills += int(in_flight)
        last_kill = time.monotonic()
    assert ingest.alive(), "the worker's main process must survive its pool's deaths"
    load.finish()
    drained = stack.wait_drained(load.count, timeout=90)
    tally = stack.finish(load)
    text = logs(stack, "ingest")
    lost = text.count("WorkerLostError: Worker exited prematurely")
    stack.record(
        "ingest pool processes killed (Redis broker)",
        tally,
        drained - last_kill,
        f"{kills} SIGKILLs of the pool ({len(killed)} processes)",
        note=f"{in_flight_kills} kills with a task received during the pause; {lost} tasks "
        f"were running in a killed process (WorkerLostError, requeued); "
        f"{_redelivered(stack)} tasks delivered again",
    )
    assert lost >= KILLS // 2, f"only {lost} kills caught a running task"
    assert_exactly_once(stack, tally)


def test_whole_workers_killed_on_redis_broker(stacks) -> None:
    stack: Stack = stacks(broker="redis", EVENT_BUFFER_CONSUMER_TIMEOUT_S="2")
    kills, last_kill, load, _ = _kill_whole_workers(
        stack, WHOLE_KILLS_REDIS, seed=3, rate=FETCH_RATE, sessions_per_task=FETCH_SESSIONS_PER_TASK
    )
    load.finish()
    drained = stack.wait_drained(load.count, timeout=120)
    tally = stack.finish(load)
    text = logs(stack, "ingest")
    # Any live worker recovers a dead one: the flush worker too.
    recovered = re.findall(
        r"dead \(no heartbeat for [0-9.]+ s\): (\d+) unacknowledged", text + logs(stack, "flush")
    )
    skipped = text.count("was applied before: skipped")
    stack.record(
        "ingest worker killed (whole, Redis broker)",
        tally,
        drained - last_kill,
        f"{kills} SIGKILLs of the worker group",
        note=f"reliable transport: {sum(map(int, recovered))} tasks put back by "
        f"{len(recovered)} recoveries of dead workers; {_redelivered(stack)} tasks delivered "
        f"again, {skipped} of them skipped by their batch marker",
    )
    assert recovered and sum(map(int, recovered)) >= 1, "no kill caught a task in flight"
    assert_exactly_once(stack, tally)


@pytest.mark.skipif(
    not os.environ.get("FAULTS_STOCK_TRANSPORT"),
    reason="measures kombu's stock transport losing tasks (informational, half a minute); "
    "FAULTS_STOCK_TRANSPORT=1 runs it",
)
def test_whole_workers_killed_on_redis_broker_stock_transport(stacks) -> None:
    stack: Stack = stacks(
        broker="redis", EVENT_BUFFER_BROKER_TRANSPORT="kombu", EVENT_BUFFER_VISIBILITY_TIMEOUT_S="3"
    )
    kills, last_kill, load, _ = _kill_whole_workers(
        stack, WHOLE_KILLS_REDIS, seed=3, rate=FETCH_RATE, sessions_per_task=FETCH_SESSIONS_PER_TASK
    )
    load.finish()
    # A task lost in the gap never comes back: done when nothing moves any more
    # (the broker's unacknowledged tasks are counted as backlog until restored).
    drained = stack.wait_drained(load.count, timeout=120, quiet_s=4)
    tally = stack.finish(load)
    lost_tasks = -(-tally.missing // (EVENTS_PER_SESSION * FETCH_SESSIONS_PER_TASK))
    stack.record(
        "ingest worker killed (whole, Redis broker, kombu's stock transport)",
        tally,
        drained - last_kill,
        f"{kills} SIGKILLs of the worker group",
        asserted=f"dup=0, lost tasks <= kills ({kills})",
        note=f"informational: {lost_tasks} tasks ({tally.missing} events) lost in the stock "
        "transport's gap (a task popped by BRPOP but not yet recorded as unacknowledged "
        f"dies with its worker); {_redelivered(stack)} tasks delivered again",
    )
    assert tally.duplicated == 0 and tally.unexpected == 0
    assert tally.wrong_durations == 0
    assert lost_tasks <= kills, f"lost {lost_tasks} tasks in {kills} kills: {tally}"
