"""Which Redis failures heal by waiting, and which do not.

A transient failure leaves the batch in the broker and the task is retried
with backoff for as long as it takes: the connection is down or timed out,
the server is loading its data, out of memory, read-only (a replica, or a
master demoted by a failover), the cluster is moving slots or electing a
master, or the batch is applied but its master's replicas have not
confirmed it yet (`NotReplicatedError`). Anything else (a Lua error,
WRONGTYPE, a bug) will fail the same way again: the ingest task retries it
a few times, then dead-letters the batch.

redis-py's cluster client raises `RedisClusterException`, which is not a
`RedisError`, both for misuse (EVALSHA in a cluster pipeline, a
cross-slot transaction: bugs, not transient) and, while a failover leaves
slots without a master, when it cannot rebuild its slot map: only those
messages are transient (`is_transient`).
"""

from __future__ import annotations

from redis.exceptions import (
    AskError,
    ClusterError,
    ConnectionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

from worker.errors import NotReplicatedError

# ConnectionError covers BusyLoadingError, authentication failures and a full
# connection pool; AskError covers MovedError; ClusterError covers ClusterDownError
# (and MasterDownError) and the cluster client's "TTL exhausted" after too many
# redirections in a row.
TRANSIENT_REDIS_ERRORS: tuple[type[Exception], ...] = (
    ConnectionError,
    TimeoutError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
    ClusterError,
    AskError,
    SlotNotCoveredError,
    NotReplicatedError,
)

# Whatever a call to the buffer's Redis can raise for Redis' sake (not a bug of ours):
# what a watchdog or a metrics scrape survives.
REDIS_FAILURES: tuple[type[Exception], ...] = (RedisError, RedisClusterException)

# What the cluster client says (RedisClusterException) when a failover left it without
# a complete slot map: no reachable node, or slots no node serves yet.
TRANSIENT_CLUSTER_MESSAGES = (
    "Redis Cluster cannot be connected",
    "All slots are not covered",
)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT_REDIS_ERRORS):
        return True
    return isinstance(exc, RedisClusterException) and str(exc).startswith(
        TRANSIENT_CLUSTER_MESSAGES
    )
