"""kombu's Redis transport with reliable fetch, for the consuming side.

Stock kombu pops a message with BRPOP and only then records it as
unacknowledged: a worker killed in between loses it. Here a message leaves
its queue list only inside broker_fetch.lua, which moves it in the same
atomic step to a key of its own listed in the consumer's in-flight index;
an ack deletes both; a dead consumer's messages are put back by the live
ones (`worker.broker.broker_consumer`). The raw bytes stay as the sender wrote
them and are never encoded again: the only copy that leaves Redis is the
one the worker decodes to run the task.

Senders need nothing of this: the queues, the message format and
publishing are stock kombu's (this transport publishes through the same
inherited code), so `redis://` producers and foreign Celery apps deliver
to it unchanged.

Consuming on the event loop (and in `drain_events`, through the same
poller), one request outstanding per channel on kombu's BRPOP connection:

- a fetch: EVALSHA broker_fetch over every source list (priority levels,
  then queues, in kombu's BRPOP order, queues round-robin), and the LINDEX
  reading the message it moved, sent together. A message is delivered and
  the next fetch goes out on the next loop tick while the prefetch limit
  allows; an empty answer switches to waiting;
- a wait: `BLMOVE q q RIGHT RIGHT <brpop_timeout>` on the default-priority
  list of the next queue in the cycle: a blocking look that moves nothing
  (the message stays where it is), so an idle worker wakes at once when a
  task arrives there, and after at most `brpop_timeout` (1 s) for a task
  in a priority sub-queue or another queue (each idle second waits on the
  next queue). Either answer goes back to fetching. Every idle worker
  waiting on a queue wakes for its next task; one fetch takes it, the
  others find nothing and wait again.

A full broker (maxmemory) refuses BLMOVE, as it refuses every command
that may grow memory: an idle consumer then waits one `brpop_timeout` with
`BLPOP` on a list nothing writes (`_eventbuffer.broker.idle`), which a full
Redis runs, and tries BLMOVE again; the fetch itself runs on a full broker.

So a busy worker spends two round trips per task (the fetch, the ack), an
idle one two a second. kombu's BRPOP bookkeeping (pausing a reply while the
prefetch limit is reached, the health check of the blocking connection,
reconnects) is reused as it is. kombu's visibility-timeout sweep of its
`unacked` hash keeps running too, for messages a stock worker left there
(a rolling upgrade).

Acknowledgements by delivery tag: worker/broker/broker_qos.py.

Tested with the kombu versions in TESTED_KOMBU_VERSIONS only: it overrides
kombu internals (`_brpop_start`, `_brpop_read`, QoS), and refuses to start
on any other version.
"""

from __future__ import annotations

import base64
import binascii
import logging
import weakref
from collections.abc import Sequence
from queue import Empty
from time import monotonic
from typing import Any

import kombu
import msgspec
import pybase64
import redis
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps, loads
from redis.exceptions import NoScriptError, OutOfMemoryError

from worker.broker.broker_consumer import BrokerConsumer
from worker.broker.broker_keys import BrokerKeys
from worker.broker.broker_qos import QoS
from worker.broker.broker_scripts import BrokerScripts, Fetched, parse_fetch
from worker.broker.envelope import OVERSIZED_HEAD_BYTES, envelope_problem, oversized_record
from worker.errors import UntestedKombu as UntestedKombu
from worker.names import FLUSH_QUEUE
from worker.settings import DEFAULT_MESSAGE_LIMIT_BYTES

log = logging.getLogger("worker.broker")

#: kombu versions this transport was tested with (pyproject pins the same).
TESTED_KOMBU_VERSIONS = ("5.7.0",)

#: What a worker's broker_transport names to use it.
TRANSPORT_PATH = "worker.broker.transport:Transport"
#: The name kombu knows it by once `install_alias()` ran: the scheme of the
#: worker's broker URL in its banner and logs ("Connected to eventbuffer-redis://...").
TRANSPORT_ALIAS = "eventbuffer-redis"


def check_kombu(version: str | None = None) -> None:
    """Raise UntestedKombu, with a one-line reason, unless `version` (installed) was tested."""
    version = kombu.__version__ if version is None else version
    if version not in TESTED_KOMBU_VERSIONS:
        raise UntestedKombu(
            f"eventbuffer's reliable Redis transport is tested with kombu "
            f"{', '.join(TESTED_KOMBU_VERSIONS)} only, not {version}: install "
            f"kombu=={TESTED_KOMBU_VERSIONS[-1]}, or set EVENT_BUFFER_BROKER_TRANSPORT=kombu "
            "to run on kombu's stock transport (which can lose a task when a worker is killed)"
        )


_ANY = msgspec.json.Decoder()


def decode_envelope(raw: bytes) -> Any:
    """A message as kombu's `loads` decodes it, in a third of its time for a large one.

    msgspec reads what both read to the same values; what it refuses (NaN, a
    lone surrogate, another encoding than UTF-8, ...) and an envelope holding
    one of kombu's typed values (`{"__type__": ..., "__value__": ...}`) are
    decoded by kombu's `loads`, which raises what it always raised.
    """
    try:
        payload = _ANY.decode(raw)
        typed = _typed(payload)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nested ~1,000 deep
        return loads(raw)
    return loads(raw) if typed else payload


def _typed(value: Any) -> bool:
    """Does this decoded JSON hold an object that kombu's `loads` would turn into a value?"""
    if isinstance(value, dict):
        if value.keys() == {"__type__", "__value__"}:
            return True
        return any(_typed(item) for item in value.values() if isinstance(item, dict | list))
    if isinstance(value, list):
        return any(_typed(item) for item in value if isinstance(item, dict | list))
    return False


class Base64(virtual.Base64):
    """kombu's base64 body codec, decoding strict base64 (what kombu writes) with
    pybase64's vectorised decoder: a tenth of the stock decoder's time on a 500-event
    body. Anything else (line breaks, characters outside the alphabet, non-ASCII text)
    is decoded as kombu decodes it, to the same bytes."""

    def decode(self, s: Any) -> bytes:
        try:
            return pybase64.b64decode(s, validate=True)
        except (binascii.Error, ValueError, TypeError):
            return base64.b64decode(s.encode() if isinstance(s, str) else s)


class Channel(kombu_redis.Channel):
    QoS = QoS
    codecs = {**kombu_redis.Channel.codecs, "base64": Base64()}

    #: Queues whose messages are published even when the broker Redis is full
    #: (broker_publish.lua): the flush queue, since a flush is what frees memory.
    oom_queues: tuple[str, ...] = (FLUSH_QUEUE,)
    #: ... as long as the queue holds fewer messages than this.
    oom_queue_limit = 16

    #: Seconds without a heartbeat after which a consumer is dead (transport option).
    consumer_timeout = 30.0
    #: A message larger than this is parked, cut, and never decoded (transport option;
    #: EVENT_BUFFER_MAX_MESSAGE_BYTES).
    max_message_bytes = DEFAULT_MESSAGE_LIMIT_BYTES

    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options,
        "consumer_timeout",
        "max_message_bytes",
    )

    _reliable: BrokerConsumer | None = None
    _waiting = False  # the outstanding command is a wait (BLMOVE), not a fetch
    _full = False  # the broker refused the last BLMOVE for memory: wait with BLPOP instead
    _wait_queue = ""  # ... on this queue

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broker_keys = BrokerKeys(self.global_keyprefix)
        self._no_ack_queues: set[str] = set()
        # The outstanding fetch: its seq, source lists and their queues.
        self._fetch_seq = 0
        self._fetch_sources: list[str] = []
        self._fetch_queues: list[str] = []

    # -- the consumer --------------------------------------------------------

    @property
    def reliable(self) -> BrokerConsumer:
        """This channel's consumer, made on first use (publishing channels never make one)."""
        if self._reliable is None:
            client = redis.Redis(connection_pool=self.pool)
            self._reliable = BrokerConsumer(client, self.broker_keys, float(self.consumer_timeout))
            weakref.finalize(self, self._reliable.close)  # a channel dropped unclosed
        return self._reliable

    def close_consumer(self, *, restore: bool = True) -> None:
        if self._reliable is not None:
            self._reliable.close(restore=restore)

    def _heartbeat_client(self) -> redis.Redis:
        """A connection of its own for the heartbeat thread, never blocked for long."""
        params = self._connparams()
        bound = max(1.0, float(self.consumer_timeout) / 3)
        params["socket_timeout"] = bound
        if "socket_connect_timeout" in params:
            params["socket_connect_timeout"] = bound
        return redis.Redis(connection_pool=redis.ConnectionPool(**params))

    def basic_consume(self, queue: str, no_ack: bool = False, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        result = super().basic_consume(queue, no_ack, *args, **kwargs)
        if not no_ack and queue not in self._fanout_queues and not self.reliable.beating:
            self.reliable.start_heartbeat(self._heartbeat_client())
        return result

    def close(self) -> None:
        super().close()  # reads a pending reply, cancels, restores (QoS.restore_unacked_once)
        self.close_consumer(restore=self.do_restore)

    # -- a full broker ----------------------------------------------------------

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        """kombu's bind; one a full broker refused is recorded by broker_bind.lua, so a
        worker (re)started while Redis is full still declares its queues."""
        try:
            super()._queue_bind(exchange, routing_key, pattern, queue)
        except OutOfMemoryError:
            if queue in self._expires:
                # An expiring queue (a worker's remote-control queue): kombu refreshes
                # its binding every third of its TTL, which creates it once memory is back.
                log.warning("broker full: queue %s is bound once Redis has memory", queue)
                return
            prefix = self.global_keyprefix
            binding = self.sep.join([routing_key or "", pattern or "", queue or ""])
            self._scripts().bind(
                prefix + self.keyprefix_queue % (exchange,),
                prefix + self.keyprefix_binding_permanent % (exchange,),
                binding,
            )

    def _size(self, queue: str) -> int:
        """A queue's length over its priority lists: kombu reads them in a MULTI, which a
        full Redis refuses even for reads (a worker could not declare its queues)."""
        with self.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            for pri in self.priority_steps:
                pipe.llen(self._q_for_pri(queue, pri))
            return sum(int(size or 0) for size in pipe.execute())

    def _scripts(self) -> BrokerScripts:
        return BrokerScripts(redis.Redis(connection_pool=self.pool), self.broker_keys)

    # -- publishing ------------------------------------------------------------

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        """kombu's publish; a flush request the full broker refused goes by broker_publish.lua."""
        try:
            super()._put(queue, message, **kwargs)
        except OutOfMemoryError:
            if queue not in self.oom_queues or kwargs.get("_publish_batch") is not None:
                raise
            pri = self._get_message_priority(message, reverse=False)
            key = self.global_keyprefix + self._q_for_pri(queue, pri)
            if not self._scripts().publish(key, dumps(message), self.oom_queue_limit):
                log.info("broker full: %s already holds %d messages; this one is dropped",
                         queue, self.oom_queue_limit)  # fmt: skip

    # -- fetching --------------------------------------------------------------

    def _sources(self, queues: Sequence[str]) -> tuple[list[str], list[str]]:
        """Source lists in kombu's BRPOP order (priority levels, then queues), and their queues."""
        prefix = self.global_keyprefix
        sources: list[str] = []
        owners: list[str] = []
        for pri in self.priority_steps:
            for queue in queues:
                sources.append(prefix + self._q_for_pri(queue, pri))
                owners.append(queue)
        return sources, owners

    def _brpop_start(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        connection = self.client.connection
        sources, owners = self._sources(queues)
        if self._waiting and self._full:  # BLMOVE was refused: wait without it
            commands: list[tuple[Any, ...]] = [("BLPOP", self.broker_keys.idle, timeout or 1)]
            self._wait_queue = queues[0]
        elif self._waiting:  # on the first source: the next queue's default priority
            key = sources[0]
            commands = [("BLMOVE", key, key, "RIGHT", "RIGHT", timeout or 0)]
            self._wait_queue = queues[0]
        else:
            consumer = self.reliable
            seq = consumer.next_seq()
            no_ack = [queue in self._no_ack_queues for queue in owners]
            commands = consumer.fetch_commands(seq, sources, no_ack)
            self._fetch_seq, self._fetch_sources, self._fetch_queues = seq, sources, owners
        self._in_poll = connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        connection.send_packed_command(connection.pack_commands(commands))

    def _read_reply(self, command: str, **options: Any) -> Any:
        """One reply on the consuming connection; a Redis error reply is returned, not raised."""
        client = self.client
        try:
            return client.parse_response(client.connection, command, **options)
        except self.connection_errors:
            client.connection.disconnect()
            raise
        except self.ResponseError as exc:
            return exc

    def _brpop_read(self, **options: Any) -> bool:
        try:
            if self._waiting:
                self._waiting = False
                full, self._full = self._full, False
                reply = self._read_reply("BLPOP" if full else "BLMOVE", **options)
                if isinstance(reply, OutOfMemoryError):
                    self._full = True  # the next wait blocks on BLPOP, which a full Redis runs
                    self._waiting = True
                    raise Empty()
                if isinstance(reply, Exception):
                    raise reply
                if reply is None:  # nothing came: wait on the next queue next time
                    self._queue_cycle.rotate(self._wait_queue)
                raise Empty()
            # Both replies, whatever the first, so the connection stays in step.
            script_reply = self._read_reply("EVALSHA", **options)
            message = self._read_reply("LINDEX", **options)
            try:
                fetched = parse_fetch(script_reply, message)
            except NoScriptError:  # the script did not run: nothing moved
                self.reliable.scripts.load_fetch()
                raise Empty() from None
            if fetched is None:
                self._waiting = True
                raise Empty()
            self._deliver_fetched(fetched, self._fetch_seq, self._fetch_sources, self._fetch_queues)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()

    def _deliver_fetched(
        self, fetched: Fetched, seq: int, sources: Sequence[str], queues: Sequence[str]
    ) -> None:
        queue, source = queues[fetched.source], sources[fetched.source]
        self._queue_cycle.rotate(queue)
        payload = self._decode(fetched, seq, source)
        try:
            self.connection._deliver(payload, queue)
        except Exception as exc:
            # kombu or Celery could not take it (a body it cannot decode, say): stock
            # kombu has lost such a message by now, or died on it; here it would come
            # back after every restart, so it is parked, unchanged, and consuming goes on:
            # no message may stop a worker. Not when the broker went away (kombu counts
            # KeyError among connection errors, for its poller; from a delivery it is the
            # message's fault).
            if isinstance(exc, self.connection_errors) and not isinstance(exc, KeyError):
                raise
            if fetched.kept:
                self.qos.forget(payload["properties"]["delivery_tag"], seq)
            self._park(fetched.raw, seq if fetched.kept else None, f"{type(exc).__name__}: {exc}")

    def _decode(self, fetched: Fetched, seq: int, source: str) -> dict[str, Any]:
        """The kombu message in `fetched`, expected by the QoS. One that is too large is
        parked cut, without being decoded; one that is not a kombu envelope kombu can
        deliver (`envelope_problem`) is parked unchanged; either raises Empty."""
        kept = seq if fetched.kept else None
        if len(fetched.raw) > self.max_message_bytes:
            self._park_oversized(fetched.raw, kept)
            raise Empty()
        try:
            payload: Any = decode_envelope(fetched.raw)
        except Exception as exc:
            problem: str | None = f"not JSON ({type(exc).__name__}: {exc})"
        else:
            problem = envelope_problem(payload)
        if problem is not None:
            self._park(fetched.raw, kept, problem)
            raise Empty()
        if fetched.kept:
            self.qos.expect(payload["properties"]["delivery_tag"], seq, source)
        return payload  # type: ignore[no-any-return]

    def _park(self, raw: bytes, seq: int | None, problem: str) -> None:
        """Onto the unparsable list, unchanged: from the consumer's keeping (`seq`), or the
        bytes of a no-ack message (`seq` None). Never lost when Redis refuses: it waits in
        the consumer and is tried again (`BrokerConsumer.keep_unparsable`)."""
        log.critical(
            "Cannot deliver this message (%s); it is kept unchanged in %r: %r",
            " ".join(problem.split())[:300],
            self.broker_keys.unparsable,
            raw[:256],
        )
        self.reliable.keep_unparsable(raw if seq is None else seq)

    def _park_oversized(self, raw: bytes, seq: int | None) -> None:
        """A message over max_message_bytes: its first bytes, with a line saying so, are
        parked in its place (`oversized_record`); it is never decoded."""
        record = oversized_record(raw, int(self.max_message_bytes))
        log.critical(
            "Cannot deliver this message: %d bytes, over EVENT_BUFFER_MAX_MESSAGE_BYTES (%d); "
            "its first %d bytes are kept in %r, not decoded: %r ... %r",
            len(raw),
            int(self.max_message_bytes),
            min(len(raw), int(self.max_message_bytes), OVERSIZED_HEAD_BYTES),
            self.broker_keys.unparsable,
            raw[:128],
            raw[-256:],
        )
        self.reliable.keep_unparsable(record if seq is None else (seq, record))

    def park_delivered(self, delivery_tag: str, problem: str) -> bool:
        """Park a message kombu delivered and nobody settled (one Celery would drop, or
        dies on): it leaves the consumer's keeping for the unparsable list, unchanged.
        False when this channel holds no such message (already settled, or no-ack)."""
        taken = self.qos._take(delivery_tag)
        if taken is None:
            return False
        seq, _ = taken
        virtual.QoS.ack(self.qos, delivery_tag)  # out of the prefetch count; nothing sent
        log.critical(
            "Cannot run this message (%s); it is kept unchanged in %r (delivery tag %r)",
            " ".join(problem.split())[:300],
            self.broker_keys.unparsable,
            delivery_tag,
        )
        self.reliable.keep_unparsable(seq)
        return True

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        return self._get_one(queue, no_ack=False)

    def _get_one(self, queue: str, *, no_ack: bool) -> dict[str, Any]:
        sources, _ = self._sources([queue])
        taken = self.reliable.fetch(sources, [no_ack] * len(sources))
        if taken is None:
            raise Empty()
        seq, fetched = taken
        return self._decode(fetched, seq, sources[fetched.source])

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        try:
            message = self.Message(self._get_one(queue, no_ack=no_ack), channel=self)
        except Empty:
            return None
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message


class Transport(kombu_redis.Transport):
    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_kombu()
        super().__init__(*args, **kwargs)


def install_alias() -> None:
    """Let kombu resolve `TRANSPORT_ALIAS` in this process (and the ones it forks).

    Called where a worker or Beat switches to this transport (`worker.broker.selection`);
    importing this module changes nothing of kombu's.
    """
    TRANSPORT_ALIASES.setdefault(TRANSPORT_ALIAS, TRANSPORT_PATH)
