"""Where the buffer lives: one Redis, or the masters of a Redis Cluster.

`connect(settings)` builds the client: `redis.Redis` for one server, or,
with `EVENT_BUFFER_REDIS_CLUSTER=true`, redis-py's `RedisCluster`, which
discovers every node from the one `REDIS_URL` names.

Every key of shard N carries the hash tag `{<prefix>:N}`, so a shard lives
in one slot, on one master. Single-key commands, Lua scripts (all of whose
keys belong to one shard), SCAN (the cluster client scans every master) and
non-transactional pipelines (split per node by the cluster client) go
through the client either way. What needs one connection to one server goes
to `node_for(client, key)` instead: the plain `redis.Redis` of the master
serving the key's slot (the client itself outside a cluster). The apply's
MULTI/EXEC is one of those (on a cluster a transaction cannot even span two
slots of one master: `transactions()` groups keys accordingly), and so is
WAIT, which counts the writes of the connection it is sent on.

A node-level call that fails because the cluster changed under it (a dead
master, MOVED after a failover, CLUSTERDOWN while it elects one) makes the
cluster client reload its slot map (`refreshed_on_error`), so the retry of
the task goes to the master that serves the slot now.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from worker.errors import SettingsError
from worker.settings import Settings

# Every buffer client: one Redis, or a Redis Cluster.
Client: TypeAlias = Redis | RedisCluster

T = TypeVar("T")

# Errors of a node-level call that say the slot map may be out of date (AskError covers
# MovedError, ClusterDownError covers MasterDownError).
_STALE_MAP = (AskError, ClusterDownError, TryAgainError, ConnectionError, TimeoutError,
              ReadOnlyError)  # fmt: skip


def connect(settings: Settings, **options: Any) -> Client:
    """The buffer's client for `settings` (`options`: socket timeouts and the like)."""
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, **options)
    return Redis.from_url(settings.redis_url, **options)


def is_cluster(client: Client) -> bool:
    return isinstance(client, RedisCluster)


@dataclass(frozen=True)
class Node:
    """One server of the buffer: its name (host:port) and a plain client of it."""

    name: str
    redis: Redis


def _own_name(client: Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}"


def node_for(client: Client, key: str) -> Node:
    """The master that serves `key`'s slot, as a plain client (one Redis: itself)."""
    if isinstance(client, RedisCluster):
        node = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
        return Node(str(node.name), client.get_redis_connection(node))
    return Node(_own_name(client), client)


def transactions(client: Client, keys: Sequence[str]) -> list[tuple[Node, list[int]]]:
    """The positions of `keys` grouped by the transactions that can hold them, each with
    the master to run it on, in first-seen order.

    On one Redis, one transaction holds them all. On a cluster, one per slot:
    Redis refuses a MULTI/EXEC (and a WATCH) whose keys are in several slots,
    CROSSSLOT, even when one master serves them all.
    """
    groups: dict[object, tuple[Node, list[int]]] = {}
    for position, key in enumerate(keys):
        node = node_for(client, key)
        group_key: object = node.name
        if isinstance(client, RedisCluster):
            group_key = client.keyslot(key)  # type: ignore[no-untyped-call]
        group = groups.get(group_key)
        if group is None:
            group = groups[group_key] = (node, [])
        group[1].append(position)
    return list(groups.values())


def masters(client: Client) -> list[Node]:
    """Every master of the buffer (one Redis: itself)."""
    if isinstance(client, RedisCluster):
        primaries = client.get_primaries()  # type: ignore[no-untyped-call]
        return [Node(str(n.name), client.get_redis_connection(n)) for n in primaries]
    return [Node(_own_name(client), client)]


def refresh(client: Client) -> None:
    """Reload a cluster client's slot map now (nothing for one Redis).

    The reload may itself fail while the cluster has no master for some
    slots; the next call tries again.
    """
    if isinstance(client, RedisCluster):
        with suppress(RedisClusterException, ConnectionError, TimeoutError, ClusterDownError):
            client.nodes_manager.initialize()


@contextmanager
def refreshed_on_error(client: Client) -> Iterator[None]:
    """Around a node-level call: reload the slot map if the call says it is stale."""
    try:
        yield
    except _STALE_MAP:
        refresh(client)
        raise


def on_node(client: Client, key: str, call: Callable[[Node], T]) -> T:
    """`call` on the master serving `key`, reloading the slot map if it turns out stale."""
    with refreshed_on_error(client):
        return call(node_for(client, key))


def _cluster_enabled(url: str) -> bool:
    """Does the Redis at `url` run in cluster mode? (False when it cannot be asked.)"""
    client = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except (ConnectionError, TimeoutError, ResponseError):
        return False  # unreachable: Celery says so itself, with its retries
    finally:
        client.close()


def check_celery_apart(settings: Settings) -> None:
    """With the buffer on a Redis Cluster, refuse a broker or result backend that is a
    cluster node too (kombu and Celery's Redis backend speak to one plain Redis).

    `Settings` refuses an empty broker and one named like `REDIS_URL`; this asks the
    servers themselves (a worker's start-up).
    """
    if not settings.redis_cluster:
        return
    for variable, url in (
        ("CELERY_BROKER_URL", settings.broker_url),
        ("CELERY_RESULT_BACKEND", settings.result_backend),
    ):
        if url.startswith(("redis://", "rediss://")) and _cluster_enabled(url):
            raise SettingsError(
                f"{variable} names a Redis Cluster node: with EVENT_BUFFER_REDIS_CLUSTER=true, "
                "CELERY_BROKER_URL must name RabbitMQ (amqp://) or a plain Redis, and "
                "CELERY_RESULT_BACKEND a plain Redis (or stay empty: no results are kept)"
            )
