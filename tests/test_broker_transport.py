"""The reliable transport under kombu, against a real Redis: stock senders, our consumer.

Messages are published with kombu's stock Redis transport (what every
producer app uses) and consumed through `worker.broker.transport` with
kombu's own Consumer and `drain_events` (the poller the Celery worker's
event loop uses too).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import pytest
import redis as redis_lib
from hypothesis import given
from hypothesis import strategies as st
from kombu import Connection, Consumer, Message, Queue
from kombu.transport.virtual import Base64 as KombuBase64
from kombu.utils.json import loads as kombu_loads

from tests.support.broker_transport import (
    KEYS,
    consuming,
    drain,
    inflight,
    publish,
    queue,
)
from worker.broker.transport import (
    TRANSPORT_PATH,
    Base64,
    UntestedKombu,
    check_kombu,
    decode_envelope,
)


def acking(got: list[Any], field: str = "n") -> Callable[[Any, Message], None]:
    """A consumer callback that notes each body's `field` in `got`, then acknowledges."""

    def on_message(body: Any, message: Message) -> None:
        got.append(body[field])
        message.ack()

    return on_message


@pytest.fixture
def url(redis_url: str, redis: redis_lib.Redis) -> str:
    return redis_url  # `redis` empties the server first


def test_stock_published_messages_are_consumed_and_acks_remove_them(
    url: str, redis: redis_lib.Redis
) -> None:
    q = queue("tq")
    publish(url, q, [{"n": n} for n in range(5)])
    seen: list[int] = []
    held: list[int] = []

    def on_message(body: Any, message: Message) -> None:
        seen.append(body["n"])
        held.append(inflight(redis))
        message.ack()

    with consuming(url, [q], on_message) as conn:
        drain(conn, lambda: len(seen) == 5)
        assert redis.zscore(KEYS.registry, conn.channel_for_test.reliable.id) is not None
    assert seen == [0, 1, 2, 3, 4]
    assert held == [1, 1, 1, 1, 1]  # each was in Redis while its callback ran
    assert inflight(redis) == 0 and not redis.exists(KEYS.registry, "tq")


def test_the_inflight_copy_is_the_senders_bytes(url: str, redis: redis_lib.Redis) -> None:
    q = queue("tq")
    publish(url, q, [{"blob": "é" * 100_000}])
    sent = redis.lindex("tq", -1)
    stored: list[bytes] = []

    def on_message(body: Any, message: Message) -> None:
        consumer = conn.channel_for_test.reliable.id
        stored.extend(redis.lindex(key, 0) for key in redis.keys(KEYS.message(consumer, "*")))
        message.ack()

    with consuming(url, [q], on_message) as conn:
        drain(conn, lambda: bool(stored))
    assert stored == [sent]


def test_priorities_are_served_in_the_stock_transports_order(
    url: str, redis: redis_lib.Redis
) -> None:
    ours, stock = queue("ours"), queue("stock")
    for q in (ours, stock):
        for n, priority in enumerate([0, 9, 3, 0, 6, 9, 3]):
            publish(url, q, [{"n": n, "priority": priority}], priority=priority)

    def order(conn_kwargs: dict[str, Any], q: Queue) -> list[int]:
        got: list[int] = []
        with (
            Connection(url, **conn_kwargs) as conn,
            Consumer(conn.channel(), queues=[q], callbacks=[acking(got)], accept=["json"]),
        ):
            drain(conn, lambda: len(got) == 7)
        return got

    reliable = order({"transport": TRANSPORT_PATH}, ours)
    assert reliable == order({}, stock)
    assert reliable == [0, 3, 2, 6, 4, 1, 5]  # kombu on Redis: priority 0 first


def test_two_queues_are_both_consumed(url: str, redis: redis_lib.Redis) -> None:
    a, b = queue("qa"), queue("qb")
    publish(url, a, [{"q": "a", "n": n} for n in range(10)])
    publish(url, b, [{"q": "b", "n": n} for n in range(10)])
    got: list[str] = []

    with consuming(url, [a, b], acking(got, "q")) as conn:
        drain(conn, lambda: len(got) == 20)
        assert "a" in got[:4] and "b" in got[:4]  # round robin, not one queue first
    assert sorted(got) == ["a"] * 10 + ["b"] * 10


def test_prefetched_unacked_messages_go_back_in_order_at_close(
    url: str, redis: redis_lib.Redis
) -> None:
    q = queue("tq")
    publish(url, q, [{"n": n} for n in range(6)])
    got: list[int] = []

    with consuming(url, [q], lambda body, message: got.append(body["n"]), prefetch=3) as conn:
        drain(conn, lambda: len(got) == 3)
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=1)  # the prefetch limit: nothing more
        assert inflight(redis) == 3 and redis.llen("tq") == 3
    assert got == [0, 1, 2]
    assert inflight(redis) == 0 and not redis.exists(KEYS.registry)
    again: list[int] = []

    with consuming(url, [q], acking(again)) as conn:
        drain(conn, lambda: len(again) == 6)
    assert again == [0, 1, 2, 3, 4, 5]


def test_reject_requeues_at_the_back_or_drops(url: str, redis: redis_lib.Redis) -> None:
    q = queue("tq")
    publish(url, q, [{"n": n} for n in range(3)])
    got: list[int] = []

    def on_message(body: Any, message: Message) -> None:
        got.append(body["n"])
        if body["n"] == 0 and got.count(0) == 1:
            message.reject(requeue=True)
        elif body["n"] == 1:
            message.reject(requeue=False)
        else:
            message.ack()

    with consuming(url, [q], on_message) as conn:
        drain(conn, lambda: len(got) == 4)
    assert got == [0, 1, 2, 0]
    assert inflight(redis) == 0 and not redis.exists("tq")


def test_consuming_goes_on_after_the_script_cache_is_flushed(
    url: str, redis: redis_lib.Redis
) -> None:
    q = queue("tq")
    got: list[int] = []

    with consuming(url, [q], acking(got)) as conn:
        publish(url, q, [{"n": 0}])
        drain(conn, lambda: len(got) == 1)
        redis.script_flush()  # as after a Redis restart
        publish(url, q, [{"n": 1}, {"n": 2}])
        drain(conn, lambda: len(got) == 3)
    assert got == [0, 1, 2]


def test_a_message_that_is_not_kombu_json_is_parked_and_consuming_goes_on(
    url: str, redis: redis_lib.Redis
) -> None:
    q = queue("tq")
    publish(url, q, [{"n": 0}])
    redis.lpush("tq", b"\xff not json")
    publish(url, q, [{"n": 1}])
    got: list[int] = []

    with consuming(url, [q], acking(got)) as conn:
        drain(conn, lambda: len(got) == 2)
    assert got == [0, 1]
    assert redis.lrange(KEYS.unparsable, 0, -1) == [b"\xff not json"]
    assert inflight(redis) == 0


def test_a_message_kombu_cannot_deliver_is_parked_not_redelivered_forever(
    url: str, redis: redis_lib.Redis
) -> None:
    # JSON with a delivery tag, but a body that is not base64: kombu's Message()
    # raises inside the delivery. Restored at close, it would fail every restart.
    q = queue("tq")
    bad = json.dumps(
        {
            "body": "abc",
            "content-type": "application/json",
            "headers": {},
            "properties": {
                "delivery_tag": "bad-1",
                "body_encoding": "base64",
                "delivery_info": {"exchange": "tq", "routing_key": "tq"},
            },
        }
    ).encode()
    redis.lpush("tq", bad)
    publish(url, q, [{"n": 1}])
    got: list[int] = []

    with consuming(url, [q], acking(got)) as conn:
        drain(conn, lambda: len(got) == 1)  # the bad one parked, not raised: consuming goes on
    assert got == [1]
    assert redis.lrange(KEYS.unparsable, 0, -1) == [bad]
    assert inflight(redis) == 0 and not redis.exists("tq")


def test_a_message_whose_delivery_raises_a_key_error_is_parked_too(
    url: str, redis: redis_lib.Redis
) -> None:
    # kombu counts KeyError among connection errors; raised by a delivery it is the message's.
    q = queue("tq")
    publish(url, q, [{"n": 0}, {"n": 1}])
    sent = redis.lindex("tq", -1)
    got: list[int] = []

    def on_message(body: Any, message: Message) -> None:
        if body["n"] == 0:
            raise KeyError("a field the consumer needs")
        got.append(body["n"])
        message.ack()

    with consuming(url, [q], on_message) as conn:
        drain(conn, lambda: len(got) == 1)
    assert redis.lrange(KEYS.unparsable, 0, -1) == [sent]
    assert inflight(redis) == 0 and not redis.exists("tq")


def test_a_task_in_a_priority_queue_wakes_an_idle_consumer(
    url: str, redis: redis_lib.Redis
) -> None:
    # Idle, the consumer blocks on the default-priority list; a message
    # elsewhere is found by the next fetch (after the wait's timeout).
    q = queue("tq")
    got: list[int] = []

    with consuming(url, [q], acking(got)) as conn:
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=1.5)  # now waiting
        publish(url, q, [{"n": 9}], priority=9)
        publish(url, q, [{"n": 0}])
        drain(conn, lambda: len(got) == 2)
    assert sorted(got) == [0, 9]


def test_an_idle_consumer_waits_on_each_of_its_queues_in_turn(
    url: str, redis: redis_lib.Redis, redis_url: str
) -> None:
    waited: set[str] = set()
    monitor = redis_lib.Redis.from_url(redis_url, socket_timeout=2).monitor()
    with (
        consuming(url, [queue("qa"), queue("qb")], lambda body, message: None) as conn,
        monitor as commands,
    ):
        with suppress(TimeoutError):
            conn.drain_events(timeout=3.5)  # idle: three waits of 1 s, a fetch after each
        with suppress(redis_lib.TimeoutError):
            for event in commands.listen():
                if event["command"].startswith("BLMOVE "):
                    waited.add(event["command"].split()[1])
                if waited == {"qa", "qb"}:
                    break
    assert waited == {"qa", "qb"}


def test_basic_get_is_reliable_too(url: str, redis: redis_lib.Redis) -> None:
    q = queue("tq")
    publish(url, q, [{"n": 0}, {"n": 1}])
    with Connection(url, transport=TRANSPORT_PATH) as conn:
        channel = conn.channel()
        first = channel.basic_get("tq")
        assert first is not None and inflight(redis) == 1
        second = channel.basic_get("tq", no_ack=True)
        assert second is not None and inflight(redis) == 1  # a no-ack get keeps nothing
        assert channel.basic_get("tq") is None
        first.ack()
        assert inflight(redis) == 0
    assert [m.payload["n"] for m in (first, second)] == [0, 1]


def test_a_global_key_prefix_covers_the_transports_keys(url: str, redis: redis_lib.Redis) -> None:
    q = queue("tq")
    publish(url, q, [{"n": 0}], global_keyprefix="app1:")
    got: list[int] = []
    ids: list[str] = []

    def on_message(body: Any, message: Message) -> None:
        got.append(body["n"])
        ids.append(conn.channel_for_test.reliable.id)
        assert redis.hlen(f"app1:_eventbuffer.broker.inflight.{ids[0]}") == 1
        message.ack()

    with consuming(url, [q], on_message, global_keyprefix="app1:") as conn:
        drain(conn, lambda: len(got) == 1)
    assert got == [0]
    assert not [k for k in redis.keys("*") if not k.startswith(b"app1:")]


def test_an_untested_kombu_is_refused_with_one_line() -> None:
    check_kombu()  # the installed one is tested
    with pytest.raises(UntestedKombu) as refused:
        check_kombu("5.8.0")
    message = str(refused.value)
    assert "\n" not in message and "5.8.0" in message and "EVENT_BUFFER_BROKER_TRANSPORT" in message


def _decoded(codec: Any, body: Any) -> Any:
    try:
        return codec.decode(body)
    except Exception as exc:  # the same failure, kind and words
        return type(exc), str(exc)


@given(
    st.one_of(
        st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()),
        st.binary(max_size=300).map(base64.b64encode),
        st.binary(max_size=300).map(lambda b: base64.encodebytes(b).decode()),  # wrapped lines
        st.text(alphabet="ABCxyz0189+/=\n -_!é\ud800", max_size=40),
    )
)
def test_the_base64_codec_decodes_bodies_as_kombus_does(body: Any) -> None:
    """The transport's fast base64 decoder gives kombu's result, or kombu's error."""
    assert _decoded(Base64(), body) == _decoded(KombuBase64(), body)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["__type__", "__value__", "a", "body"]), inner, max_size=3
        )
    ),
    max_leaves=12,
)


@given(
    st.one_of(
        JSON_VALUES.map(lambda v: json.dumps(v).encode()),
        st.sampled_from(
            [
                b'{"__type__": "uuid", "__value__": "0b3f1e5c-6a34-4f2c-9c52-21f3b3a1b1a1"}',
                b'[{"__type__": "bytes", "__value__": "aGk="}]',
                b'{"a": NaN}',
                b'"\\ud800"',
                b"\xef\xbb\xbf{}",
                b"[" * 2000 + b"]" * 2000,
                b"\xff",
            ]
        ),
    )
)
def test_envelopes_decode_as_kombus_loads_decodes_them(raw: bytes) -> None:
    """The transport's envelope decoder gives kombu's value (types too), or kombu's error."""
    mine, kombu_s = _decoded_json(decode_envelope, raw), _decoded_json(kombu_loads, raw)
    assert repr(mine) == repr(kombu_s)


def _decoded_json(decode: Callable[[bytes], Any], raw: bytes) -> Any:
    try:
        return decode(raw)
    except Exception as exc:  # the same failure, kind and words
        return type(exc), str(exc)
