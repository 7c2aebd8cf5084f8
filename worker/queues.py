"""How many tasks wait in the broker's queues: what `eventbuffer status` shows of the broker.

A task sent by name without `queue=` lands in Celery's default queue
`celery`; eventbuffer's ingest workers consume it too, but a worker started
with `-Q ingest` alone does not, and the tasks would wait there unseen.
Showing every queue's depth (and, on RabbitMQ, its consumers) makes that
visible.

Redis broker: kombu keeps a queue as a list named after it, plus one list
per priority level (`<name>\\x06\\x16<priority>`); the depth is their sum.
RabbitMQ: a passive declare returns the queue's messages and consumers.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from redis import Redis

from worker.names import DEFAULT_QUEUE, FLUSH_QUEUE, INGEST_QUEUE
from worker.replies import number

QUEUES = (INGEST_QUEUE, FLUSH_QUEUE, DEFAULT_QUEUE)
# kombu's Redis transport: the separator and priority levels of its sub-queues.
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
TIMEOUT_S = 2.0


@dataclass(frozen=True)
class QueueDepth:
    name: str
    waiting: int
    consumers: int | None  # None where the broker cannot tell (Redis)


def redis_list_names(queue: str) -> list[str]:
    return [queue if p == 0 else f"{queue}{PRIORITY_SEPARATOR}{p}" for p in PRIORITY_STEPS]


def queue_depths(broker_url: str, names: Sequence[str] = QUEUES) -> list[QueueDepth]:
    """The depth of each queue; raises the client's error when the broker does not answer."""
    scheme = broker_url.split("://", 1)[0]
    if scheme in ("redis", "rediss", "unix"):
        return _redis_depths(broker_url, names)
    if scheme in ("amqp", "amqps", "pyamqp"):
        return _amqp_depths(broker_url, names)
    return []


def _redis_depths(url: str, names: Sequence[str]) -> list[QueueDepth]:
    client = Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S)
    try:
        pipe = client.pipeline(transaction=False)
        for name in names:
            for key in redis_list_names(name):
                pipe.llen(key)
        replies = pipe.execute()
    finally:
        client.close()
    per = len(PRIORITY_STEPS)
    return [
        QueueDepth(name, sum(number(n) for n in replies[i * per : (i + 1) * per]), None)
        for i, name in enumerate(names)
    ]


def _amqp_depths(url: str, names: Sequence[str]) -> list[QueueDepth]:
    from amqp.exceptions import NotFound
    from kombu.connection import Connection

    depths = []
    connection: Any = Connection(url, connect_timeout=TIMEOUT_S)
    with connection:
        for name in names:
            channel = connection.channel()
            try:
                _, waiting, consumers = channel.queue_declare(name, passive=True)
            except NotFound:  # never declared: nobody sent to it or consumed it
                waiting, consumers = 0, 0
            finally:
                with suppress(Exception):  # the server closed it after NotFound
                    channel.close()
            depths.append(QueueDepth(name, int(waiting), int(consumers)))
    return depths
