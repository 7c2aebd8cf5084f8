"""The reliable transport's Lua scripts, each behind one typed wrapper.

`lua_scripts/broker_*.lua` document every key, argument and return value.
The scripts are registered with redis-py's `register_script` (EVALSHA, sent
again after NOSCRIPT). The fetch is also sent without waiting, on the
consumer's event-loop connection: `fetch_command` builds that EVALSHA and
`parse_fetch` reads its reply, and a NOSCRIPT there (the script did not
run, nothing moved) is answered with `load_fetch` and a new attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis

from worker.broker.keys import BrokerKeys, as_text
from worker.scripts import load_lua


class ConsumerAlive(Exception):
    """A recovery found the consumer alive again: none of its messages were moved."""


@dataclass(frozen=True)
class Fetched:
    """A message broker_fetch.lua took: the raw bytes and where they came from."""

    source: int  # index into the sources the fetch was given
    raw: bytes


@dataclass(frozen=True)
class Beat:
    """broker_heartbeat.lua's answer."""

    was_registered: bool
    dead: list[str]


def parse_fetch(reply: Any) -> Fetched | None:
    """broker_fetch.lua's reply, from `BrokerScripts.fetch` or read off the event loop."""
    if not reply:
        return None
    return Fetched(source=int(reply[0]) - 1, raw=reply[1])


def no_ack_flags(no_ack: Sequence[bool]) -> str:
    return "".join("1" if flag else "0" for flag in no_ack)


class BrokerScripts:
    def __init__(self, redis: Redis, keys: BrokerKeys) -> None:
        self._redis = redis
        self.keys = keys
        self._fetch = redis.register_script(load_lua("broker_fetch"))
        self._requeue = redis.register_script(load_lua("broker_requeue"))
        self._heartbeat = redis.register_script(load_lua("broker_heartbeat"))

    def _fetch_keys_args(
        self,
        consumer_id: str,
        seq: int,
        sources: Sequence[str],
        no_ack: Sequence[bool],
        timeout_ms: int,
    ) -> tuple[list[str], list[Any]]:
        keys = [self.keys.registry, self.keys.inflight(consumer_id), *sources]
        return keys, [consumer_id, seq, timeout_ms, no_ack_flags(no_ack)]

    def fetch(
        self,
        consumer_id: str,
        seq: int,
        sources: Sequence[str],
        no_ack: Sequence[bool],
        timeout_ms: int,
    ) -> Fetched | None:
        """Move the oldest message of the first non-empty source into the consumer's hash."""
        keys, args = self._fetch_keys_args(consumer_id, seq, sources, no_ack, timeout_ms)
        return parse_fetch(self._fetch(keys=keys, args=args))

    def fetch_command(
        self,
        consumer_id: str,
        seq: int,
        sources: Sequence[str],
        no_ack: Sequence[bool],
        timeout_ms: int,
    ) -> list[Any]:
        """The same fetch as an EVALSHA command, to send without waiting for the reply."""
        keys, args = self._fetch_keys_args(consumer_id, seq, sources, no_ack, timeout_ms)
        return ["EVALSHA", self._fetch.sha, len(keys), *keys, *args]

    def load_fetch(self) -> None:
        """Send the fetch script to Redis (after a NOSCRIPT reply to `fetch_command`)."""
        self._fetch.sha = self._redis.script_load(self._fetch.script)

    def requeue(
        self,
        consumer_id: str,
        moves: Sequence[tuple[bytes | str, bytes | str]],
        *,
        front: bool,
        only_if_dead: bool = False,
        deregister: bool = False,
    ) -> int:
        """Move (field, destination list) pairs of the consumer's hash back; how many moved.

        Raises ConsumerAlive when `only_if_dead` and the consumer's deadline
        has not passed (nothing moved).
        """
        keys: list[bytes | str] = [self.keys.registry, self.keys.inflight(consumer_id)]
        index: dict[bytes | str, int] = {}
        args: list[Any] = [
            consumer_id,
            "front" if front else "back",
            "1" if only_if_dead else "0",
            "1" if deregister else "0",
        ]
        for field, destination in moves:
            number = index.get(destination)
            if number is None:
                keys.append(destination)
                number = index[destination] = len(keys) - 2
            args += (field, number)
        moved = int(self._requeue(keys=keys, args=args))
        if moved < 0:
            raise ConsumerAlive(consumer_id)
        return moved

    def heartbeat(self, consumer_id: str, timeout_ms: int, limit: int) -> Beat:
        """Push the consumer's deadline to now + timeout; list up to `limit` dead consumers."""
        reply = self._heartbeat(keys=[self.keys.registry], args=[consumer_id, timeout_ms, limit])
        return Beat(was_registered=int(reply[0]) == 1, dead=[as_text(m) for m in reply[1:]])
