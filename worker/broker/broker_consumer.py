"""A consumer of the reliable transport: its id, its in-flight messages, its heartbeat.

A consumer is one consuming kombu channel (in a Celery worker: the main
process's task channel). Every message it fetches sits under a key of its
own, listed in the consumer's in-flight index, until acknowledged (DEL and
HDEL), rejected (back to its queue) or, at shutdown, restored (back to the
front of its queue). A heartbeat thread pushes the consumer's deadline in
the registry forward every fifth of the timeout, and on each beat puts back
the messages of consumers whose deadline has passed: a worker killed with
SIGKILL, or one that never comes back, has its tasks run by any live worker
within about 1.2 timeouts.

A message kombu cannot deliver is parked, unchanged, on the unparsable
list. One Redis refuses to park (out of memory, connection lost) is never
dropped: it waits in the consumer (a fetched one stays in its keeping in
Redis; a no-ack one, already popped, in memory) and the next heartbeat
tries again.

The heartbeat is a thread, not an event-loop timer, so that a long task on
the solo pool (which blocks the event loop) does not make its worker look
dead. A worker that is alive but stuck keeps its tasks, as it would on
RabbitMQ while its connection stays open.

Nothing here knows kombu: `worker.broker.transport` drives it, and the tests
drive it directly against a real Redis.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.broker.broker_keys import BrokerKeys, forged_entries, oldest_last
from worker.broker.broker_scripts import BrokerScripts, Fetched
from worker.errors import ConsumerAlive
from worker.replies import number, text

log = logging.getLogger("worker.broker")

#: Fields moved per broker_requeue.lua call, so one call stays short.
REQUEUE_BATCH = 100
#: Dead consumers listed per heartbeat (the rest on the next beats).
DEAD_PER_BEAT = 10
#: Beats per consumer timeout.
BEATS_PER_TIMEOUT = 5


#: A message waiting to be parked: see BrokerConsumer.keep_unparsable.
Unparked = int | bytes | tuple[int, bytes]


def new_consumer_id() -> str:
    """A consumer id: host and pid for the operator, random so a reused pid is a new consumer."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def put_back(
    scripts: BrokerScripts, redis: Redis, consumer_id: str, *, only_if_dead: bool, deregister: bool
) -> int:
    """Every message a consumer holds back to the front of its queue, oldest first in line.

    With `deregister`, the consumer leaves the registry once its index is
    empty. Returns how many messages moved; with `only_if_dead`, raises
    ConsumerAlive if its deadline moved on (it beat again), leaving the rest
    where they are.
    """
    index = scripts.keys.inflight(consumer_id)
    entries = redis.hgetall(index)
    forged = forged_entries(entries)
    if forged:  # no fetch wrote them: they would keep the index (and the entry) forever
        redis.hdel(index, *forged)
        log.warning(
            "broker consumer %s: %d in-flight index entr(y/ies) no fetch wrote removed "
            "(a seq that is not a number, or a source that is not text): %r",
            consumer_id,
            len(forged),
            forged[:5],
        )
    held = oldest_last(entries)
    batches = [held[i : i + REQUEUE_BATCH] for i in range(0, len(held), REQUEUE_BATCH)]
    batches = batches or [[]]  # an empty index: one call, to leave the registry
    moved = 0
    for i, batch in enumerate(batches):
        moved += scripts.requeue(
            consumer_id,
            batch,
            front=True,
            only_if_dead=only_if_dead,
            deregister=deregister and i == len(batches) - 1,
        )
    return moved


def recover(scripts: BrokerScripts, redis: Redis, consumer_id: str) -> int:
    """Put a dead consumer's messages back and remove it from the registry (see put_back)."""
    return put_back(scripts, redis, consumer_id, only_if_dead=True, deregister=True)


def held_by_consumers(redis: Redis, keys: BrokerKeys) -> int:
    """Messages in every registered consumer's in-flight index (fetched, not acknowledged).

    An index with entries always has a registry entry (broker_fetch.lua
    enters the consumer first; it leaves only once its index is empty).
    """
    consumers = [text(m) for m in redis.zrange(keys.registry, 0, -1)]
    if not consumers:
        return 0
    with redis.pipeline(transaction=False) as pipe:
        for consumer_id in consumers:
            pipe.hlen(keys.inflight(consumer_id))
        # An index that is not a hash (not one a fetch wrote) counts 0, not an error.
        replies = pipe.execute(raise_on_error=False)
        return sum(number(n) for n in replies if not isinstance(n, Exception))


class BrokerConsumer:
    def __init__(
        self,
        redis: Redis,
        keys: BrokerKeys,
        timeout_s: float,
        consumer_id: str | None = None,
    ) -> None:
        self.id = consumer_id or new_consumer_id()
        self.redis = redis
        self.keys = keys
        self.scripts = BrokerScripts(redis, keys)
        self.inflight = keys.inflight(self.id)
        self.timeout_ms = max(1, round(timeout_s * 1000))
        self._seq = itertools.count(1)
        self._heartbeat: Heartbeat | None = None
        self._pid = os.getpid()
        self.closed = False
        # Messages to park that Redis refused (OOM, a lost connection): the seq of one in
        # this consumer's keeping, or the bytes of a no-ack one (then only here), or the seq
        # of one in its keeping with what to park in its place (an oversized message's cut).
        self._unparked: deque[Unparked] = deque()
        self._parking = threading.Lock()  # one thread parks at a time
        self._parking_failed = False

    @property
    def owned(self) -> bool:
        """False in a process forked from the one that made the consumer (a pool process)."""
        return os.getpid() == self._pid

    # -- fetching and settling messages ----------------------------------------

    def next_seq(self) -> int:
        return next(self._seq)

    def fetch_commands(
        self, seq: int, sources: Sequence[str], no_ack: Sequence[bool]
    ) -> list[tuple[Any, ...]]:
        return self.scripts.fetch_commands(self.id, seq, sources, no_ack, self.timeout_ms)

    def fetch(
        self, sources: Sequence[str], no_ack: Sequence[bool] | None = None
    ) -> tuple[int, Fetched] | None:
        """Take the next message of `sources` now: (its seq, the message), or None."""
        seq = self.next_seq()
        flags = no_ack if no_ack is not None else [False] * len(sources)
        fetched = self.scripts.fetch(self.id, seq, sources, flags, self.timeout_ms)
        return None if fetched is None else (seq, fetched)

    def ack(self, seq: int) -> None:
        """The message is done with: it leaves Redis (its key first, then its index entry)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.message(self.id, seq))
            pipe.hdel(self.inflight, str(seq))
            pipe.execute()

    def requeue(self, seq: int, source: str, *, front: bool) -> int:
        """Back on `source`, the queue it came from: front (fetched next) or back. 1 if it moved."""
        return self.scripts.requeue(self.id, [(seq, source)], front=front)

    def park(self, seq: int) -> int:
        """Out of the way, unchanged: onto the unparsable list. 1 if it moved."""
        return self.scripts.requeue(self.id, [(seq, self.keys.unparsable)], front=False)

    @property
    def unparked(self) -> int:
        """Messages waiting to be parked (Redis refused them so far)."""
        return len(self._unparked)

    def keep_unparsable(self, message: Unparked) -> bool:
        """Park a message kombu cannot deliver, never dropping it: its seq (in this
        consumer's keeping) or, popped from a no-ack source, its bytes; or (seq, bytes):
        the bytes are parked in place of the message in its keeping, which goes.

        True once parked. When Redis refuses, the message waits here (a seq
        stays in Redis, in this consumer's keeping) and is tried again on
        every heartbeat, with the next message parked, and at close.
        """
        self._unparked.append(message)
        return self.retry_parking() == 0

    def retry_parking(self, redis: Redis | None = None) -> int:
        """Park the messages waiting to be; how many still wait. Never raises.

        `redis`: the caller's connection (the heartbeat thread's own);
        while another thread parks, this one leaves it to that one.
        """
        if not self._unparked or not self._parking.acquire(blocking=False):
            return len(self._unparked)
        try:
            client = self.redis if redis is None else redis
            scripts = self.scripts if redis is None else BrokerScripts(redis, self.keys)
            parked = 0
            while self._unparked:
                message = self._unparked.popleft()
                try:
                    if isinstance(message, bytes):
                        client.lpush(self.keys.unparsable, message)
                    elif isinstance(message, tuple):
                        self._park_in_place(client, *message)
                    else:
                        scripts.requeue(self.id, [(message, self.keys.unparsable)], front=False)
                except (RedisError, OSError) as exc:
                    self._unparked.appendleft(message)
                    if not self._parking_failed:
                        self._parking_failed = True
                        log.error(
                            "broker consumer %s: could not park %d message(s) in %r (%s): "
                            "kept here, and tried again on every heartbeat, with the next "
                            "one, and at close",
                            self.id,
                            len(self._unparked),
                            self.keys.unparsable,
                            exc,
                        )
                    return len(self._unparked)
                parked += 1
            if self._parking_failed:
                self._parking_failed = False
                log.warning(
                    "broker consumer %s: %d message(s) that waited are parked in %r now",
                    self.id,
                    parked,
                    self.keys.unparsable,
                )
            return 0
        finally:
            self._parking.release()

    def _park_in_place(self, client: Redis, seq: int, record: bytes) -> None:
        """Park `record` and drop message `seq` from this consumer's keeping, in one
        MULTI: both or neither (a full Redis refuses the whole)."""
        with client.pipeline(transaction=True) as pipe:
            pipe.lpush(self.keys.unparsable, record)
            pipe.delete(self.keys.message(self.id, seq))
            pipe.hdel(self.inflight, str(seq))
            pipe.execute()

    def restore_all(self, *, deregister: bool) -> int:
        """Everything this consumer still holds back to the front of its queues."""
        scripts, redis = self.scripts, self.redis
        return put_back(scripts, redis, self.id, only_if_dead=False, deregister=deregister)

    # -- liveness ----------------------------------------------------------------

    @property
    def beating(self) -> bool:
        return self._heartbeat is not None

    def start_heartbeat(self, redis: Redis) -> None:
        """Beat (and recover dead consumers) from a thread, on its own connection `redis`."""
        if self._heartbeat is None and not self.closed and self.owned:
            self._heartbeat = Heartbeat(self, redis)
            self._heartbeat.start()

    def stop_heartbeat(self) -> None:
        beat, self._heartbeat = self._heartbeat, None
        if beat is not None and self.owned:
            beat.stop()

    def close(self, *, restore: bool = True) -> None:
        """Stop beating; give back what is still held; leave the registry. Once, quietly.

        Without `restore`, or when Redis cannot be reached, the messages stay
        in its keeping and a live consumer recovers them after the
        timeout.
        """
        if self.closed or not self.owned:
            return
        self.closed = True
        self.stop_heartbeat()
        self._park_before_close()
        if not restore:
            return
        try:
            moved = self.restore_all(deregister=True)
        except (RedisError, OSError) as exc:
            log.error(
                "broker consumer %s: could not put its unacknowledged tasks back (%s); "
                "another worker recovers them once its heartbeat expires",
                self.id,
                exc,
            )
            return
        if moved:
            log.info("broker consumer %s: %d unacknowledged task(s) put back", self.id, moved)

    def _park_before_close(self) -> None:
        """A last try at parking; a no-ack message Redis still refuses is logged whole
        (its only copy: the process is going), a kept one stays in Redis."""
        if self.retry_parking() == 0:
            return
        for message in list(self._unparked):
            if isinstance(message, tuple):
                log.critical(
                    "broker consumer %s: an oversized message could not be parked in %r; it "
                    "stays in Redis (put back in its queue, it is cut and parked when fetched)",
                    self.id,
                    self.keys.unparsable,
                )
            elif isinstance(message, bytes):
                log.critical(
                    "broker consumer %s: a message kombu cannot deliver could not be parked "
                    "in %r and leaves with this process; its bytes: %r",
                    self.id,
                    self.keys.unparsable,
                    message,
                )


class Heartbeat(threading.Thread):
    """Beats for one consumer every fifth of its timeout, and recovers dead consumers."""

    def __init__(self, consumer: BrokerConsumer, redis: Redis) -> None:
        super().__init__(name=f"broker-heartbeat-{consumer.id}", daemon=True)
        self.consumer = consumer
        self.scripts = BrokerScripts(redis, consumer.keys)
        self.redis = redis
        self.interval_s = max(0.05, consumer.timeout_ms / 1000 / BEATS_PER_TIMEOUT)
        self._stopping = threading.Event()
        self._failing = False

    def run(self) -> None:
        first = True
        while True:
            try:
                self.beat(first)
                first = False
                if self._failing:
                    self._failing = False
                    log.warning("broker consumer %s: heartbeat restored", self.consumer.id)
            except (RedisError, OSError) as exc:
                if not self._failing:
                    self._failing = True
                    log.warning("broker consumer %s: heartbeat failed: %s", self.consumer.id, exc)
            except Exception:  # never let the thread die: a silent consumer looks dead
                log.exception("broker consumer %s: heartbeat error", self.consumer.id)
            if self._stopping.wait(self.interval_s):
                return

    def beat(self, first: bool) -> None:
        me = self.consumer.id
        beat = self.scripts.heartbeat(me, self.consumer.timeout_ms, DEAD_PER_BEAT)
        if not beat.was_registered and not first:
            log.warning(
                "broker consumer %s: its heartbeat was late by more than the consumer timeout; "
                "its unacknowledged tasks were given to other workers and may run twice",
                me,
            )
        for member in beat.foreign:
            # Not UTF-8: no consumer made it (ours are host:pid:hex); its index, if any, was
            # not written by a fetch either. Listed as dead on every beat, it would take the
            # place of a consumer that really died.
            self.scripts.forget(member)
            log.warning(
                "broker consumer %s: removed a registry entry no consumer wrote: %r", me, member
            )
        for dead in beat.dead:
            if dead == me:
                continue
            try:
                moved = recover(self.scripts, self.redis, dead)
            except ConsumerAlive:
                continue
            except (RedisConnectionError, RedisTimeoutError, OSError):
                raise  # Redis is away: the beat failed, and the next one tries again
            except (ResponseError, ValueError, TypeError) as exc:
                # Not Redis being away: something in this entry, its index or its keys is
                # not what a consumer writes (an index that is not a hash, say). Every beat
                # would fail on it again, and the dead consumers after it would never be
                # recovered: the entry leaves the registry.
                self.scripts.forget(dead.encode("utf-8"))
                log.error(
                    "broker consumer %s: cannot recover consumer %s (%s: %s); its registry "
                    "entry is removed so that it does not block the recovery of others",
                    me,
                    dead,
                    type(exc).__name__,
                    exc,
                )
                continue
            except Exception:  # one consumer's failure must not hold up the others'
                log.exception("broker consumer %s: error recovering consumer %s", me, dead)
                continue
            log.log(
                logging.WARNING if moved else logging.INFO,
                "broker consumer %s found consumer %s dead (no heartbeat for %.1f s): "
                "%d unacknowledged task(s) put back in their queues",
                me,
                dead,
                self.consumer.timeout_ms / 1000,
                moved,
            )
        self.consumer.retry_parking(self.redis)  # after the beat, which must not wait for it

    def stop(self) -> None:
        self._stopping.set()
        if self is not threading.current_thread():
            self.join(timeout=5)
