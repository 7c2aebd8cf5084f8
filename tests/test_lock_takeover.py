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
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from tests.support.polling import wait_until
from worker.claims import AckResult, Claims
from worker.keys import ShardKeys
from worker.lock import FlushLock, Process, make_token, read_lock, this_process
from worker.scripts import Scripts

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
