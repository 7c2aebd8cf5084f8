"""The `events` table: OpenPanel's column types, with dedup tokens enabled.

`non_replicated_deduplication_window` makes a plain MergeTree remember the
last N insert blocks, so an INSERT repeated with the same
`insert_deduplication_token` (a re-driven flush) is dropped.

On a ClickHouse cluster (`create_cluster_tables`), `<table>_local` is a
`ReplicatedMergeTree` on every host of the cluster, whose Keeper path holds
the ids of the last `DEDUP_WINDOW` blocks for `DEDUP_WINDOW_SECONDS`, shared
by the shard's replicas; `<table>` is a `Distributed` table over them that
routes each row by `SHARDING_KEY`, a hash of the event id. A re-driven chunk
therefore sends the same rows, in the same order, to the same shard: each
shard sees the same block again (same token, same content) and drops it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from worker.errors import IdentifierError

# Blocks remembered for dedup. A block is one chunk (default 20,000 rows), so
# this covers the last ~200M rows inserted at full chunks (a quiet tick's claim
# smaller than a chunk is a block of its own): far more than can be in flight at once.
# On a cluster a chunk becomes one block per shard and partition it touches.
DEDUP_WINDOW = 10_000
# How long a Replicated table keeps a block id, whatever the count (ClickHouse
# 26.x defaults to one hour; a claim left open across a long ClickHouse outage
# must still be recognised when it is re-driven).
DEDUP_WINDOW_SECONDS = 7 * 86_400

# Rows go to shard cityHash64(id) % total weight (over the id as text: 18.16
# cannot hash a UUID column directly): the same event always lands
# on the same shard, so a re-driven chunk splits into the same per-shard blocks.
SHARDING_KEY = "cityHash64(toString(id))"
LOCAL_SUFFIX = "_local"

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
    """Validate a database, table or cluster name and return it back-quoted.

    Raises IdentifierError (a ValueError) for any other name."""
    if not _IDENTIFIER.match(name):
        raise IdentifierError(name)
    return f"`{name}`"


def create_database(database: str) -> str:
    return f"CREATE DATABASE IF NOT EXISTS {identifier(database)}"


_LAYOUT = (
    "PARTITION BY toYYYYMM(created_at)\n"
    "ORDER BY (project_id, toDate(created_at), profile_id, name)\n"
)


def _columns(columns: Sequence[tuple[str, str]]) -> str:
    body = ",\n    ".join(f"{col} {kind}" for col, kind in columns)
    return f"(\n    {body}\n)\n"


def create_table(
    table: str, database: str | None = None, columns: Sequence[tuple[str, str]] = COLUMNS
) -> str:
    name = identifier(table) if database is None else f"{identifier(database)}.{identifier(table)}"
    return (
        f"CREATE TABLE IF NOT EXISTS {name}\n{_columns(columns)}"
        "ENGINE = MergeTree\n"
        f"{_LAYOUT}"
        f"SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}"
    )


def local_table(table: str) -> str:
    """The name of the per-host table behind the Distributed table `table`."""
    return f"{table}{LOCAL_SUFFIX}"


def create_cluster_tables(
    table: str, database: str, cluster: str, columns: Sequence[tuple[str, str]] = COLUMNS
) -> list[str]:
    """DDL, in order, for `table` on every host of `cluster` (`ON CLUSTER`).

    Each host needs the macros `{shard}` and `{replica}` in its configuration
    (ClickHouse's usual replication setup) and the cluster must be defined in
    `remote_servers` with `internal_replication` true: the Distributed table
    writes each shard's block to one replica and replication copies it.
    """
    db, on = identifier(database), f"ON CLUSTER {identifier(cluster)}"
    local = local_table(table)
    identifier(local)
    # The Keeper path names database and table literally (ClickHouse before
    # 20.x has no {database}/{table} macros); {shard}/{replica} are the host's.
    keeper_path = f"/clickhouse/tables/{{shard}}/{database}/{local}"
    return [
        f"CREATE DATABASE IF NOT EXISTS {db} {on}",
        f"CREATE TABLE IF NOT EXISTS {db}.{identifier(local)} {on}\n{_columns(columns)}"
        f"ENGINE = ReplicatedMergeTree('{keeper_path}', '{{replica}}')\n"
        f"{_LAYOUT}"
        f"SETTINGS replicated_deduplication_window = {DEDUP_WINDOW}, "
        f"replicated_deduplication_window_seconds = {DEDUP_WINDOW_SECONDS}",
        f"CREATE TABLE IF NOT EXISTS {db}.{identifier(table)} {on}\n{_columns(columns)}"
        f"ENGINE = Distributed({identifier(cluster)}, {db}, {identifier(local)}, {SHARDING_KEY})",
    ]


# --- Versioned migrations (worker/sinks/migrations.py) ------------------------

MIGRATIONS_TABLE = "eventbuffer_migrations"
# Exists only while a `migrate` holds the lock; its `holder` column's DEFAULT
# names the holder (host, pid, server time), readable on every host.
MIGRATIONS_LOCK_TABLE = "eventbuffer_migrations_lock"

# Data-skipping indexes (migration 2): `forget` finds one person's rows by them.
SKIPPING_INDEXES: tuple[tuple[str, str], ...] = (
    ("idx_profile_id", "profile_id"),
    ("idx_device_id", "device_id"),
)
SKIPPING_INDEX_TYPE = "bloom_filter"
SKIPPING_INDEX_GRANULARITY = 4


def qualified(table: str, database: str | None) -> str:
    """`db`.`table`, or `table` alone on the session's database."""
    return identifier(table) if database is None else f"{identifier(database)}.{identifier(table)}"


# Runs one statement, returns its rows; raises SinkError (a sink's `query`).
Run = Callable[[str], list[tuple[Any, ...]]]


def string_literal(text: str) -> str:
    """`text` as a ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def database_expr(database: str | None) -> str:
    """The database as an expression: a literal, or the session's (`currentDatabase()`)."""
    return "currentDatabase()" if database is None else string_literal(database)


def on_cluster(cluster: str | None) -> str:
    return "" if cluster is None else f" ON CLUSTER {identifier(cluster)}"


def shared_replicated_engine(table: str, database: str) -> str:
    """A ReplicatedMergeTree every host of the cluster is a replica of (one Keeper path
    for all shards): a small bookkeeping table that reads the same from any host. The
    replica name joins the host's `{shard}` and `{replica}` macros, unique per host."""
    return (
        f"ReplicatedMergeTree('{shared_replicated_path(table, database)}', '{{shard}}-{{replica}}')"
    )


def shared_replicated_path(table: str, database: str) -> str:
    """The Keeper path of `shared_replicated_engine`'s table (its `replicas` list its hosts)."""
    return f"/clickhouse/eventbuffer/{database}/{table}"


def create_migrations_table(database: str | None, cluster: str | None = None) -> str:
    """The record of applied migrations: one row per application (a setting-dependent
    migration applied again adds a row, `sequence` 2, 3...: the last is in force), for
    each events table of the database (`table_name`)."""
    if cluster is not None and database is None:
        raise ValueError("a cluster's migrations table needs a database")
    engine = (
        "MergeTree"
        if cluster is None
        else shared_replicated_engine(MIGRATIONS_TABLE, str(database))
    )
    return (
        f"CREATE TABLE IF NOT EXISTS {qualified(MIGRATIONS_TABLE, database)}"
        f"{on_cluster(cluster)}\n"
        "(\n    version UInt32,\n    name String,\n    checksum String,\n"
        "    applied_at DateTime DEFAULT now(),\n    host String,\n    detail String,\n"
        "    sequence UInt32,\n    table_name String\n)\n"
        f"ENGINE = {engine}\nORDER BY (table_name, version, sequence)"
    )


def create_lock_table(
    database: str | None, cluster: str | None, holder: str, table: str = MIGRATIONS_LOCK_TABLE
) -> str:
    """Taking the migrations lock (or, `table`, the right to break a stale one): a CREATE
    without IF NOT EXISTS, which exactly one of several concurrent callers wins (on a
    cluster, through the ordered DDL queue)."""
    quoted = holder.replace("\\", "\\\\").replace("'", "\\'")
    return (
        f"CREATE TABLE {qualified(table, database)}{on_cluster(cluster)} "
        f"(holder String DEFAULT '{quoted}') ENGINE = Memory"
    )


def drop_lock_table(
    database: str | None, cluster: str | None, table: str = MIGRATIONS_LOCK_TABLE
) -> str:
    return f"DROP TABLE IF EXISTS {qualified(table, database)}{on_cluster(cluster)}"


def add_skipping_indexes(table: str, database: str | None, cluster: str | None) -> list[str]:
    """Migration 2's DDL: add each index (if missing), then build it for existing parts
    (MATERIALIZE INDEX runs as a background mutation: the ALTER returns at once)."""
    target = f"ALTER TABLE {qualified(table, database)}{on_cluster(cluster)}"
    statements = [
        f"{target} ADD INDEX IF NOT EXISTS {name} {column} "
        f"TYPE {SKIPPING_INDEX_TYPE} GRANULARITY {SKIPPING_INDEX_GRANULARITY}"
        for name, column in SKIPPING_INDEXES
    ]
    statements += [f"{target} MATERIALIZE INDEX {name}" for name, _ in SKIPPING_INDEXES]
    return statements


def retention_ttl(days: int) -> str:
    """The table TTL that deletes rows `days` after their `created_at`."""
    return f"TTL created_at + INTERVAL {int(days)} DAY DELETE"


def modify_ttl(table: str, database: str | None, cluster: str | None, days: int) -> str:
    target = f"{qualified(table, database)}{on_cluster(cluster)}"
    return f"ALTER TABLE {target} MODIFY {retention_ttl(days)}"


def remove_ttl(table: str, database: str | None, cluster: str | None) -> str:
    return f"ALTER TABLE {qualified(table, database)}{on_cluster(cluster)} REMOVE TTL"


# --- The `forget` audit table (migration 4) ------------------------------------

# One row per `eventbuffer forget` request; forget never erases it. `migrate`
# creates it (migration 4, replicated on every host of a cluster); forget creates
# it too, IF NOT EXISTS, on a database not migrated yet.
AUDIT_TABLE = "eventbuffer_forget_audit"
AUDIT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("requested_at", "DateTime('UTC')"),
    ("requested_ms", "UInt64"),
    ("user", "String"),
    ("host", "String"),
    ("project_id", "String"),
    ("selector", "String"),
    ("selector_id", "String"),
    ("clickhouse_rows", "UInt64"),
    ("buffer_rows", "UInt64"),
    ("claimed_rows", "UInt64"),
    ("last_views", "UInt64"),
    ("dead_letters", "UInt64"),
    ("visitors", "UInt64"),
    ("tombstone_expires_at", "DateTime('UTC')"),
)
AUDIT_ORDER_BY = "(requested_at, project_id)"


def audit_body() -> str:
    """The audit table's columns in parentheses, one a line (migration 4's body)."""
    return _columns(AUDIT_COLUMNS).rstrip("\n")
