"""The `events` table: OpenPanel's column types, with dedup tokens enabled.

`non_replicated_deduplication_window` makes a plain MergeTree remember the
last N insert blocks, so an INSERT repeated with the same
`insert_deduplication_token` (a re-driven flush) is dropped.
"""

from __future__ import annotations

import re

# Blocks remembered for dedup. A block is one chunk (default 1000 rows), so
# this covers the last ~10M rows: far more than can be in flight at once.
DEDUP_WINDOW = 10_000

# (name, ClickHouse type) in the order of `worker.events.Row`.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "UUID"),
    ("name", "LowCardinality(String)"),
    ("device_id", "String"),
    ("profile_id", "String"),
    ("project_id", "String"),
    ("session_id", "String"),
    ("path", "String"),
    ("origin", "String"),
    ("referrer", "String"),
    ("referrer_name", "String"),
    ("referrer_type", "LowCardinality(String)"),
    ("properties", "Map(String, String)"),
    ("created_at", "DateTime64(3, 'UTC')"),
    ("country", "LowCardinality(FixedString(2))"),
    ("city", "String"),
    ("region", "LowCardinality(String)"),
    ("longitude", "Nullable(Float32)"),
    ("latitude", "Nullable(Float32)"),
    ("os", "LowCardinality(String)"),
    ("os_version", "LowCardinality(String)"),
    ("browser", "LowCardinality(String)"),
    ("browser_version", "LowCardinality(String)"),
    ("device", "LowCardinality(String)"),
    ("brand", "LowCardinality(String)"),
    ("model", "LowCardinality(String)"),
    ("imported_at", "Nullable(DateTime('UTC'))"),
    ("sdk_name", "LowCardinality(String)"),
    ("sdk_version", "LowCardinality(String)"),
    ("duration", "UInt64"),
)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def identifier(name: str) -> str:
    """Validate a database or table name and return it back-quoted."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a valid ClickHouse identifier: {name!r}")
    return f"`{name}`"


def create_database(database: str) -> str:
    return f"CREATE DATABASE IF NOT EXISTS {identifier(database)}"


def create_table(table: str, database: str | None = None) -> str:
    name = identifier(table) if database is None else f"{identifier(database)}.{identifier(table)}"
    columns = ",\n    ".join(f"{col} {kind}" for col, kind in COLUMNS)
    return (
        f"CREATE TABLE IF NOT EXISTS {name}\n(\n    {columns}\n)\n"
        "ENGINE = MergeTree\n"
        "PARTITION BY toYYYYMM(created_at)\n"
        "ORDER BY (project_id, toDate(created_at), profile_id, name)\n"
        f"SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}"
    )
