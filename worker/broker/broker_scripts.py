"""The reliable transport's Lua scripts, each behind one typed wrapper.

`lua_scripts/broker_*.lua` document every key, argument and return value.
Each script is the process's one redis-py `Script` of its file
(`worker.scripts.script`), run by EVALSHA on this wrapper's client and sent
again after NOSCRIPT.

A fetch is two commands in one round trip: the broker_fetch EVALSHA, then an
LINDEX of the key it moved the message to (so the message is never a Lua
string). `fetch_commands` builds them: the event loop sends them on its own
connection without waiting, `fetch` sends them as a pipeline, and both read
the replies with `parse_fetch`; a NOSCRIPT there (the script did not run,
nothing moved) is answered with `load_fetch` and a new attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.exceptions import NoScriptError

from worker.broker.broker_keys import BrokerKeys
from worker.errors import ConsumerAlive as ConsumerAlive
from worker.replies import text
from worker.scripts import script


@dataclass(frozen=True)
class Fetched:
    """A message broker_fetch.lua took: where from, its bytes, and whether it is kept."""

    source: int  # index into the sources the fetch was given
    raw: bytes
    kept: bool  # False for a no-ack source: popped and handed over, nothing to acknowledge


@dataclass(frozen=True)
class Beat:
    """broker_heartbeat.lua's answer."""

    was_registered: bool
    dead: list[str]
    #: Dead entries whose ids are not UTF-8: no consumer wrote them (ours are text).
    foreign: list[bytes] = field(default_factory=list)


def no_ack_flags(no_ack: Sequence[bool]) -> str:
    return "".join("1" if flag else "0" for flag in no_ack)


def parse_fetch(script_reply: Any, message: Any) -> Fetched | None:
    """The replies to `fetch_commands` (an exception instance raises)."""
    if isinstance(script_reply, Exception):
        raise script_reply
    if not script_reply:
        return None
    source = int(script_reply[0]) - 1
    if len(script_reply) > 1:
        return Fetched(source=source, raw=script_reply[1], kept=False)
    if message is None or isinstance(message, Exception):
        # Its key went before the LINDEX read it: only a recovery of this consumer
        # moves it, back to its queue. Nothing was fetched after all.
        return None
    return Fetched(source=source, raw=message, kept=True)


class BrokerScripts:
    def __init__(self, redis: Redis, keys: BrokerKeys) -> None:
        self._redis = redis
        self.keys = keys
        self._fetch = script("broker_fetch")
        self._requeue = script("broker_requeue")
        self._heartbeat = script("broker_heartbeat")
        self._publish = script("broker_publish")
        self._bind = script("broker_bind")

    def fetch_commands(
        self,
        consumer_id: str,
        seq: int,
        sources: Sequence[str],
        no_ack: Sequence[bool],
        timeout_ms: int,
    ) -> list[tuple[Any, ...]]:
        """The EVALSHA broker_fetch and the LINDEX that reads what it moved, to send together."""
        message = self.keys.message(consumer_id, seq)
        keys = [self.keys.registry, self.keys.inflight(consumer_id), message, *sources]
        args = [consumer_id, seq, timeout_ms, no_ack_flags(no_ack)]
        return [("EVALSHA", self._fetch.sha, len(keys), *keys, *args), ("LINDEX", message, 0)]

    def fetch(
        self,
        consumer_id: str,
        seq: int,
        sources: Sequence[str],
        no_ack: Sequence[bool],
        timeout_ms: int,
    ) -> Fetched | None:
        """Move the oldest message of the first non-empty source into the consumer's keeping."""

        def attempt() -> Fetched | None:
            with self._redis.pipeline(transaction=False) as pipe:
                for command in self.fetch_commands(consumer_id, seq, sources, no_ack, timeout_ms):
                    pipe.execute_command(*command)  # type: ignore[no-untyped-call]
                script_reply, message = pipe.execute(raise_on_error=False)
            return parse_fetch(script_reply, message)

        try:
            return attempt()
        except NoScriptError:
            self.load_fetch()
            return attempt()

    def load_fetch(self) -> None:
        """Send the fetch script to Redis (after a NOSCRIPT reply)."""
        self._fetch.sha = self._redis.script_load(self._fetch.script)

    def requeue(
        self,
        consumer_id: str,
        moves: Sequence[tuple[int, str]],
        *,
        front: bool,
        only_if_dead: bool = False,
        deregister: bool = False,
    ) -> int:
        """Move messages (seq, destination list) of the consumer back; how many moved.

        Raises ConsumerAlive when `only_if_dead` and the consumer's deadline
        has not passed (nothing moved).
        """
        # KEYS[3] is the unparsable list, where a message goes whose destination is not one.
        keys: list[str] = [
            self.keys.registry,
            self.keys.inflight(consumer_id),
            self.keys.unparsable,
        ]
        index: dict[str, int] = {self.keys.unparsable: 1}

        def number(key: str) -> int:
            found = index.get(key)
            if found is None:
                keys.append(key)
                found = index[key] = len(keys) - 2
            return found

        args: list[Any] = [
            consumer_id,
            "front" if front else "back",
            "1" if only_if_dead else "0",
            "1" if deregister else "0",
        ]
        for seq, destination in moves:
            args += (seq, number(self.keys.message(consumer_id, seq)), number(destination))
        moved = int(self._requeue(keys=keys, args=args, client=self._redis))
        if moved < 0:
            raise ConsumerAlive(consumer_id)
        return moved

    def heartbeat(self, consumer_id: str, timeout_ms: int, limit: int) -> Beat:
        """Push the consumer's deadline to now + timeout; list up to `limit` dead consumers."""
        reply = self._heartbeat(
            keys=[self.keys.registry], args=[consumer_id, timeout_ms, limit], client=self._redis
        )
        dead: list[str] = []
        foreign: list[bytes] = []
        for member in reply[1:]:
            if isinstance(member, bytes):
                try:
                    dead.append(member.decode("utf-8"))
                except UnicodeDecodeError:
                    foreign.append(member)
            else:
                dead.append(text(member))
        return Beat(was_registered=int(reply[0]) == 1, dead=dead, foreign=foreign)

    def forget(self, member: bytes) -> int:
        """Remove a registry entry no consumer made (its id is not text): 1 if removed."""
        return int(self._redis.zrem(self.keys.registry, member))

    def publish(self, queue_key: str, message: bytes | str, most_queued: int) -> bool:
        """Push `message` on `queue_key` even when the broker is full, unless the queue
        already holds `most_queued` messages. True if pushed."""
        reply = self._publish(keys=[queue_key], args=[message, most_queued], client=self._redis)
        return int(reply) > 0

    def bind(self, table_key: str, permanent_key: str, binding: str) -> None:
        """Record `binding` in an exchange's binding sets, even when the broker is full."""
        self._bind(keys=[table_key, permanent_key], args=[binding], client=self._redis)
