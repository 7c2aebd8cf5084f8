"""The pieces that keep hostile messages from stopping a worker, one at a time, on a real Redis.

The whole worker is in tests/test_hostile_envelopes.py and tests/test_envelope_fuzz.py;
here: which envelopes the transport refuses, the cut record of an oversized message
(parked in one MULTI, or kept when Redis refuses), a dead consumer's forged in-flight
entries and destinations, whole-batch dead letters cut to the size limit, and the
bounded wait of an undeliverable task's dead letter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis as redis_lib
from kombu import Message

from tests.support.broker_transport import consuming, drain, inflight, publish, queue
from tests.support.envelopes import encoded, task_envelope
from tests.support.servers import RedisServer, start_redis
from worker import runtime
from worker.broker.broker_consumer import BrokerConsumer, held_by_consumers, recover
from worker.broker.broker_keys import BrokerKeys, forged_entries, oldest_last
from worker.broker.envelope import OversizedHeader, envelope_problem, oversized_record
from worker.broker.holdings import read_holdings
from worker.buffer import EventBuffer
from worker.consumer import RETRY_ATTEMPTS, header_problem, keep_undeliverable
from worker.deadletters import REASON_INGEST_FAILED, decode_dead_letter
from worker.ingestion import dead_letter_batch
from worker.keys import ShardKeys
from worker.settings import Settings

KEYS = BrokerKeys()


def valid() -> dict[str, Any]:
    return task_envelope([{"project_id": "p", "name": "x", "created_at": 1}])


def changed(path: str, value: Any) -> dict[str, Any]:
    envelope = valid()
    *parents, leaf = path.split(".")
    node = envelope
    for name in parents:
        node = node[name]
    node[leaf] = value
    return envelope


@pytest.mark.parametrize(
    ("envelope", "problem"),
    [
        ([1, 2], "an array, not a kombu envelope"),
        (changed("properties", None), "properties is null"),
        (changed("properties.delivery_tag", [1]), "delivery_tag is an array"),
        (changed("properties.delivery_tag", {"a": 1}), "delivery_tag is an object"),
        (changed("properties.delivery_tag", ""), "not a non-empty string"),
        (changed("properties.body_encoding", "rot13"), "'rot13' is not one kombu decodes"),
        (changed("properties.body_encoding", 5), "5 is not one kombu decodes"),
        (changed("body", None), "body is null"),
        (changed("body", {"a": 1}), "body is an object"),
        (changed("headers", [1]), "headers is an array"),
        (changed("properties.delivery_info", "x"), "delivery_info is a string"),
        (changed("content-type", 7), "content-type is a int"),
    ],
)
def test_envelopes_kombu_cannot_deliver_are_named(envelope: Any, problem: str) -> None:
    found = envelope_problem(envelope)
    assert found is not None and problem in found


def test_valid_envelopes_pass() -> None:
    assert envelope_problem(valid()) is None
    assert envelope_problem(changed("properties.body_encoding", "UTF-8")) is None
    assert envelope_problem(changed("headers", None)) is None


@pytest.mark.parametrize(
    ("header", "value", "problem"),
    [
        ("id", {"a": 1}, "headers.id is an object"),
        ("id", "", "headers.id is a string, not a non-empty"),
        ("timelimit", "abc", "headers.timelimit 'abc'"),
        ("timelimit", [1, "x"], "headers.timelimit"),
        ("timelimit", [-1, None], "headers.timelimit"),
        ("eta", "tomorrow", "not an ISO 8601 date"),
        ("expires", 5, "headers.expires is a int"),
        ("retries", True, "headers.retries is a bool"),
        ("parent_id", [1], "headers.parent_id is an array"),
        ("kwargsrepr", {}, "headers.kwargsrepr is an object"),
    ],
)
def test_celery_headers_celery_would_fail_on_are_named(
    header: str, value: Any, problem: str
) -> None:
    headers = dict(valid()["headers"], **{header: value})
    found = header_problem(headers)
    assert found is not None and problem in found
    assert header_problem(valid()["headers"]) is None
    assert header_problem(dict(valid()["headers"], timelimit=[30, 25.5])) is None


def test_an_oversized_record_says_what_was_cut() -> None:
    raw = b"a" * 3_000_000 + b'"headers": {"id": "t-1"}'
    record = oversized_record(raw, 2_000_000)
    line, _, head = record.partition(b"\n")
    header = msgspec.json.decode(line, type=OversizedHeader)
    assert (header.bytes, header.limit, header.kept) == (len(raw), 2_000_000, 1 << 20)
    assert head == raw[: 1 << 20]
    assert header.tail.endswith('"id": "t-1"}')
    with pytest.raises(ValueError):
        json.loads(record)  # not an envelope: moved back to a queue, it is parked again


# -- the oversized message, in the consumer's keeping -------------------------------------


@pytest.fixture
def own(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path / "own-redis")
    try:
        yield server
    finally:
        server.stop()


def test_an_oversized_message_is_cut_without_being_delivered(
    redis_url: str, redis: redis_lib.Redis
) -> None:
    q = queue("tq")
    big = encoded(changed("body", "x" * 200_000))
    redis.lpush("tq", big)
    publish(redis_url, q, [{"n": 1}])
    got: list[Any] = []

    def on_message(body: Any, message: Message) -> None:
        got.append(body)
        message.ack()

    with consuming(redis_url, [q], on_message, max_message_bytes=100_000) as conn:
        drain(conn, lambda: bool(got))
    assert got == [{"n": 1}]
    [record] = redis.lrange(KEYS.unparsable, 0, -1)
    assert record.startswith(b'{"eventbuffer":"message too large: cut","bytes":%d' % len(big))
    assert inflight(redis) == 0 and redis.llen("tq") == 0


def test_an_oversized_message_redis_refuses_to_park_stays_in_redis(own: RedisServer) -> None:
    r = own.client()
    r.lpush("tq", b"y" * 1000)
    who = BrokerConsumer(r, KEYS, 30, consumer_id="c1")
    taken = who.fetch(["tq"])
    assert taken is not None
    seq, fetched = taken
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", max(1, used // 2))  # past maxmemory: MULTI with LPUSH refused
    try:
        assert not who.keep_unparsable((seq, oversized_record(fetched.raw, 100)))
        assert who.unparked == 1 and r.hlen(who.inflight) == 1  # kept, both or neither
    finally:
        r.config_set("maxmemory", 0)
    assert who.retry_parking() == 0
    [record] = r.lrange(KEYS.unparsable, 0, -1)
    assert record.endswith(b"\n" + b"y" * 100)
    assert r.hlen(who.inflight) == 0 and not r.exists(KEYS.message("c1", seq))


# -- forged in-flight entries ---------------------------------------------------------------


def test_forged_index_entries_are_told_apart() -> None:
    index = {b"1": b"ingest", b"abc": b"ingest", b"9e9": b"q", b"2": b"\xff", b"12": b"q"}
    assert oldest_last(index) == [(12, "q"), (1, "ingest")]
    assert sorted(forged_entries(index)) == [b"2", b"9e9", b"abc"]


def test_a_dead_consumers_forged_entries_and_destinations_do_not_stop_its_recovery(
    redis: redis_lib.Redis,
) -> None:
    dead = BrokerConsumer(redis, KEYS, 0.001, consumer_id="dead")
    redis.lpush("q", b"m1", b"m2")
    assert dead.fetch(["q"]) is not None and dead.fetch(["q"]) is not None
    redis.hset(dead.inflight, mapping={"abc": "q", "3": "wrong"})  # forged: a bad seq...
    redis.rpush(KEYS.message("dead", 3), b"m3")
    redis.set("wrong", "not a list")  # ... and a destination that is not a list
    redis.zadd(KEYS.registry, {"dead": 1})
    live = BrokerConsumer(redis, KEYS, 30, consumer_id="live")
    assert recover(live.scripts, redis, "dead") == 3
    assert redis.lrange("q", 0, -1) == [b"m2", b"m1"]  # in their order, at the front
    assert redis.lrange(KEYS.unparsable, 0, -1) == [b"m3"]
    assert not redis.exists(dead.inflight) and redis.zscore(KEYS.registry, "dead") is None


# -- dead letters of whole batches ------------------------------------------------------------


def test_a_whole_batch_dead_letter_is_cut_to_the_message_size_limit(
    redis: redis_lib.Redis, settings: Settings
) -> None:
    buffer = EventBuffer(redis, replace(settings, max_message_bytes=100_000))
    raw = b"[" + b'{"a":1},' * 50_000 + b"{}]"
    assert dead_letter_batch(buffer, raw, "b1", reason=REASON_INGEST_FAILED, error="boom", task="t")
    [entry] = redis.lrange(ShardKeys("eventbuffer", 0).dead, 0, -1)
    header, payload = decode_dead_letter(entry)
    assert payload == raw[:100_000]
    assert f"raw batch of {len(raw)} bytes cut to its first 100000" in header.error


def test_an_undeliverable_task_is_parked_once_its_dead_letter_waited_long_enough(
    own: RedisServer, redis_url: str, redis: redis_lib.Redis, tmp_path: Path
) -> None:
    # The buffer (our own Redis) is away; the broker is the session's. After the last
    # attempt the message is not tried again: it is parked, unchanged, in the broker.
    q = queue("tq")
    publish(redis_url, q, [{"n": 0}])
    sent = redis.lindex("tq", -1)
    held: list[Message] = []
    runtime.configure(
        Settings.from_env({"REDIS_URL": own.url, "CLICKHOUSE_URL": f"chdb://{tmp_path}"})
    )
    try:
        with consuming(redis_url, [q], lambda body, message: held.append(message)) as conn:
            drain(conn, lambda: bool(held))
            [message] = held
            own.kill()
            keep_undeliverable(
                message, "eventbuffer.nope", "NotRegistered", (), None, 30.0, RETRY_ATTEMPTS
            )
            assert redis.lrange(KEYS.unparsable, 0, -1) == [sent]
            assert inflight(redis) == 0
    finally:
        runtime.reset()
        own.start()


def test_status_counts_held_tasks_whatever_the_registry_holds(redis: redis_lib.Redis) -> None:
    redis.zadd(KEYS.registry, {"forged": 1, b"\xff\xfe": 2, "real": 3})
    redis.set(KEYS.inflight("forged"), "not a hash")
    redis.hset(KEYS.inflight("real"), mapping={"1": "q", "2": "q"})
    assert held_by_consumers(redis, KEYS) == 2
    holdings = read_holdings(redis, KEYS, 30)
    assert holdings.held_by_dead == 2 and len(holdings.holders) == 3


def test_the_message_limit_leaves_room_for_a_producers_fullest_batch() -> None:
    assert Settings().message_limit_bytes == 16 << 20  # 100 events of 64 KiB: 8.7 MB in base64
    big = Settings.from_env({"EVENT_BUFFER_MAX_EVENT_BYTES": "500000"})
    assert big.message_limit_bytes > 100 * 500_000 * 4 // 3
    assert (
        Settings.from_env({"EVENT_BUFFER_MAX_MESSAGE_BYTES": "70000"}).message_limit_bytes == 70000
    )
