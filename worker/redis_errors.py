"""Which Redis failures heal by waiting, and which do not.

A transient failure leaves the batch in the broker and the task is retried
with backoff for as long as it takes: the connection is down or timed out,
the server is loading its data, out of memory, read-only (a replica, or a
master demoted by a failover), the cluster is moving slots or electing a
master, or the batch is applied but its master's replicas have not
confirmed it yet (`NotReplicatedError`). Anything else (a Lua error,
WRONGTYPE, a bug) will fail the same way again: the ingest task retries it
a few times, then dead-letters the batch.

What the cluster client really raised during the failovers of
tests/test_redis_cluster_failover.py (a master SIGKILLed, its promoted
replica SIGKILLed too, the first node back by takeover): `ConnectionError`
(the dead master, until the slot map moves), `MovedError` (a slot map
older than the failover), `ClusterDownError` (CLUSTERDOWN from the live
masters while some slots have none), `NotReplicatedError` (a promoted
master alone), and, for a client built while the node `REDIS_URL` names is
down, `RedisClusterException("Redis Cluster cannot be connected ...")`.

`RedisClusterException` is not a `RedisError`, and redis-py raises it for
misuse too (EVALSHA in a cluster pipeline, a cross-slot transaction: bugs,
not transient): only the messages of a slot map it cannot build are
transient (`is_transient`). "All slots are not covered" is the other one
redis-py's NodesManager raises then (read in its source; not seen in the
tests, where CLUSTER SLOTS kept listing the dead master).
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

# What the cluster client says (RedisClusterException) when it cannot build a slot map:
# no reachable node, or slots no node serves.
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
