"""Versioned migrations of the ClickHouse schema, recorded in `eventbuffer_migrations`.

`MIGRATIONS` lists them in order. Each has a version, a name and a `plan`:
the DDL it runs on this server, for this table (standalone or `ON CLUSTER`),
and the *definition* its checksum covers. `migrate()` applies, in order,
every migration not recorded yet, and records each (version, name, checksum,
applied_at, host, detail) right after its DDL ran.

Some migrations depend on a setting or on the server (`reapply=True`): the
retention TTL on `EVENT_BUFFER_RETENTION_DAYS`, the skipping indexes on the
server having them. Their definition names the value (`TTL created_at +
INTERVAL 30 DAY DELETE`, `no TTL`), so a changed value changes the checksum
and `migrate` applies the migration again, recording another row: the latest
row of a version is the one in force. A fixed migration whose recorded
checksum differs from the code's is only reported (`--status`: modified).

Adding a migration is one entry at the end of `MIGRATIONS`, e.g. a table of
its own (`table_migration`):

    Migration(4, "forget audit table", table_migration("eventbuffer_forget_audit",
              "(requested_at DateTime, host String, ...)", order_by="requested_at"))

Several `migrate` at once (hosts, processes): the migrations table is created
first (IF NOT EXISTS: idempotent), then each takes the lock: a
`CREATE TABLE eventbuffer_migrations_lock` *without* IF NOT EXISTS. ClickHouse
creates a table name once: exactly one caller succeeds, the others get
TABLE_ALREADY_EXISTS and wait until it is dropped. On a cluster the CREATE and
DROP run `ON CLUSTER`: every host executes the distributed DDL queue (one
ordered queue in Keeper) in the same order, so the first CREATE in the queue
wins on every host and the later ones fail on every host. The holder reads
what is recorded only once it holds the lock (on a cluster after `SYSTEM
SYNC REPLICA` of the record table), so the others find the migrations done.
A lock left by a killed `migrate` is broken: at once when its holder was a
process of this host that no longer runs, else after `lock_timeout_s`. Every
migration's DDL is idempotent (IF NOT EXISTS, MODIFY TTL to a value), so even
a lock broken while its holder still ran could only repeat work, never undo it.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from worker.errors import SinkError
from worker.sinks.schema import (
    AUDIT_ORDER_BY,
    AUDIT_TABLE,
    COLUMNS,
    MIGRATIONS_LOCK_TABLE,
    MIGRATIONS_TABLE,
    SKIPPING_INDEX_GRANULARITY,
    SKIPPING_INDEX_TYPE,
    SKIPPING_INDEXES,
    add_skipping_indexes,
    audit_body,
    create_cluster_tables,
    create_lock_table,
    create_migrations_table,
    create_table,
    drop_lock_table,
    identifier,
    local_table,
    modify_ttl,
    on_cluster,
    qualified,
    remove_ttl,
    retention_ttl,
    shared_replicated_engine,
)

# Runs one statement, returns its rows; raises SinkError (a sink's `query`).
Run = Callable[[str], list[tuple[Any, ...]]]

TABLE_ALREADY_EXISTS = 57
# Server versions that have each feature (ClickHouse's changelog).
SKIPPING_INDEXES_SINCE = (19, 8)  # bloom_filter indexes (18.16 has no skipping indexes)
TTL_SINCE = (19, 6)
LOCK_TIMEOUT_S = 600.0
LOCK_POLL_S = 0.5


class MigrationError(SinkError):
    """A migration cannot be applied on this server with these settings."""


@dataclass(frozen=True)
class Target:
    """Where the migrations apply: the events table, standalone or on a cluster."""

    table: str
    database: str | None  # None: the session's database (embedded ClickHouse)
    cluster: str | None
    retention_days: int
    server: tuple[int, int]
    columns: Sequence[tuple[str, str]] = COLUMNS

    @property
    def data_table(self) -> str:
        """The table holding the rows: the per-host table behind a Distributed one."""
        return self.table if self.cluster is None else local_table(self.table)


@dataclass(frozen=True)
class Plan:
    definition: str  # what the checksum covers
    statements: tuple[str, ...]
    detail: str  # recorded, and shown by --status


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    plan: Callable[[Target, Run], Plan]
    # Applied again when its definition changes (it depends on a setting or the server).
    reapply: bool = False
    # Depends on EVENT_BUFFER_RETENTION_DAYS: a `migrate` not told the setting
    # (retention_days=None) leaves it as recorded.
    uses_retention: bool = False


# --- The migrations ------------------------------------------------------------


def _events_table(target: Target, run: Run) -> Plan:
    # The checksum covers the table as the code defines it, whatever its name or cluster.
    definition = create_table("events", None, COLUMNS)
    if target.cluster is None:
        statements = [create_table(target.table, target.database, target.columns)]
    else:
        assert target.database is not None
        statements = create_cluster_tables(
            target.table, target.database, target.cluster, target.columns
        )[1:]  # the database exists already
    return Plan(definition, tuple(statements), f"table `{target.table}`")


def _skipping_indexes(target: Target, run: Run) -> Plan:
    indexes = ", ".join(
        f"{name} {column} TYPE {SKIPPING_INDEX_TYPE} GRANULARITY {SKIPPING_INDEX_GRANULARITY}"
        for name, column in SKIPPING_INDEXES
    )
    if target.server < SKIPPING_INDEXES_SINCE:
        major, minor = target.server
        return Plan(
            "none: the server has no data-skipping indexes",
            (),
            f"skipped: ClickHouse {major}.{minor} has no data-skipping indexes "
            f"({'.'.join(map(str, SKIPPING_INDEXES_SINCE))}+); `migrate` adds them once "
            "the server is upgraded",
        )
    statements = add_skipping_indexes(target.data_table, target.database, target.cluster)
    # Servers from before indexes left "experimental" want the setting in the session.
    experimental = run(
        "SELECT value FROM system.settings WHERE name = 'allow_experimental_data_skipping_indices'"
    )
    if experimental and str(experimental[0][0]) == "0":
        statements.insert(0, "SET allow_experimental_data_skipping_indices = 1")
    names = ", ".join(column for _, column in SKIPPING_INDEXES)
    return Plan(indexes, tuple(statements), f"{SKIPPING_INDEX_TYPE} indexes on {names}")


def _has_ttl(target: Target, run: Run) -> bool:
    rows = run(
        "SELECT engine_full FROM system.tables WHERE "
        f"database = {_database_expr(target.database)} AND name = {_literal(target.data_table)}"
    )
    return bool(rows) and " TTL " in f" {rows[0][0]} "


def _retention(target: Target, run: Run) -> Plan:
    days = target.retention_days
    if days <= 0:
        definition = "no TTL"
        if target.server < TTL_SINCE or not _has_ttl(target, run):
            return Plan(definition, (), "no retention TTL (EVENT_BUFFER_RETENTION_DAYS=0)")
        statement = remove_ttl(target.data_table, target.database, target.cluster)
        return Plan(definition, (statement,), "retention TTL removed")
    if target.server < TTL_SINCE:
        major, minor = target.server
        raise MigrationError(
            f"EVENT_BUFFER_RETENTION_DAYS={days} needs a table TTL, which ClickHouse "
            f"{major}.{minor} does not have ({'.'.join(map(str, TTL_SINCE))}+): upgrade the "
            "server, or set EVENT_BUFFER_RETENTION_DAYS=0 and drop old partitions yourself"
        )
    statement = modify_ttl(target.data_table, target.database, target.cluster, days)
    return Plan(retention_ttl(days), (statement,), retention_ttl(days))


def table_migration(name: str, body: str, *, order_by: str) -> Callable[[Target, Run], Plan]:
    """A migration creating bookkeeping table `name` with columns `body` ("(a T, b U)"):
    a MergeTree, or on a cluster one ReplicatedMergeTree every host is a replica of."""
    identifier(name)

    def plan(target: Target, run: Run) -> Plan:
        engine = (
            "MergeTree"
            if target.cluster is None
            else shared_replicated_engine(name, str(target.database))
        )
        statement = (
            f"CREATE TABLE IF NOT EXISTS {qualified(name, target.database)}"
            f"{on_cluster(target.cluster)}\n{body}\nENGINE = {engine}\nORDER BY {order_by}"
        )
        return Plan(f"{body} ORDER BY {order_by}", (statement,), f"table `{name}`")

    return plan


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "events table", _events_table),
    Migration(2, "skipping indexes", _skipping_indexes, reapply=True),
    Migration(3, "retention TTL", _retention, reapply=True, uses_retention=True),
    Migration(
        4,
        "forget audit table",
        table_migration(AUDIT_TABLE, audit_body(), order_by=AUDIT_ORDER_BY),
    ),
)


# --- Records and state ----------------------------------------------------------


@dataclass(frozen=True)
class Record:
    version: int
    name: str
    checksum: str
    applied_at: int  # epoch seconds
    host: str
    detail: str


@dataclass
class MigrationState:
    """One migration as `--status` shows it."""

    version: int
    name: str
    # applied | pending | outdated (applied again by `migrate`) | modified | blocked
    state: str
    checksum: str
    detail: str  # what `migrate` would do, or why it cannot
    applied: Record | None = None
    found: bool = False  # recognised in a table an earlier release created, not recorded


@dataclass
class Report:
    """What one `migrate` did."""

    server: str
    version: int = 0  # the highest version in force afterwards
    applied: list[tuple[int, str, str]] = field(default_factory=list)  # (version, name, detail)
    found: bool = False  # migration 1 recognised in an existing table
    created: bool = False  # migration 1 created the table


def checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _database_expr(database: str | None) -> str:
    return "currentDatabase()" if database is None else _literal(database)


def server_version(run: Run) -> tuple[str, tuple[int, int]]:
    [(text,)] = run("SELECT version()")
    numbers = [int(part) for part in re.findall(r"\d+", str(text))[:2]]
    return str(text), (numbers[0], numbers[1] if len(numbers) > 1 else 0)


def table_exists(run: Run, database: str | None, table: str) -> bool:
    rows = run(
        "SELECT count() FROM system.tables WHERE "
        f"database = {_database_expr(database)} AND name = {_literal(table)}"
    )
    return int(rows[0][0]) > 0


def read_records(run: Run, database: str | None, table: str = "events") -> dict[int, list[Record]]:
    """Every recorded application to `table` by version, oldest first (the last is in force)."""
    if not table_exists(run, database, MIGRATIONS_TABLE):
        return {}
    rows = run(
        "SELECT version, name, checksum, toUInt32(toUnixTimestamp(applied_at)), host, detail "
        f"FROM {qualified(MIGRATIONS_TABLE, database)} WHERE table_name = {_literal(table)} "
        "ORDER BY version, sequence"
    )
    records: dict[int, list[Record]] = {}
    for version, name, check, at, host, detail in rows:
        records.setdefault(int(version), []).append(
            Record(int(version), str(name), str(check), int(at), str(host), str(detail))
        )
    return records


def _record(
    run: Run,
    target: Target,
    migration: Migration,
    check: str,
    detail: str,
    sequence: int,
) -> None:
    """Record an application of `migration` (the `sequence`-th of its version)."""
    values = ", ".join(
        (
            str(migration.version),
            _literal(migration.name),
            _literal(check),
            _literal(socket.gethostname()),
            _literal(detail),
            str(sequence),
            _literal(target.table),
        )
    )
    run(
        f"INSERT INTO {qualified(MIGRATIONS_TABLE, target.database)} "
        f"(version, name, checksum, host, detail, sequence, table_name) SELECT {values}"
    )


def _sync_records(run: Run, target: Target) -> None:
    if target.cluster is not None:
        run(f"SYSTEM SYNC REPLICA {qualified(MIGRATIONS_TABLE, target.database)}")


def states(run: Run, target: Target) -> list[MigrationState]:
    """Each migration: applied, pending, outdated, modified or blocked (reads only)."""
    records = read_records(run, target.database, target.table)
    adopt = not records and table_exists(run, target.database, target.table)
    result = []
    for migration in MIGRATIONS:
        history = records.get(migration.version)
        last = history[-1] if history else None
        try:
            plan = migration.plan(target, run)
        except MigrationError as exc:
            result.append(
                MigrationState(migration.version, migration.name, "blocked", "", str(exc), last)
            )
            continue
        check = checksum(plan.definition)
        if last is None and migration.version == 1 and adopt:
            result.append(
                MigrationState(
                    1, migration.name, "applied", check, "created by an earlier release", None, True
                )
            )
        elif last is None:
            result.append(
                MigrationState(migration.version, migration.name, "pending", check, plan.detail)
            )
        elif last.checksum == check:
            result.append(
                MigrationState(
                    migration.version, migration.name, "applied", check, last.detail, last
                )
            )
        elif migration.reapply:
            result.append(
                MigrationState(
                    migration.version, migration.name, "outdated", check, plan.detail, last
                )
            )
        else:
            result.append(
                MigrationState(
                    migration.version,
                    migration.name,
                    "modified",
                    check,
                    "applied with another definition than this release's (not applied again)",
                    last,
                )
            )
    return result


# --- The lock ---------------------------------------------------------------------

_HOLDER = re.compile(r"^host=(?P<host>[^ ]*) pid=(?P<pid>\d+) since=(?P<since>\d+)$")


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    since: int  # the server's epoch seconds when it took the lock

    def __str__(self) -> str:
        return f"host={self.host} pid={self.pid} since={self.since}"


def _server_now(run: Run) -> int:
    return int(run("SELECT toUInt32(toUnixTimestamp(now()))")[0][0])


def read_holder(run: Run, database: str | None) -> Holder | None:
    rows = run(
        "SELECT default_expression FROM system.columns WHERE "
        f"database = {_database_expr(database)} AND table = {_literal(MIGRATIONS_LOCK_TABLE)} "
        "AND name = 'holder'"
    )
    if not rows:
        return None
    text = str(rows[0][0]).strip().strip("'").replace("\\'", "'")
    match = _HOLDER.match(text)
    if match is None:
        return Holder(text, 0, 0)
    return Holder(match["host"], int(match["pid"]), int(match["since"]))


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "unknown"


def _already_exists(exc: SinkError) -> bool:
    return exc.code == TABLE_ALREADY_EXISTS or "already exists" in str(exc)


@contextmanager
def migrations_lock(
    run: Run,
    database: str | None,
    cluster: str | None,
    *,
    timeout_s: float = LOCK_TIMEOUT_S,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the migrations lock for the block (see the module's docstring)."""
    shown: Holder | None = None
    while True:
        me = Holder(_host(), os.getpid(), _server_now(run))
        try:
            run(create_lock_table(database, cluster, str(me)))
            break
        except SinkError as exc:
            if not _already_exists(exc):
                raise
        holder = read_holder(run, database)
        if holder is None:
            continue  # released in between: try again
        dead = holder.host == me.host and holder.pid != me.pid and _process_gone(holder.pid)
        if dead or me.since - holder.since > timeout_s:
            if on_wait is not None:
                why = "its process is gone" if dead else f"held over {timeout_s:g} s"
                on_wait(f"breaking the migrations lock of {holder} ({why})")
            run(drop_lock_table(database, cluster))
            continue
        if on_wait is not None and holder != shown:
            on_wait(f"waiting for another migrate to finish ({holder})")
            shown = holder
        time.sleep(LOCK_POLL_S)
    try:
        yield
    finally:
        run(drop_lock_table(database, cluster))


# --- migrate ------------------------------------------------------------------------


def migrate(
    run: Run,
    *,
    table: str,
    database: str | None,
    cluster: str | None = None,
    retention_days: int | None = None,
    columns: Sequence[tuple[str, str]] = COLUMNS,
    on_wait: Callable[[str], None] | None = None,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
) -> Report:
    """Apply every pending or outdated migration, in order, under the lock.

    `retention_days`: EVENT_BUFFER_RETENTION_DAYS; None (a caller that does not
    know the setting: tests, benchmarks) leaves a recorded retention as it is
    and applies 0 only where none is recorded. The database must exist. Raises
    MigrationError (nothing after the failing migration is applied; those
    before it stay recorded) or SinkError.
    """
    identifier(table)
    text, version = server_version(run)
    target = Target(table, database, cluster, retention_days or 0, version, columns)
    report = Report(server=text)
    _check_layout(run, target)
    run(create_migrations_table(database, cluster))
    with migrations_lock(run, database, cluster, timeout_s=lock_timeout_s, on_wait=on_wait):
        _sync_records(run, target)
        records = read_records(run, database, table)
        if not records and table_exists(run, database, table):
            # A table an earlier release's `migrate` created: that is migration 1.
            first = MIGRATIONS[0]
            _record(
                run,
                target,
                first,
                checksum(first.plan(target, run).definition),
                "created by an earlier release",
                1,
            )
            report.found = True
            records = read_records(run, database, table)
        for migration in MIGRATIONS:
            history = records.get(migration.version)
            plan = migration.plan(target, run)
            check = checksum(plan.definition)
            keep = not migration.reapply or (migration.uses_retention and retention_days is None)
            if history and (history[-1].checksum == check or keep):
                report.version = migration.version
                continue
            for statement in plan.statements:
                run(statement)
            _record(run, target, migration, check, plan.detail, len(history or ()) + 1)
            report.applied.append((migration.version, migration.name, plan.detail))
            report.created |= migration.version == 1
            report.version = migration.version
    return report


def _check_layout(run: Run, target: Target) -> None:
    """Refuse a cluster's Distributed table without --cluster (its ALTERs would fail
    there, and the local tables would be left as they are)."""
    if target.cluster is not None:
        return
    rows = run(
        "SELECT engine FROM system.tables WHERE "
        f"database = {_database_expr(target.database)} AND name = {_literal(target.table)}"
    )
    if rows and str(rows[0][0]) == "Distributed":
        raise MigrationError(
            f"table `{target.table}` is a Distributed table: run `eventbuffer migrate "
            "--cluster NAME` with the cluster it was created on"
        )


def status(
    run: Run,
    *,
    table: str,
    database: str | None,
    cluster: str | None = None,
    retention_days: int = 0,
    columns: Sequence[tuple[str, str]] = COLUMNS,
) -> tuple[str, list[MigrationState]]:
    """The server's version and the state of every migration (reads only)."""
    text, version = server_version(run)
    target = Target(table, database, cluster, retention_days, version, columns)
    return text, states(run, target)
