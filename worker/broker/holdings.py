"""What the reliable transport holds in a broker Redis: `eventbuffer status` and the metrics.

A task a worker fetched and has not acknowledged is in no queue: it sits in
that worker's keeping (`worker.broker.broker_consumer`). While the worker lives, it
is being run (or waits in its prefetch). When the worker dies, the task
waits until its heartbeat deadline passes and a live worker's next
heartbeat puts it back in its queue: up to a timeout and one beat interval
after the last heartbeat. A queue depth of 0 then is not "done", so this
tells them apart:

- held by live consumers (deadline ahead), and among them the silent ones
  (no heartbeat for more than two beat intervals: dead, most likely, and
  their tasks come back at the deadline);
- held by dead consumers (deadline passed), with when they are due back:
  the deadline plus one beat interval, if any consumer is alive to do it;
- parked: messages kombu cannot deliver, kept unchanged in
  `_eventbuffer.broker.unparsable` for an operator.

Deadlines are the broker server's clock (broker_heartbeat.lua), so ages are
computed against its TIME, not this host's. The beat interval comes from
EVENT_BUFFER_CONSUMER_TIMEOUT_S, which every worker of one broker shares.
Read-only: two pipelined round trips.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from worker.broker.broker_consumer import BEATS_PER_TIMEOUT
from worker.broker.broker_keys import BrokerKeys
from worker.replies import number, text

#: A consumer with no heartbeat for this many beat intervals is shown as silent.
SILENT_BEATS = 2
TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Holder:
    """One registered consumer: how many messages it holds and when its deadline is."""

    consumer: str
    held: int
    deadline_ms: int  # broker clock: dead once it has passed


@dataclass(frozen=True)
class Holdings:
    now_ms: int  # the broker server's clock
    timeout_ms: int  # EVENT_BUFFER_CONSUMER_TIMEOUT_S
    parked: int
    holders: list[Holder] = field(default_factory=list)

    @property
    def beat_ms(self) -> int:
        return max(50, self.timeout_ms // BEATS_PER_TIMEOUT)

    def alive(self, holder: Holder) -> bool:
        return holder.deadline_ms >= self.now_ms

    @property
    def live(self) -> list[Holder]:
        return [h for h in self.holders if self.alive(h)]

    @property
    def dead(self) -> list[Holder]:
        return [h for h in self.holders if not self.alive(h)]

    @property
    def held_by_live(self) -> int:
        return sum(h.held for h in self.live)

    @property
    def held_by_dead(self) -> int:
        return sum(h.held for h in self.dead)

    def silence_s(self, holder: Holder) -> float:
        """Time since the consumer's last heartbeat (its deadline minus the timeout)."""
        return max(0, self.now_ms - (holder.deadline_ms - self.timeout_ms)) / 1000

    def silent(self, holder: Holder) -> bool:
        return self.silence_s(holder) * 1000 > SILENT_BEATS * self.beat_ms

    def due_in_s(self, holder: Holder) -> float:
        """Until a consumer's tasks are put back if it stays silent: its deadline plus one
        beat of a live consumer. Negative: overdue (no live consumer, or recovery fails)."""
        return (holder.deadline_ms + self.beat_ms - self.now_ms) / 1000

    @property
    def recovery_due_s(self) -> float:
        """Until every task of a dead consumer is due back (0: none held by one, or overdue)."""
        holding = [h for h in self.dead if h.held]
        return max([0.0, *(self.due_in_s(h) for h in holding)])

    def as_dict(self) -> dict[str, Any]:
        return {
            "held_by_live": self.held_by_live,
            "held_by_dead": self.held_by_dead,
            "live_consumers": len(self.live),
            "parked": self.parked,
            "recovery_due_s": round(self.recovery_due_s, 3),
            "beat_s": self.beat_ms / 1000,
            "consumers": [
                {
                    "consumer": h.consumer,
                    "held": h.held,
                    "alive": self.alive(h),
                    "silent_s": round(self.silence_s(h), 3),
                    "silent": self.silent(h),
                    "due_in_s": round(self.due_in_s(h), 3),
                }
                for h in self.holders
            ],
        }


def read_holdings(redis: Redis, keys: BrokerKeys, timeout_s: float) -> Holdings:
    """Every registered consumer with what it holds, and the parked messages (read-only)."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.zrange(keys.registry, 0, -1, withscores=True)
        pipe.llen(keys.unparsable)
        (seconds, micros), registered, parked = pipe.execute()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    consumers = [(text(member), int(score)) for member, score in registered]
    held: list[Any] = []
    if consumers:
        with redis.pipeline(transaction=False) as pipe:
            for consumer_id, _ in consumers:
                pipe.hlen(keys.inflight(consumer_id))
            # An index that is not a hash (no fetch wrote it) holds nothing: not an error.
            held = [
                0 if isinstance(n, Exception) else n for n in pipe.execute(raise_on_error=False)
            ]
    holders = [
        Holder(consumer_id, number(n), deadline)
        for (consumer_id, deadline), n in zip(consumers, held, strict=True)
    ]
    return Holdings(now_ms, round(timeout_s * 1000), number(parked), holders)


def broker_holdings(url: str, timeout_s: float, keys: BrokerKeys | None = None) -> Holdings | None:
    """`read_holdings` of a Redis broker's URL; None for another broker (RabbitMQ).

    Raises the client's error when the broker does not answer.
    """
    if url.split("://", 1)[0] not in ("redis", "rediss", "unix"):
        return None
    client = Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S)
    try:
        return read_holdings(client, keys or BrokerKeys(), timeout_s)
    finally:
        client.close()
