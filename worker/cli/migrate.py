"""`eventbuffer migrate`: apply the versioned schema migrations (idempotent).

The migrations and how concurrent runs are made safe: worker/sinks/migrations.py.
`--cluster NAME` applies them on every host of a ClickHouse cluster (`ON
CLUSTER`): a `ReplicatedMergeTree` table `<table>_local` per host and the
Distributed table `<table>` over them (`worker.sinks.schema.create_cluster_tables`).
`--status` lists every migration, applied or pending, and changes nothing
(`--json`: one JSON object).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from worker.cli.common import CliError, clickhouse, is_embedded, mask, require_embedded_data
from worker.errors import IdentifierError
from worker.settings import Settings
from worker.sinks import SinkError
from worker.sinks.migrations import MigrationError, MigrationState, Report, status
from worker.sinks.schema import identifier, local_table


def add_migrate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options beyond --cluster (worker/cli/app.py defines the subcommand)."""
    parser.add_argument(
        "--status", action="store_true", help="list applied and pending migrations; change nothing"
    )
    parser.add_argument("--json", action="store_true", help="--status: print one JSON object")


def _iso(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds")


def _cluster(args: argparse.Namespace, settings: Settings) -> str | None:
    cluster: str | None = getattr(args, "cluster", None)
    if cluster is not None:
        try:
            identifier(cluster)
        except IdentifierError as exc:
            raise CliError(f"--cluster: {exc}") from None
    if cluster is not None and is_embedded(settings):
        raise CliError(
            "--cluster needs a ClickHouse server: set CLICKHOUSE_URL to a clickhouse:// "
            "or clickhouses:// URL of one of the cluster's hosts"
        )
    return cluster


def cmd_migrate(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    cluster = _cluster(args, settings)
    if getattr(args, "status", False):
        return _show_status(args, settings, console, cluster)
    if getattr(args, "json", False):
        raise CliError("--json goes with --status")
    table = settings.clickhouse_table

    def waiting(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with clickhouse(settings, create=True) as sink:
        try:
            report = sink.migrate(cluster, retention_days=settings.retention_days, on_wait=waiting)
        except MigrationError as exc:
            raise CliError(f"migrate: {exc}") from None
    _print_report(console, settings, table, cluster, report)
    return 0


def _print_report(
    console: Console, settings: Settings, table: str, cluster: str | None, report: Report
) -> None:
    where = mask(settings.clickhouse_url)
    if report.found:
        console.print(
            f"ClickHouse {where}: table `{table}` already exists (an earlier release's): "
            "recorded as migration 1."
        )
    for version, name, detail in report.applied:
        console.print(f"applied {version}: {name}: {detail}")
    if cluster is not None:
        console.print(
            f"ClickHouse {where}: table `{table}` (Distributed) over `{local_table(table)}` "
            f"(ReplicatedMergeTree) on every host of cluster `{cluster}`"
            + (" (already existed)" if not report.created else "")
            + f", at migration {report.version}."
        )
    elif report.created:
        console.print(
            f"ClickHouse {where}: created table `{table}`, at migration {report.version}."
        )
    elif not report.applied:
        console.print(
            f"ClickHouse {where}: table `{table}` already exists, at migration "
            f"{report.version}; nothing to do."
        )
    else:
        console.print(f"ClickHouse {where}: table `{table}` is at migration {report.version}.")


def _state_data(state: MigrationState) -> dict[str, Any]:
    applied = state.applied
    return {
        "version": state.version,
        "name": state.name,
        "status": state.state,
        "checksum": state.checksum,
        "detail": state.detail,
        "applied_at": _iso(applied.applied_at) if applied else None,
        "host": applied.host if applied else None,
        "applied_checksum": applied.checksum if applied else None,
        "found": state.found,
    }


def _show_status(
    args: argparse.Namespace, settings: Settings, console: Console, cluster: str | None
) -> int:
    from worker.sinks.native import NativeSink

    require_embedded_data(settings)
    with clickhouse(settings, readonly=True) as sink:
        database = sink.database if isinstance(sink, NativeSink) else None
        try:
            server, states = status(
                lambda sql: sink.query(sql, readonly=True),
                table=settings.clickhouse_table,
                database=database,
                cluster=cluster,
                retention_days=settings.retention_days,
            )
        except SinkError as exc:
            raise CliError(f"migrate --status: {exc}") from None
    pending = [s.version for s in states if s.state not in ("applied", "modified")]
    if args.json:
        data = {
            "clickhouse": mask(settings.clickhouse_url),
            "server": server,
            "table": settings.clickhouse_table,
            "cluster": cluster,
            "migrations": [_state_data(s) for s in states],
            "pending": pending,
        }
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    grid = Table(box=box.SIMPLE, show_edge=False)
    for column in ("#", "name", "status", "applied (UTC)", "host", "detail"):
        grid.add_column(column, no_wrap=column in ("#", "status", "applied (UTC)"))
    for s in states:
        applied = s.applied
        grid.add_row(
            str(s.version),
            s.name,
            s.state,
            _iso(applied.applied_at)[:16].replace("T", " ")
            if applied
            else ("(found)" if s.found else "-"),
            applied.host if applied else "-",
            s.detail,
        )
    console.print(
        f"ClickHouse {mask(settings.clickhouse_url)} ({server}), table "
        f"`{settings.clickhouse_table}`" + (f", cluster `{cluster}`" if cluster else "") + ":"
    )
    console.print(grid)
    console.print(
        f"{len(pending)} pending: run `eventbuffer migrate`." if pending else "Nothing pending."
    )
    return 0
