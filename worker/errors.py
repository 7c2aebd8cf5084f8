"""Every error eventbuffer raises on purpose, under one root: `EventBufferError`.

    EventBufferError
    ├── SettingsError          a setting in the environment is malformed
    ├── InvalidEvent           an event failed validation (field, problem)
    ├── SinkError              a ClickHouse write or query failed (code)
    │   ├── RetryableSinkError     transient: retry the same write later
    │   └── PermanentSinkError     will not heal by retrying; not the rows' fault
    │       ├── RowRejectedError       ClickHouse refused rows of the chunk
    │       └── PoisonGuardError       most of a claim refused (worker/claim_insert.py)
    ├── IdentifierError        a database, table or cluster name ClickHouse cannot take (name)
    ├── BufferKeyTypeError     a buffer key holds a value of the wrong type (key)
    ├── BatchIdConflictError   a batch id was applied before with other content (stored)
    ├── NotReplicatedError     too few replicas confirmed a write (node, wanted, confirmed)
    ├── EvictionPolicyError    the buffer's or broker's Redis would evict keys at maxmemory
    ├── FlushError             a shard's flush stopped (shard, lock)
    │   ├── LockLostError          the flush lock expired or was taken over
    │   │   └── QueueMovedError    another flusher trimmed the queue under this one's claim
    │   └── LockHeldError          a live flusher kept the lock longer than it could wait (holder)
    ├── ProducerError          the producer client holds events it could not send (unsent)
    │   ├── BufferFull             max_pending events are held
    │   ├── ProducerClosed         send() after close()
    │   └── BrokerNearlyFull       the broker stayed above its headroom (worker/headroom.py)
    ├── TaskBodyError          a task body holds no batch of events eventbuffer can read
    ├── JsonSliceError         a JSON text whose outer level cannot be cut (worker/json_slices.py)
    ├── ShutdownRequested      the worker stops while an ingest task waits in place
    ├── UntestedKombu          the installed kombu is not one the reliable transport was tested with
    ├── ConsumerAlive          a broker recovery found its consumer alive again
    ├── CliError               a command line failure, with its exit code (worker/cli/common.py)
    │   └── ClickHouseBusy         embedded ClickHouse held by another process
    └── Stopped                SIGINT or SIGTERM while `eventbuffer run` was starting

Each is re-exported by the module that raises it (`worker.events.InvalidEvent`,
`worker.sinks.SinkError`, ...). This module imports nothing. Errors that were
`ValueError`s or `RuntimeError`s before they joined the tree still are.
"""

from __future__ import annotations


class EventBufferError(Exception):
    """The root of eventbuffer's own errors."""


class SettingsError(EventBufferError, ValueError):
    """A setting in the environment is malformed."""


class InvalidEvent(EventBufferError, ValueError):
    """An event failed validation. `field` is a dotted path, `problem` says why."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class SinkError(EventBufferError):
    """A ClickHouse write or query failed; `code` is ClickHouse's error code, if known."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class RetryableSinkError(SinkError):
    """Transient: retry the same write later."""


class PermanentSinkError(SinkError):
    """Will not succeed by retrying; not the rows' fault."""


class RowRejectedError(PermanentSinkError):
    """ClickHouse rejected one or more rows of the chunk."""


class IdentifierError(EventBufferError, ValueError):
    """A database, table or cluster name is not a plain ClickHouse identifier (letters,
    digits, `_`, not starting with a digit), so it cannot be put into a statement.

    `name` is the name refused (worker/sinks/schema.py's `identifier`).
    """

    def __init__(self, name: str) -> None:
        super().__init__(f"not a valid ClickHouse identifier: {name!r}")
        self.name = name


class BufferKeyTypeError(EventBufferError):
    """A key of the buffer holds a value of the wrong type: something else wrote it.

    The apply script checks before it writes anything, so nothing was applied.
    """

    def __init__(self, key: str) -> None:
        super().__init__(f"Redis key {key!r} holds a value of the wrong type for the buffer")
        self.key = key


class BatchIdConflictError(EventBufferError):
    """A batch id was applied before with other content, and the caller keeps no conflict.

    `EventBuffer.apply` without a way to keep the batch raises it instead of
    skipping the batch as a duplicate (ingest keeps it as a
    `batch_id_conflict` dead letter instead: worker/ingestion.py).
    """

    def __init__(self, marker: str, stored: str, digest: str) -> None:
        super().__init__(
            f"batch marker {marker} holds digest {stored}, not this batch's {digest}: "
            "the batch id was used before for other content"
        )
        self.marker = marker
        self.stored = stored
        self.digest = digest


class NotReplicatedError(EventBufferError):
    """Fewer replicas than `EVENT_BUFFER_MIN_REPLICAS` confirmed a write (WAIT) in time.

    The write is on the master `node` only: a failover now could lose it. Transient:
    the ingest task is retried (its batch marker skips the batch, then WAITs again),
    and a flush stops before inserting rows of a claim that could be forgotten.
    """

    def __init__(self, what: str, *, node: str, wanted: int, confirmed: int) -> None:
        super().__init__(
            f"{what} is on {node} but only {confirmed} of the {wanted} replica(s) required "
            "(EVENT_BUFFER_MIN_REPLICAS) confirmed it: a failover now could lose it"
        )
        self.node = node
        self.wanted = wanted
        self.confirmed = confirmed


class EvictionPolicyError(EventBufferError):
    """The buffer's or the broker's Redis has a `maxmemory-policy` other than `noeviction`.

    Its message is the one line a worker stops with at start-up: the server, the policy
    and the fix (worker/redis_memory.py).
    """


class FlushError(EventBufferError):
    """A shard's flush stopped; `shard` and `lock` (the lock's key) when known."""

    def __init__(self, message: str, *, shard: int | None = None, lock: str | None = None) -> None:
        super().__init__(message)
        self.shard = shard
        self.lock = lock


class LockLostError(FlushError):
    """The flush lock expired or was taken over while a flush was working."""


class QueueMovedError(LockLostError):
    """A claim's rows could not be read: the queue's head moved after the claim was made.

    Only an ack moves it, so another flusher acknowledged a claim of this
    shard meanwhile: this one no longer holds the lock in any useful sense.
    """


class LockHeldError(FlushError):
    """Another flusher, alive by every sign, held the shard's lock past the wait for it.

    `holder` names it (host:pid, or the token of a holder that did not say).
    """

    def __init__(self, message: str, *, shard: int, lock: str, holder: str) -> None:
        super().__init__(message, shard=shard, lock=lock)
        self.holder = holder


class ProducerError(EventBufferError):
    """Events could not be sent or accepted; `unsent` events are held in memory."""

    def __init__(self, message: str, unsent: int) -> None:
        super().__init__(message)
        self.unsent = unsent


class BufferFull(ProducerError):
    """`max_pending` events are held unsent: the caller must slow down or drop."""


class ProducerClosed(ProducerError):
    """`send()` after `close()`."""


class TaskBodyError(EventBufferError, ValueError):
    """A task body holds no batch of events eventbuffer can read."""


class JsonSliceError(EventBufferError, ValueError):
    """The text is not a JSON array (or object) whose outer level can be cut."""


class ShutdownRequested(EventBufferError):
    """The worker is stopping: give the message back instead of waiting on."""


class UntestedKombu(EventBufferError, RuntimeError):
    """The installed kombu is not one the reliable transport was tested with."""


class ConsumerAlive(EventBufferError):
    """A recovery found the consumer alive again: none of its messages were moved."""


class Stopped(EventBufferError):
    """SIGINT or SIGTERM arrived while `eventbuffer run` was starting."""
