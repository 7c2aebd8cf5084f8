"""Applying the versioned migrations, recorded in `eventbuffer_migrations`.

`migrate()` applies, in order, every migration of `MIGRATIONS`
(worker/sinks/migration_plans.py) not recorded yet, or recorded with another
definition where the migration is applied again (`reapply`), and records each
(version, name, checksum, applied_at, host, detail) right after its DDL ran;
`status()` reads what `--status` shows. Several `migrate` at once take turns
under the lock of worker/sinks/migrations_lock.py.
"""

from __future__ import annotations

import hashlib
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from worker.sinks.migration_plans import MIGRATIONS, Migration, MigrationError, Target
from worker.sinks.migrations_lock import LOCK_TIMEOUT_S, migrations_lock
from worker.sinks.schema import (
    COLUMNS,
    MIGRATIONS_TABLE,
    Run,
    create_migrations_table,
    database_expr,
    identifier,
    qualified,
    string_literal,
)

__all__ = [
    "MIGRATIONS",
    "MigrationError",
    "MigrationState",
    "Record",
    "Report",
    "checksum",
    "migrate",
    "read_records",
    "server_version",
    "states",
    "status",
    "table_exists",
]


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


def server_version(run: Run) -> tuple[str, tuple[int, int]]:
    [(text,)] = run("SELECT version()")
    numbers = [int(part) for part in re.findall(r"\d+", str(text))[:2]]
    return str(text), (numbers[0], numbers[1] if len(numbers) > 1 else 0)


def table_exists(run: Run, database: str | None, table: str) -> bool:
    rows = run(
        "SELECT count() FROM system.tables WHERE "
        f"database = {database_expr(database)} AND name = {string_literal(table)}"
    )
    return int(rows[0][0]) > 0


def read_records(run: Run, database: str | None, table: str = "events") -> dict[int, list[Record]]:
    """Every recorded application to `table` by version, oldest first (the last is in force)."""
    if not table_exists(run, database, MIGRATIONS_TABLE):
        return {}
    rows = run(
        "SELECT version, name, checksum, toUInt32(toUnixTimestamp(applied_at)), host, detail "
        f"FROM {qualified(MIGRATIONS_TABLE, database)} WHERE table_name = {string_literal(table)} "
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
            string_literal(migration.name),
            string_literal(check),
            string_literal(socket.gethostname()),
            string_literal(detail),
            str(sequence),
            string_literal(target.table),
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
            if plan.verify is not None:
                plan.verify(run)
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
        f"database = {database_expr(target.database)} AND name = {string_literal(target.table)}"
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
