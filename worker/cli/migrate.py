"""`eventbuffer migrate`: create the ClickHouse database and table (idempotent)."""

from __future__ import annotations

import argparse

from rich.console import Console

from worker.cli.common import clickhouse, mask
from worker.settings import Settings
from worker.sinks import SinkError
from worker.sinks.schema import identifier


def cmd_migrate(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    table = settings.clickhouse_table
    with clickhouse(settings, create=True) as sink:
        try:
            existed = bool(int(sink.query(f"EXISTS TABLE {identifier(table)}")[0][0]))
        except SinkError:
            existed = False  # e.g. the database does not exist yet
        sink.migrate()
    where = mask(settings.clickhouse_url)
    if existed:
        console.print(f"ClickHouse {where}: table `{table}` already exists; nothing to do.")
    else:
        console.print(f"ClickHouse {where}: created table `{table}`.")
    return 0
