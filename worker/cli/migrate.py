"""`eventbuffer migrate`: create the ClickHouse database and table (idempotent).

`--cluster NAME` creates them on every host of a ClickHouse cluster: a
`ReplicatedMergeTree` table `<table>_local` per host and the Distributed
table `<table>` over them (see `worker.sinks.schema.create_cluster_tables`).
"""

from __future__ import annotations

import argparse

from rich.console import Console

from worker.cli.common import CliError, clickhouse, is_embedded, mask
from worker.settings import Settings
from worker.sinks import SinkError
from worker.sinks.schema import identifier, local_table


def cmd_migrate(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    from worker.sinks.native import NativeSink  # clickhouse-driver only when needed

    table = settings.clickhouse_table
    cluster: str | None = getattr(args, "cluster", None)
    if cluster is not None:
        try:
            identifier(cluster)
        except ValueError as exc:
            raise CliError(f"--cluster: {exc}") from None
    if cluster is not None and is_embedded(settings):
        raise CliError(
            "--cluster needs a ClickHouse server: set CLICKHOUSE_URL to a clickhouse:// "
            "or clickhouses:// URL of one of the cluster's hosts"
        )
    with clickhouse(settings, create=True) as sink:
        try:
            existed = bool(int(sink.query(f"EXISTS TABLE {identifier(table)}")[0][0]))
        except SinkError:
            existed = False  # e.g. the database does not exist yet
        if isinstance(sink, NativeSink):
            sink.migrate(cluster)
        else:
            sink.migrate()
    where = mask(settings.clickhouse_url)
    if cluster is not None:
        console.print(
            f"ClickHouse {where}: table `{table}` (Distributed) over `{local_table(table)}` "
            f"(ReplicatedMergeTree) on every host of cluster `{cluster}`"
            + (" (already existed)." if existed else ".")
        )
    elif existed:
        console.print(f"ClickHouse {where}: table `{table}` already exists; nothing to do.")
    else:
        console.print(f"ClickHouse {where}: created table `{table}`.")
    return 0
