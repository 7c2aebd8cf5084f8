"""The reliable transport's own keys in the broker Redis.

Beside kombu's queue lists (`<queue>`, `<queue>\\x06\\x16<priority>`, written
by stock senders) and its bindings, the transport keeps:

    _eventbuffer.broker.consumers                  ZSET  consumer id -> heartbeat deadline
                                                         (epoch ms, server clock)
    _eventbuffer.broker.inflight.<consumer>        HASH  seq -> the list message <seq> came
                                                         from: every message the consumer
                                                         fetched and has not acknowledged
    _eventbuffer.broker.message.<consumer>.<seq>   LIST  that message, alone, its bytes as
                                                         the sender wrote them
    _eventbuffer.broker.unparsable                 LIST  messages kombu cannot deliver (or
                                                         Celery cannot run), kept unchanged
                                                         for an operator; a too large one cut
                                                         (worker/broker/envelope.py)
    _eventbuffer.broker.idle                       LIST  never written: an idle consumer of a
                                                         full broker waits on it (BLPOP)

kombu's `global_keyprefix` transport option, when set, prefixes these as it
prefixes the queues. The names carry no Redis Cluster hash tag: a script
touches the queue lists too, whose names the senders choose, so the broker
cannot be a Redis Cluster (nor can it with stock kombu, whose BRPOP spans
every queue).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worker.replies import number, text


@dataclass(frozen=True)
class BrokerKeys:
    """Key names of the reliable transport under kombu's `global_keyprefix`."""

    global_prefix: str = ""

    @property
    def registry(self) -> str:
        return f"{self.global_prefix}_eventbuffer.broker.consumers"

    def inflight(self, consumer_id: str) -> str:
        return f"{self.global_prefix}_eventbuffer.broker.inflight.{consumer_id}"

    def message(self, consumer_id: str, seq: int | str) -> str:
        return f"{self.global_prefix}_eventbuffer.broker.message.{consumer_id}.{seq}"

    @property
    def idle(self) -> str:
        return f"{self.global_prefix}_eventbuffer.broker.idle"

    @property
    def unparsable(self) -> str:
        return f"{self.global_prefix}_eventbuffer.broker.unparsable"


def oldest_last(index: Mapping[Any, Any]) -> list[tuple[int, str]]:
    """An in-flight index as (seq, source) pairs, newest first: pushed in this order to the
    front of their queues, the oldest message is again the first in line. Entries no
    fetch wrote (see `forged_entries`) are left out."""
    pairs = []
    for seq, source in index.items():
        if _seq(seq) is not None and _source(source) is not None:
            pairs.append((number(seq), text(source)))
    return sorted(pairs, reverse=True)


def forged_entries(index: Mapping[Any, Any]) -> list[Any]:
    """Fields of an in-flight index that no fetch wrote: a seq that is not a decimal
    number, or a source that is not text. Anyone who can write to the broker can add
    them; left in place, they would keep a dead consumer from ever being recovered."""
    return [seq for seq, source in index.items() if _seq(seq) is None or _source(source) is None]


def _seq(value: Any) -> int | None:
    raw = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 18 else None


def _source(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return str(value)
