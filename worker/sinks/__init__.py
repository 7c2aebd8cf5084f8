"""ClickHouse backends, chosen by the scheme of `CLICKHOUSE_URL`."""

from __future__ import annotations

from worker.sinks.base import (
    PermanentSinkError,
    RetryableSinkError,
    RowRejectedError,
    Sink,
    SinkError,
)

__all__ = [
    "PermanentSinkError",
    "RetryableSinkError",
    "RowRejectedError",
    "Sink",
    "SinkError",
    "open_sink",
]


def open_sink(url: str, table: str = "events") -> Sink:
    """The backend for a `chdb://`, `clickhouse://` or `clickhouses://` URL."""
    scheme = url.split("://", 1)[0]
    if scheme == "chdb":
        from worker.sinks.chdb import ChdbSink, path_from_url

        return ChdbSink(path_from_url(url), table)
    if scheme in ("clickhouse", "clickhouses"):
        from worker.sinks.native import NativeSink

        return NativeSink(url, table)
    raise ValueError(f"unsupported ClickHouse URL scheme {scheme!r}")
