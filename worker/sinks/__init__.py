"""ClickHouse backends, chosen by the scheme of `CLICKHOUSE_URL`."""

from __future__ import annotations

from worker.settings import Settings, SettingsError
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
    "sink_for",
]


def open_sink(
    url: str,
    table: str = "events",
    *,
    connect_timeout_s: float | None = None,
    insert_timeout_s: float | None = None,
) -> Sink:
    """The backend for a `chdb://`, `clickhouse://` or `clickhouses://` URL.

    The timeouts (None: the backend's defaults) bound opening a connection
    (native protocol only) and each INSERT, so a hung ClickHouse fails a write
    as retryable instead of holding a flush: see `sink_for`.
    """
    scheme = url.split("://", 1)[0]
    if scheme == "chdb":
        from worker.sinks.chdb import ChdbSink, path_from_url

        return ChdbSink(path_from_url(url), table, insert_timeout_s=insert_timeout_s)
    if scheme in ("clickhouse", "clickhouses"):
        from worker.sinks.native import NativeSink

        return NativeSink(
            url, table, connect_timeout_s=connect_timeout_s, insert_timeout_s=insert_timeout_s
        )
    raise SettingsError(f"unsupported ClickHouse URL scheme {scheme!r}")


def sink_for(settings: Settings) -> Sink:
    """The sink `settings` name: its URL, table and ClickHouse timeouts."""
    return open_sink(
        settings.clickhouse_url,
        settings.clickhouse_table,
        connect_timeout_s=settings.clickhouse_connect_timeout_s,
        insert_timeout_s=settings.clickhouse_insert_timeout_s,
    )
