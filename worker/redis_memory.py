"""How full each Redis is, and whether it would evict keys: the buffer's and the broker's.

Every key eventbuffer keeps is data: a queued row, a session's last view, a
held event, a batch marker (evicted: a redelivered batch is applied twice),
a flush lock (evicted: two flushers at once), a task in the broker. A Redis
whose `maxmemory-policy` is anything but `noeviction` deletes such keys
when it reaches `maxmemory`, silently. So eventbuffer's own workers refuse
to start on one (`check_eviction`, called at `celeryd_init` by
`worker/broker/selection.py`) unless `EVENT_BUFFER_ALLOW_EVICTION=true`
says the loss is accepted; `eventbuffer status`, `--watch` and the metrics
show each server's used memory, `maxmemory` and policy
(`memory_report`), so an operator sees a full Redis coming.

The facts come from `INFO memory` (`used_memory`, `maxmemory`,
`maxmemory_policy`), not `CONFIG GET`, which managed Redis services often
disable. The buffer is every master of a Redis Cluster, or the one Redis;
the broker is `effective_broker_url` when it is a Redis (an AMQP broker
has no such policy). `evicts` and `refusal` judge; they read nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from redis import Redis

from worker.errors import EvictionPolicyError
from worker.logs import one_line, redact
from worker.redis_errors import REDIS_FAILURES
from worker.settings import Settings
from worker.topology import Client, connect, is_cluster, masters, refreshed_on_error

NOEVICTION = "noeviction"
BUFFER = "buffer"
BROKER = "broker"
REDIS_SCHEMES = ("redis", "rediss", "unix")
# Start-up and `status` read INFO with these (a Redis that does not answer in time: not
# checked, the worker's own retries report it).
TIMEOUT_S = 2.0
# The shares of maxmemory `status` warns at (the alert rules use the same).
WARN_RATIO = 0.80
CRITICAL_RATIO = 0.95

FIX = (
    "run `CONFIG SET maxmemory-policy noeviction` on it and put `maxmemory-policy noeviction` "
    "in its redis.conf (a managed Redis: its parameter group), or set "
    "EVENT_BUFFER_ALLOW_EVICTION=true to accept that evicted keys are events lost"
)


@dataclass(frozen=True)
class RedisMemory:
    """What `INFO memory` says of one server, and which of eventbuffer's Redis it is."""

    redis: str  # BUFFER or BROKER
    node: str  # host:port (a unix socket: its path); the memory facts are the server's
    db: int | None  # the database eventbuffer uses there (None: a cluster master)
    used_bytes: int
    maxmemory_bytes: int  # 0: no limit
    policy: str

    @property
    def where(self) -> str:
        """host:port/db, as the start-up line names the server (never a password)."""
        return self.node if self.db is None else f"{self.node}/{self.db}"

    @property
    def used_ratio(self) -> float | None:
        """used / maxmemory; None without a limit."""
        if self.maxmemory_bytes <= 0:
            return None
        return self.used_bytes / self.maxmemory_bytes

    @property
    def evicts(self) -> bool:
        return evicts(self.policy)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "used_ratio": self.used_ratio, "evicts": self.evicts}


@dataclass(frozen=True)
class Unreadable:
    """A server whose memory could not be read, and why (one line, password masked)."""

    redis: str
    node: str
    error: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evicts(policy: str) -> bool:
    """Does a Redis with this `maxmemory-policy` delete keys at `maxmemory`?

    Every policy but `noeviction` does: the `volatile-*` ones too, since the
    buffer's keys with a TTL (the views hash, batch markers, flush locks)
    are as much data as the rest.
    """
    return policy.strip().lower() != NOEVICTION


def refusal(servers: Sequence[RedisMemory]) -> str | None:
    """The one line a worker stops with when any of `servers` evicts; None when none does.

    Servers are named host:port with the databases eventbuffer uses there, once per
    server (the policy is the server's, whichever database is asked).
    """
    grouped: dict[tuple[str, str], list[RedisMemory]] = {}
    for server in servers:
        if server.evicts:
            grouped.setdefault((server.node, server.policy), []).append(server)
    if not grouped:
        return None
    named = "; ".join(
        f"Redis {_roles(found)} has maxmemory-policy {policy}"
        for (_, policy), found in grouped.items()
    )
    return (
        f"eventbuffer: {named}: at maxmemory it evicts keys, and an evicted key is events "
        f"lost. Fix: {FIX}"
    )


def _roles(found: Sequence[RedisMemory]) -> str:
    """`host:port/db (buffer, broker)`, or `host:port (buffer db 0, broker db 1)`."""
    if len({s.db for s in found}) == 1:
        return f"{found[0].where} ({', '.join(dict.fromkeys(s.redis for s in found))})"
    roles = dict.fromkeys(s.redis if s.db is None else f"{s.redis} db {s.db}" for s in found)
    return f"{found[0].node} ({', '.join(roles)})"


def _number(info: dict[str, Any], field: str) -> int:
    try:
        return int(info.get(field, 0))
    except (TypeError, ValueError):
        return 0


def read_memory(client: Redis, redis: str, node: str, db: int | None) -> RedisMemory:
    """One `INFO memory` of `client`'s server (raises what the client raises)."""
    info = client.info("memory")
    policy = info.get("maxmemory_policy", "")
    if isinstance(policy, bytes):
        policy = policy.decode()
    return RedisMemory(
        redis=redis,
        node=node,
        db=db,
        used_bytes=_number(info, "used_memory"),
        maxmemory_bytes=_number(info, "maxmemory"),
        policy=str(policy) or "unknown",
    )


def _db(client: Redis) -> int:
    return int(client.connection_pool.connection_kwargs.get("db", 0) or 0)


def buffer_memory(client: Client) -> list[RedisMemory]:
    """Every master of the buffer (one Redis: itself), in the topology's order."""
    found = []
    cluster = is_cluster(client)
    for node in masters(client):
        with refreshed_on_error(client):
            db = None if cluster else _db(node.redis)
            found.append(read_memory(node.redis, BUFFER, node.name, db))
    return found


def is_redis_url(url: str) -> bool:
    return url.split("://", 1)[0] in REDIS_SCHEMES


def broker_client(settings: Settings, timeout_s: float = TIMEOUT_S) -> Redis | None:
    """A client of the broker's Redis; None when the broker is not a Redis (AMQP)."""
    url = settings.effective_broker_url
    if not is_redis_url(url):
        return None
    return Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)


def server_name(client: Redis) -> str:
    """host:port of a plain client's server (a unix socket: its path)."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}"


def broker_memory(client: Redis) -> RedisMemory:
    return read_memory(client, BROKER, server_name(client), _db(client))


def _url_node(url: str) -> str:
    """host:port of a Redis URL, for naming a server that did not answer."""
    try:
        return server_name(Redis.from_url(url))
    except ValueError:
        return redact(url)


def memory_report(
    settings: Settings, buffer: Client | None = None
) -> list[RedisMemory | Unreadable]:
    """The buffer's masters and the broker (when it is a Redis), each read or why not.

    Never raises for Redis' sake: a server that does not answer is an `Unreadable`.
    `buffer` is the buffer's client to use (default: one of this call's own, closed after).
    """
    out: list[RedisMemory | Unreadable] = []
    own = buffer is None
    try:
        if buffer is None:
            buffer = connect(settings, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S)
        out.extend(buffer_memory(buffer))
    except REDIS_FAILURES as exc:
        out.append(Unreadable(BUFFER, _url_node(settings.redis_url), one_line(exc, 200)))
    finally:
        if own and buffer is not None:
            buffer.close()
    broker = broker_client(settings)
    if broker is not None:
        try:
            out.append(broker_memory(broker))
        except REDIS_FAILURES as exc:
            out.append(Unreadable(BROKER, server_name(broker), one_line(exc, 200)))
        finally:
            broker.close()
    return out


def check_eviction(settings: Settings) -> list[str]:
    """At a worker's start-up: raise `EvictionPolicyError` (its one line) when the buffer's or
    the broker's Redis evicts keys, unless `EVENT_BUFFER_ALLOW_EVICTION`.

    Returns warning lines to print: a server that could not be read (the worker
    starts anyway; its connection retries say the rest), or an evicting policy
    that the setting allows.
    """
    report = memory_report(settings)
    read = [r for r in report if isinstance(r, RedisMemory)]
    unread: dict[str, list[Unreadable]] = {}
    for r in report:
        if isinstance(r, Unreadable):
            unread.setdefault(r.node, []).append(r)
    warnings = [
        f"eventbuffer: warning: cannot read the maxmemory-policy of the "
        f"{' and '.join(r.redis for r in found)} Redis {node} ({found[0].error}); "
        "starting without checking it"
        for node, found in unread.items()
    ]
    line = refusal(read)
    if line is None:
        return warnings
    if settings.allow_eviction:
        allowed = line.split(": at maxmemory", 1)[0].removeprefix("eventbuffer: ")
        warnings.append(
            f"eventbuffer: warning: {allowed}; EVENT_BUFFER_ALLOW_EVICTION=true accepts that "
            "the keys it evicts at maxmemory are events lost"
        )
        return warnings
    raise EvictionPolicyError(line)


def human_bytes(value: float) -> str:
    """1536 -> '1.5 KiB' (Redis' `48mb` is 48 MiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
