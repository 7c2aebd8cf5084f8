"""Publishing with kombu's stock Redis transport, consuming with the reliable one."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import redis as redis_lib
from kombu import Connection, Consumer, Exchange, Message, Producer, Queue

from worker.broker.broker_keys import BrokerKeys
from worker.broker.transport import TRANSPORT_PATH

KEYS = BrokerKeys()


def queue(name: str) -> Queue:
    return Queue(name, Exchange(name), routing_key=name)


def publish(url: str, q: Queue, bodies: list[Any], priority: int = 0, **options: Any) -> None:
    """Publish with kombu's stock Redis transport."""
    with Connection(url, transport_options=options) as conn:
        producer = Producer(conn.channel())
        for body in bodies:
            producer.publish(
                body, exchange=q.exchange, routing_key=q.routing_key, declare=[q], priority=priority
            )


@contextmanager
def consuming(
    url: str,
    queues: list[Queue],
    on_message: Callable[[Any, Message], None],
    prefetch: int = 0,
    **options: Any,
) -> Iterator[Any]:
    """A kombu Consumer on the reliable transport; yields the connection (drain_events)."""
    with Connection(url, transport=TRANSPORT_PATH, transport_options=options) as conn:
        channel = conn.channel()
        consumer = Consumer(channel, queues=queues, callbacks=[on_message], accept=["json"])
        if prefetch:
            consumer.qos(prefetch_count=prefetch)
        with consumer:
            conn.channel_for_test = channel
            yield conn


def drain(conn: Any, until: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError("timed out draining events")
        with suppress(TimeoutError):
            conn.drain_events(timeout=0.5)


def inflight(r: redis_lib.Redis) -> int:
    """Messages held by consumers: index entries, and message keys (the same, or a leak)."""
    entries = sum(int(r.hlen(k)) for k in r.scan_iter(match=KEYS.inflight("*")))
    messages = len(list(r.scan_iter(match=KEYS.message("*", "*"))))
    assert entries == messages, f"{entries} index entries but {messages} message keys"
    return entries
