"""The reliable transport's own keys in the broker Redis, and its in-flight field names.

Beside kombu's queue lists (`<queue>`, `<queue>\\x06\\x16<priority>`, written
by stock senders) and its bindings, the transport keeps:

    _eventbuffer.broker.consumers            ZSET  consumer id -> heartbeat deadline (epoch ms,
                                                   server clock)
    _eventbuffer.broker.inflight.<consumer>  HASH  "<seq>:<source list>" -> raw message, every
                                                   message the consumer fetched and has not
                                                   acknowledged
    _eventbuffer.broker.unparsable           LIST  messages that are not kombu JSON, kept as
                                                   they were for an operator to look at

kombu's `global_keyprefix` transport option, when set, prefixes these as it
prefixes the queues. The names carry no Redis Cluster hash tag: a script
touches the queue lists too, whose names the senders choose, so the broker
cannot be a Redis Cluster (nor can it with stock kombu, whose BRPOP spans
every queue).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BrokerKeys:
    """Key names of the reliable transport under kombu's `global_keyprefix`."""

    global_prefix: str = ""

    @property
    def registry(self) -> str:
        return f"{self.global_prefix}_eventbuffer.broker.consumers"

    def inflight(self, consumer_id: str) -> str:
        return f"{self.global_prefix}_eventbuffer.broker.inflight.{consumer_id}"

    @property
    def unparsable(self) -> str:
        return f"{self.global_prefix}_eventbuffer.broker.unparsable"


def inflight_field(seq: int, source: str) -> str:
    """The in-flight field broker_fetch.lua writes for message `seq` taken from `source`."""
    return f"{seq}:{source}"


def as_text(value: object) -> str:
    """A name Redis returned (bytes) as text."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def seq_of(field: bytes | str) -> int:
    """The consumer's sequence number of an in-flight message (fetch order)."""
    return int(as_text(field).split(":", 1)[0])


def source_of(field: bytes | str) -> str:
    """The list an in-flight field's message was taken from (where it goes back)."""
    return as_text(field).split(":", 1)[1]


def oldest_last(fields: list[bytes | str]) -> list[bytes | str]:
    """Fields newest first: pushed in this order to the front of their queues, the oldest
    message is again the first in line."""
    return sorted(fields, key=seq_of, reverse=True)
