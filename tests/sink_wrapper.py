"""A sink that hands every call to a real one, for test sinks that hook a write."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.sinks.base import Sink


class DelegatingSink:
    """Delegates `write`, `query`, `migrate` and `close` to `inner`, a real sink.

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

    def migrate(self) -> None:
        self.inner.migrate()

    def close(self) -> None:
        self.inner.close()
