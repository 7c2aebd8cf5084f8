"""Which Redis failures heal by waiting, and which do not.

A transient failure leaves the batch in the broker and the task is retried
with backoff for as long as it takes: the connection is down or timed out,
the server is loading its data, out of memory, read-only (a replica, or a
master demoted by a failover), or the cluster is moving slots or electing a
master. Anything else (a Lua error, WRONGTYPE, a bug) will fail the same way
again: the ingest task retries it a few times, then dead-letters the batch.
"""

from __future__ import annotations

from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    OutOfMemoryError,
    ReadOnlyError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

# ConnectionError covers BusyLoadingError, authentication failures and a full
# connection pool; AskError covers MovedError; ClusterDownError covers MasterDownError.
TRANSIENT_REDIS_ERRORS: tuple[type[Exception], ...] = (
    ConnectionError,
    TimeoutError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
    AskError,
    SlotNotCoveredError,
)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_REDIS_ERRORS)
