"""The reliable transport's scripts and consumer against a real Redis.

broker_fetch.lua, broker_requeue.lua and broker_heartbeat.lua, driven
through `worker.broker.broker_consumer.Consumer` (no kombu). The last part walks
one message through a consumer's life and crashes the consumer (or the
worker recovering it) between every two steps: the message is always
somewhere it comes back from.

A crashed consumer is one that stops calling Redis. "Its deadline passed"
is then made true at once by setting its registry score into the past
(what time would do); the tests with a running heartbeat thread use real
(short) timeouts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis as redis_lib

from worker.broker.broker_consumer import REQUEUE_BATCH, BrokerConsumer, recover
from worker.broker.broker_keys import BrokerKeys
from worker.broker.broker_scripts import BrokerScripts, ConsumerAlive

KEYS = BrokerKeys()
Q = "ingest"
Q3 = "ingest\x06\x163"  # kombu's priority sub-queue of "ingest" for priorities 3-5
TIMEOUT_S = 30.0


def message(n: int, size: int = 0) -> bytes:
    """A kombu-shaped message as stock senders LPUSH it (its exact bytes matter)."""
    body = {"n": n, "pad": "x" * size}
    return json.dumps({"body": json.dumps(body), "properties": {"delivery_tag": f"t{n}"}}).encode()


def consumer(client: redis_lib.Redis, name: str, timeout_s: float = TIMEOUT_S) -> BrokerConsumer:
    return BrokerConsumer(client, KEYS, timeout_s, consumer_id=name)


def expire(client: redis_lib.Redis, who: BrokerConsumer) -> None:
    """`who` crashed long enough ago: its deadline lies in the past."""
    client.zadd(KEYS.registry, {who.id: 1})


def drain(client: redis_lib.Redis, who: BrokerConsumer, sources: list[str]) -> list[bytes]:
    """Everything `who` can fetch from `sources` now, acknowledged."""
    got = []
    while (taken := who.fetch(sources)) is not None:
        seq, fetched = taken
        got.append(fetched.raw)
        who.ack(seq)
    return got


def held(client: redis_lib.Redis, who: BrokerConsumer) -> dict[int, tuple[str, bytes | None]]:
    """What `who` holds: seq -> (its source list, the message in its own key)."""
    return {
        int(seq): (source.decode(), client.lindex(KEYS.message(who.id, int(seq)), 0))
        for seq, source in client.hgetall(who.inflight).items()
    }


def broker_keys(client: redis_lib.Redis, who: BrokerConsumer) -> list[bytes]:
    """Keys of `who` in Redis: its index and its messages."""
    return sorted(client.keys(who.inflight) + client.keys(KEYS.message(who.id, "*")))


@pytest.fixture
def r(redis: redis_lib.Redis) -> Iterator[redis_lib.Redis]:
    yield redis


# -- broker_fetch.lua ---------------------------------------------------------


def test_fetch_moves_the_oldest_message_into_the_consumers_keeping(r: redis_lib.Redis) -> None:
    r.lpush(Q, message(1), message(2))
    a = consumer(r, "a")
    taken = a.fetch([Q])
    assert taken is not None
    seq, fetched = taken
    assert (seq, fetched.raw, fetched.source, fetched.kept) == (1, message(1), 0, True)
    assert held(r, a) == {1: (Q, message(1))}
    assert r.lrange(Q, 0, -1) == [message(2)]
    deadline = r.zscore(KEYS.registry, "a")
    assert deadline is not None
    server_ms = r.time()[0] * 1000
    assert server_ms + TIMEOUT_S * 1000 - 5000 < deadline <= server_ms + TIMEOUT_S * 1000 + 1000


def test_fetch_tries_the_sources_in_order_and_names_the_one_it_took_from(
    r: redis_lib.Redis,
) -> None:
    r.lpush(Q3, message(3))
    r.lpush(Q, message(1))
    a = consumer(r, "a")
    first = a.fetch([Q, Q3])
    second = a.fetch([Q, Q3])
    assert first is not None and second is not None
    assert first[1].raw == message(1) and first[1].source == 0
    assert second[1].raw == message(3) and second[1].source == 1
    assert held(r, a) == {1: (Q, message(1)), 2: (Q3, message(3))}
    assert a.fetch([Q, Q3]) is None


def test_an_empty_fetch_writes_nothing(r: redis_lib.Redis) -> None:
    assert consumer(r, "a").fetch([Q, Q3]) is None
    assert r.keys("*") == []


def test_a_no_ack_source_hands_the_message_over_without_keeping_it(r: redis_lib.Redis) -> None:
    r.lpush("reply", message(1))
    a = consumer(r, "a")
    taken = a.fetch(["reply"], [True])
    assert taken is not None and taken[1].raw == message(1) and not taken[1].kept
    assert r.keys("*") == []  # not kept, not registered


def test_a_queue_name_with_colons_goes_back_to_itself(r: redis_lib.Redis) -> None:
    name = "tenant:7:ingest"
    r.lpush(name, message(1))
    a = consumer(r, "a")
    assert a.fetch([name]) is not None
    a.close()  # restores what it holds, by its index
    assert r.lrange(name, 0, -1) == [message(1)]


def test_a_full_broker_still_hands_out_requeues_and_recovers_messages(r: redis_lib.Redis) -> None:
    """At maxmemory (noeviction) the flush task must still be fetched, and a dead
    consumer's tasks still recovered: fetch, heartbeat and requeue run all the same."""
    r.lpush(Q, message(1, size=10_000), message(2))
    a, b = consumer(r, "a"), consumer(r, "b")
    r.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis_lib.ResponseError, match="maxmemory"):
            r.lpush(Q, message(3))  # a plain write is refused ...
        taken = a.fetch([Q])  # ... a fetch is not
        assert taken is not None and taken[1].raw == message(1, size=10_000)
        assert a.requeue(taken[0], Q, front=True) == 1
        taken = a.fetch([Q])
        assert taken is not None and taken[1].raw == message(1, size=10_000)
        # a crashed long ago (its deadline set past by a script Redis lets write).
        r.eval("#!lua flags=allow-oom\nreturn redis.call('ZADD', KEYS[1], 1, ARGV[1])",
               1, KEYS.registry, a.id)  # fmt: skip
        assert b.scripts.heartbeat(b.id, 30_000, 10).dead == [a.id]
        assert recover(b.scripts, r, a.id) == 1
    finally:
        r.config_set("maxmemory", 0)
    assert r.lrange(Q, 0, -1) == [message(2), message(1, size=10_000)]


def test_the_raw_bytes_come_back_unchanged_however_large(r: redis_lib.Redis) -> None:
    big = message(1, size=250_000)
    r.lpush(Q, big)
    a = consumer(r, "a")
    taken = a.fetch([Q])
    assert taken is not None and taken[1].raw == big
    assert held(r, a) == {1: (Q, big)}
    assert a.requeue(1, Q, front=True) == 1
    assert r.lrange(Q, 0, -1) == [big] and broker_keys(r, a) == []


# -- acks, rejects, restores ----------------------------------------------------


def test_ack_removes_the_message_from_redis(r: redis_lib.Redis) -> None:
    r.lpush(Q, message(1))
    a = consumer(r, "a")
    taken = a.fetch([Q])
    assert taken is not None
    a.ack(taken[0])
    assert broker_keys(r, a) == [] and not r.exists(Q)


def test_requeue_goes_to_the_front_or_the_back_of_its_queue(r: redis_lib.Redis) -> None:
    r.lpush(Q, message(1), message(2), message(3))
    a = consumer(r, "a")
    one, two = a.fetch([Q]), a.fetch([Q])
    assert one is not None and two is not None
    assert a.requeue(one[0], Q, front=False) == 1  # a reject: behind what is queued
    assert a.requeue(two[0], Q, front=True) == 1  # a restore: fetched next
    assert drain(r, a, [Q]) == [message(2), message(3), message(1)]
    assert a.requeue(one[0], Q, front=True) == 0  # gone already: nothing happens
    assert broker_keys(r, a) == []


def test_restore_all_puts_everything_back_in_order_and_leaves_the_registry(
    r: redis_lib.Redis,
) -> None:
    r.lpush(Q, *[message(n) for n in range(5)])
    r.lpush(Q3, message(9))
    a = consumer(r, "a")
    for _ in range(6):
        assert a.fetch([Q, Q3]) is not None
    assert a.restore_all(deregister=True) == 6
    assert broker_keys(r, a) == []
    assert r.zscore(KEYS.registry, "a") is None
    assert drain(r, consumer(r, "b"), [Q, Q3]) == [message(n) for n in range(5)] + [message(9)]


def test_park_moves_a_message_aside_unchanged(r: redis_lib.Redis) -> None:
    r.lpush(Q, b"not json")
    a = consumer(r, "a")
    taken = a.fetch([Q])
    assert taken is not None
    assert a.park(taken[0]) == 1
    assert r.lrange(KEYS.unparsable, 0, -1) == [b"not json"]
    assert broker_keys(r, a) == []


# -- broker_heartbeat.lua and recovery -------------------------------------------


def test_heartbeat_registers_and_lists_the_dead(r: redis_lib.Redis) -> None:
    scripts = BrokerScripts(r, KEYS)
    first = scripts.heartbeat("a", 30_000, 10)
    assert not first.was_registered and first.dead == []
    r.zadd(KEYS.registry, {"dead-1": 1, "dead-2": 2})
    again = scripts.heartbeat("a", 30_000, 10)
    assert again.was_registered and again.dead == ["dead-1", "dead-2"]
    assert scripts.heartbeat("a", 30_000, 1).dead == ["dead-1"]


def test_recovery_puts_a_dead_consumers_messages_back_where_they_came_from(
    r: redis_lib.Redis,
) -> None:
    r.lpush(Q, message(1), message(2))
    r.lpush(Q3, message(3))
    a = consumer(r, "a")
    for _ in range(3):
        assert a.fetch([Q, Q3]) is not None
    r.lpush(Q, message(4))  # arrived meanwhile: the recovered ones go before it
    expire(r, a)
    assert recover(a.scripts, r, "a") == 3
    assert broker_keys(r, a) == [] and r.zscore(KEYS.registry, "a") is None
    assert r.lrange(Q, 0, -1) == [message(4), message(2), message(1)]  # 1 is fetched next
    assert r.lrange(Q3, 0, -1) == [message(3)]


def test_recovery_never_takes_from_a_live_consumer(r: redis_lib.Redis) -> None:
    r.lpush(Q, message(1))
    a = consumer(r, "a")
    assert a.fetch([Q]) is not None
    with pytest.raises(ConsumerAlive):
        recover(a.scripts, r, "a")
    assert held(r, a) == {1: (Q, message(1))} and not r.exists(Q)


def test_recovery_of_a_consumer_that_held_nothing_just_removes_it(r: redis_lib.Redis) -> None:
    r.zadd(KEYS.registry, {"gone": 1})
    assert recover(BrokerScripts(r, KEYS), r, "gone") == 0
    assert not r.exists(KEYS.registry)


def test_a_consumer_recovered_as_dead_reregisters_on_its_next_fetch(r: redis_lib.Redis) -> None:
    # A "zombie": it stalled past its deadline, was recovered, then goes on.
    r.lpush(Q, message(1), message(2))
    a = consumer(r, "a")
    first = a.fetch([Q])
    assert first is not None
    expire(r, a)
    assert recover(a.scripts, r, "a") == 1
    a.ack(first[0])  # its late ack finds nothing: the message is queued again
    assert r.llen(Q) == 2
    second = a.fetch([Q])
    assert second is not None
    assert r.zscore(KEYS.registry, "a") is not None  # recoverable again
    expire(r, a)
    assert recover(a.scripts, r, "a") == 1
    assert sorted(drain(r, consumer(r, "b"), [Q])) == [message(1), message(2)]


# -- the heartbeat thread -------------------------------------------------------


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def test_a_live_heartbeat_recovers_a_dead_consumer_and_spares_a_live_one(
    r: redis_lib.Redis, redis_url: str
) -> None:
    timeout_s = 0.5
    r.lpush(Q, message(1), message(2))
    dead = consumer(r, "dead", timeout_s)
    live = consumer(r, "live", timeout_s)
    assert dead.fetch([Q]) is not None  # then it never calls Redis again
    assert live.fetch([Q]) is not None
    live.start_heartbeat(redis_lib.Redis.from_url(redis_url))
    try:
        _wait(lambda: r.llen(Q) == 1, 10, "the dead consumer's message to be put back")
        assert r.lrange(Q, 0, -1) == [message(1)]
        assert r.zscore(KEYS.registry, "dead") is None
        time.sleep(4 * timeout_s)  # many timeouts: the live one keeps what it holds
        assert held(r, live) == {1: (Q, message(2))}
    finally:
        live.close()
    assert r.lrange(Q, 0, -1) == [message(1), message(2)]
    assert not r.exists(KEYS.registry)


# -- a crash between every two steps ------------------------------------------------

# One message's life with consumer A: queued -> fetched (moved to its own
# key, listed in A's index; the reply may never be read, the task may be
# running) -> its key deleted (the ack's first command) -> acknowledged (the
# index entry too). A crash after each step (A stops, its deadline passes,
# B's heartbeat recovers it) must leave the message to be run by B, unless A
# had acknowledged it, even halfway.
LIFE = ["queued", "fetched", "key deleted", "acknowledged"]


@pytest.mark.parametrize("crash_after", LIFE)
def test_a_consumer_crash_after_any_step_loses_nothing(
    r: redis_lib.Redis, crash_after: str
) -> None:
    r.lpush(Q, message(1))
    a, b = consumer(r, "a"), consumer(r, "b")
    field = None
    for step in LIFE[1 : LIFE.index(crash_after) + 1]:
        if step == "fetched":
            taken = a.fetch([Q])
            assert taken is not None
            field = taken[0]
        elif step == "key deleted":
            assert field is not None
            r.delete(KEYS.message("a", field))
        elif step == "acknowledged":
            assert field is not None
            a.ack(field)
    expire(r, a)
    for dead in b.scripts.heartbeat("b", b.timeout_ms, 10).dead:
        recover(b.scripts, r, dead)
    expected = [message(1)] if crash_after in ("queued", "fetched") else []
    assert drain(r, b, [Q]) == expected
    assert broker_keys(r, a) == [] and r.zscore(KEYS.registry, "a") is None


@pytest.mark.parametrize("crash_after", ["fetched", "rejected"])
def test_a_crash_around_a_reject_loses_nothing(r: redis_lib.Redis, crash_after: str) -> None:
    r.lpush(Q, message(1))
    a, b = consumer(r, "a"), consumer(r, "b")
    taken = a.fetch([Q])
    assert taken is not None
    if crash_after == "rejected":
        assert a.requeue(taken[0], Q, front=False) == 1
    expire(r, a)
    for dead in b.scripts.heartbeat("b", b.timeout_ms, 10).dead:
        recover(b.scripts, r, dead)
    assert drain(r, b, [Q]) == [message(1)]


def test_a_recoverer_crash_between_reading_and_moving_loses_nothing(r: redis_lib.Redis) -> None:
    r.lpush(Q, message(1))
    a, b, c = consumer(r, "a"), consumer(r, "b"), consumer(r, "c")
    assert a.fetch([Q]) is not None
    expire(r, a)
    assert b.scripts.heartbeat("b", b.timeout_ms, 10).dead == ["a"]
    assert r.hkeys(a.inflight)  # B read A's fields ... and crashes before moving them
    expire(r, b)
    dead = c.scripts.heartbeat("c", c.timeout_ms, 10).dead
    assert sorted(dead) == ["a", "b"]
    for who in dead:
        recover(c.scripts, r, who)
    assert drain(r, c, [Q]) == [message(1)]
    assert r.zrange(KEYS.registry, 0, -1) == [b"c"]


def test_a_recovery_stopped_between_two_batches_is_finished_by_the_next(
    r: redis_lib.Redis,
) -> None:
    count = REQUEUE_BATCH + 20
    r.lpush(Q, *[message(n) for n in range(count)])
    a, b = consumer(r, "a"), consumer(r, "b")
    seqs = []
    while (taken := a.fetch([Q])) is not None:
        seqs.append(taken[0])
    expire(r, a)
    # The first batch moved, then the recoverer died: A stays registered (and dead).
    moved = b.scripts.requeue(
        "a", [(seq, Q) for seq in seqs[:REQUEUE_BATCH]], front=True, only_if_dead=True
    )
    assert moved == REQUEUE_BATCH
    assert r.zscore(KEYS.registry, "a") is not None
    assert recover(b.scripts, r, "a") == 20
    assert sorted(drain(r, b, [Q])) == sorted(message(n) for n in range(count))


def test_a_shutdown_restore_cut_short_is_finished_by_recovery(r: redis_lib.Redis) -> None:
    count = REQUEUE_BATCH + 5
    r.lpush(Q, *[message(n) for n in range(count)])
    a, b = consumer(r, "a"), consumer(r, "b")
    seqs = []
    while (taken := a.fetch([Q])) is not None:
        seqs.append(taken[0])
    # Its close restored one batch, then the process died before the rest.
    a.scripts.requeue("a", [(seq, Q) for seq in seqs[:REQUEUE_BATCH]], front=True)
    expire(r, a)
    assert recover(b.scripts, r, "a") == 5
    assert sorted(drain(r, b, [Q])) == sorted(message(n) for n in range(count))
