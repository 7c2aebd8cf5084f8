"""A sink that hands every call to a real one, for test sinks that hook a write; and a
query that waits for embedded ClickHouse held by another process."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from worker.errors import RetryableSinkError
from worker.sinks import open_sink
from worker.sinks.base import Sink


def query_when_free(url: str, sql: str, timeout: float = 30) -> list[tuple[Any, ...]]:
    """Query the ClickHouse of `url`, waiting while another process holds an embedded
    one's directory (chDB admits one process at a time); closed again after."""
    deadline = time.monotonic() + timeout
    while True:
        sink = open_sink(url)
        try:
            return sink.query(sql)
        except RetryableSinkError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        finally:
            sink.close()


class DelegatingSink:
    """Delegates `write`, `query`, `format_query`, `migrate` and `close` to `inner`, a real sink.

    Subclasses override `write` (and keep their own state) to record, fail,
    pause or kill around the real INSERT.
    """

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.table = inner.table

    def write(self, rows: Sequence[bytes], token: str) -> None:
        self.inner.write(rows, token)

    def query(
        self, sql: str, params: dict[str, Any] | None = None, *, readonly: bool = False
    ) -> list[tuple[Any, ...]]:
        return self.inner.query(sql, params, readonly=readonly)

    def query_with_columns(
        self, sql: str, params: dict[str, Any] | None = None, *, readonly: bool = False
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        return self.inner.query_with_columns(sql, params, readonly=readonly)

    def format_query(self, sql: str) -> str:
        return self.inner.format_query(sql)

    def migrate(self) -> None:
        self.inner.migrate()

    def close(self) -> None:
        self.inner.close()


class RecordingSink(DelegatingSink):
    """A real sink that records every write and can fail on cue, as a server going away would.

    `writes` holds (rows, token) of every attempt, failed ones included;
    `accepted` the tokens the real sink took. With `fail_after`, every
    attempt once that many writes were accepted raises `error` (a
    `RetryableSinkError` by default) instead of writing: the server stays away.
    """

    def __init__(
        self, inner: Sink, *, fail_after: int | None = None, error: Exception | None = None
    ) -> None:
        super().__init__(inner)
        self.fail_after = fail_after
        self.error = error or RetryableSinkError("Code: 209. connection reset (injected)", 209)
        self.writes: list[tuple[int, str]] = []
        self.accepted: list[str] = []

    @property
    def tokens(self) -> list[str]:
        """The token of every attempt, in order."""
        return [token for _, token in self.writes]

    def write(self, rows: Sequence[bytes], token: str) -> None:
        self.writes.append((len(rows), token))
        if self.fail_after is not None and len(self.accepted) >= self.fail_after:
            raise self.error
        self.inner.write(rows, token)
        self.accepted.append(token)
