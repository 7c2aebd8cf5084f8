"""The writer interface every ClickHouse backend implements, and its errors.

A sink takes rows as the JSON lines stored in Redis (one normalized event
each) and writes them as one INSERT carrying a deduplication token: writing
the same rows with the same token twice stores them once.

Errors are typed so the flusher knows what to do:

- `RetryableSinkError`: the write may succeed later unchanged (connection
  refused, timeout, too many parts, embedded data directory busy). The claim
  stays open and is re-driven with the same tokens.
- `RowRejectedError`: ClickHouse rejected the data itself (a value it cannot
  parse or store). The flusher splits the chunk to find the bad rows and
  dead-letters only them.
- `PermanentSinkError`: anything else that will not heal by retrying (no such
  table, bad credentials, server too old). The flush stops; nothing is
  dead-lettered, because the rows are not at fault.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from celery.exceptions import SoftTimeLimitExceeded

from worker.errors import PermanentSinkError, RetryableSinkError, RowRejectedError, SinkError
from worker.sinks.migrations import Report

__all__ = [
    "INTERRUPTS",
    "PermanentSinkError",
    "RetryableSinkError",
    "RowRejectedError",
    "Sink",
    "SinkError",
    "classify",
    "error_code",
]


# Raised into a task from outside (Celery's soft time limit): a sink lets them
# through instead of turning them into a sink error, so they end the task.
INTERRUPTS: tuple[type[BaseException], ...] = (SoftTimeLimitExceeded,)

# ClickHouse error codes (src/Common/ErrorCodes.cpp) that mean "try again".
# Not 164 (READONLY): a read-only user or setting does not heal by waiting;
# 242 (TABLE_IS_READ_ONLY) does: a replicated table that lost its Keeper session.
RETRYABLE_CODES = frozenset(
    {
        3,  # UNEXPECTED_END_OF_FILE
        159,  # TIMEOUT_EXCEEDED
        202,  # TOO_MANY_SIMULTANEOUS_QUERIES
        203,  # NO_FREE_CONNECTION
        209,  # SOCKET_TIMEOUT
        210,  # NETWORK_ERROR
        236,  # ABORTED
        241,  # MEMORY_LIMIT_EXCEEDED
        242,  # TABLE_IS_READ_ONLY
        252,  # TOO_MANY_PARTS
        285,  # TOO_FEW_LIVE_REPLICAS
        319,  # UNKNOWN_STATUS_OF_INSERT
        425,  # SYSTEM_ERROR
        473,  # DEADLOCK_AVOIDED
        999,  # KEEPER_EXCEPTION
    }
)

# Codes that blame the data of the insert, not the table or the server.
ROW_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        19,  # SIZES_OF_NESTED_COLUMNS_ARE_INCONSISTENT
        26,  # CANNOT_PARSE_QUOTED_STRING
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        32,  # ATTEMPT_TO_READ_AFTER_EOF
        33,  # CANNOT_READ_ALL_DATA
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        131,  # TOO_LARGE_STRING_SIZE
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
        376,  # CANNOT_PARSE_UUID
        441,  # CANNOT_PARSE_ESCAPE_SEQUENCE
        459,  # CANNOT_PARSE_BOOL
        691,  # UNKNOWN_ELEMENT_OF_ENUM
    }
)

_CODE = re.compile(r"Code:\s*(\d+)")


def error_code(message: str) -> int | None:
    """The ClickHouse error code quoted in an exception message, if any."""
    match = _CODE.search(message)
    return int(match.group(1)) if match else None


def classify(message: str, code: int | None = None) -> SinkError:
    """Map a ClickHouse error to the sink error type the flusher acts on."""
    if code is None:
        code = error_code(message)
    if code in RETRYABLE_CODES:
        return RetryableSinkError(message, code)
    if code in ROW_CODES:
        return RowRejectedError(message, code)
    return PermanentSinkError(message, code)


class Sink(Protocol):
    """A ClickHouse backend: one table, written in chunks with dedup tokens."""

    table: str

    def write(self, rows: Sequence[bytes], token: str) -> None:
        """Insert the JSON rows as one block deduplicated by `token`.

        Raises RetryableSinkError, RowRejectedError or PermanentSinkError.
        """
        ...

    def query(
        self, sql: str, params: dict[str, Any] | None = None, *, readonly: bool = False
    ) -> list[tuple[Any, ...]]:
        """Run a query; `params` are never formatted in by hand.

        `readonly`: the engine itself refuses anything but reading (ClickHouse's
        `readonly = 1`, which the query cannot lift). It does not refuse
        `INTO OUTFILE` in chDB nor table functions under DESCRIBE: SQL from a
        user goes through worker/cli/statement.py first.
        """
        ...

    def query_with_columns(
        self, sql: str, params: dict[str, Any] | None = None, *, readonly: bool = False
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Like `query`, also returning the result's column names."""
        ...

    def format_query(self, sql: str) -> str:
        """ClickHouse's own single-line text of `sql`, which must be one statement.

        The engine parses it (`formatQuerySingleLine`, read-only) and runs none
        of it: comments, heredocs and characters its lexer skips are gone from
        the answer. Raises SinkError for a syntax error, several statements, or
        a server without the function.
        """
        ...

    def migrate(
        self,
        cluster: str | None = None,
        *,
        retention_days: int | None = None,
        columns: Sequence[tuple[str, str]] = ...,
        on_wait: Callable[[str], None] | None = None,
    ) -> Report:
        """Apply the pending migrations, the table first (worker/sinks/migrations.py):
        idempotent, safe from several processes or hosts at once."""
        ...

    def close(self) -> None:
        """Release connections or the embedded data directory."""
        ...
