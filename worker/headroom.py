"""Room a producer leaves the workers: no publishing into a broker Redis that is nearly full.

When the broker is the buffer's own Redis (the default layout), queued task
messages can fill it to `maxmemory`. Every apply is then refused (it writes
the batch's rows before the task's message is deleted), the buffer is empty
so no flush frees anything, and ingest is stuck although each applied task
would free more than it takes (a queued event's message is larger than its
buffered row: README "How big Redis must be"). `benchmarks/bench_outage.py`
found that state after a ClickHouse outage, with producers retrying their
held batches into the freshly drained Redis.

So `EventProducer` checks the broker's memory (one `INFO memory`, at most
once a second) and holds its batches, as it holds any batch the broker
refuses, while a Redis broker with a `maxmemory` is above `LIMIT` of it: the
last 5 % is the workers'. For a few seconds per batch at most
(`worker.producer_sender.HEADROOM_WAIT_MAX_S`): memory Redis holds apart from the
buffer could keep it above the limit for good, and a producer must not wait
on that forever. A producer that publishes with a plain `send_task`
gets no such care: give the broker a Redis of its own to rule the state out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import urlsplit

import redis

from worker.errors import ProducerError

#: A producer stops publishing above this share of the broker Redis' maxmemory.
LIMIT = 0.95
#: How often it asks.
EVERY_S = 1.0


class BrokerNearlyFull(ProducerError):
    """The broker Redis is above LIMIT of its maxmemory: the batch waits in the producer."""


class Headroom:
    """The broker Redis' memory, read at most every `every_s` seconds."""

    def __init__(
        self,
        broker_url: str,
        *,
        limit: float = LIMIT,
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.every_s = every_s
        self.clock = clock
        self._client: redis.Redis | None = None
        if urlsplit(broker_url).scheme in ("redis", "rediss"):
            try:
                self._client = redis.Redis.from_url(
                    broker_url, socket_timeout=2, socket_connect_timeout=2
                )
            except ValueError:  # a URL only kombu understands (failover lists): no check
                self._client = None
        self._checked_at = float("-inf")
        self._ratio = 0.0

    def ratio(self) -> float:
        """used_memory / maxmemory (0 without a limit, or when Redis does not answer)."""
        if self._client is None:
            return 0.0
        now = self.clock()
        if now - self._checked_at >= self.every_s:
            self._checked_at = now
            try:
                info = self._client.info("memory")
                maximum = int(info.get("maxmemory", 0))
                self._ratio = int(info["used_memory"]) / maximum if maximum else 0.0
            except (redis.RedisError, OSError, KeyError, ValueError):
                self._ratio = 0.0  # the publish itself will say what is wrong
        return self._ratio

    def check(self, held: int) -> None:
        """Raise BrokerNearlyFull (with the `held` events) while the broker is above the limit."""
        ratio = self.ratio()
        if ratio > self.limit:
            raise BrokerNearlyFull(
                f"the broker Redis is at {100 * ratio:.0f} % of its maxmemory (over "
                f"{100 * self.limit:.0f} %): the batch waits here, leaving the rest to the "
                "workers",
                held,
            )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
