"""`eventbuffer query SQL`: run a query against ClickHouse, read-only unless --write.

Read-only is decided by the engine: ClickHouse parses the statement and its
syntax tree must be a read that reaches nothing outside ClickHouse
(worker/cli/statement.py); it then runs with `readonly = 1`, which the query
cannot lift. With --write the text goes to ClickHouse as typed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from worker.cli.common import CliError, clickhouse, is_embedded
from worker.cli.statement import read_only_statement
from worker.errors import SinkError
from worker.settings import Settings
from worker.sinks import Sink
from worker.sinks.schema import identifier

UNKNOWN_TABLE = 60  # ClickHouse's error code


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _tsv(value: Any) -> str:
    if value is None:
        return "\\N"
    return _cell(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _table_exists(sink: Sink, table: str) -> bool:
    """Does the events table exist? (A query naming another table, a typo, must not be
    told to run `migrate`.) Assumed to exist when ClickHouse cannot say."""
    try:
        [(found,)] = sink.query(f"EXISTS TABLE {identifier(table)}")
    except (SinkError, ValueError):
        return True
    return bool(int(found))


def cmd_query(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    sql = sys.stdin.read() if args.sql == "-" else args.sql
    started = time.perf_counter()
    # Only a writing query may create embedded ClickHouse's data directory.
    with clickhouse(settings, create=args.write, readonly=not args.write) as sink:
        statement = sql if args.write else read_only_statement(sink, sql)
        try:
            columns, rows = sink.query_with_columns(statement, readonly=not args.write)
        except SinkError as exc:
            if exc.code == UNKNOWN_TABLE and not _table_exists(sink, settings.clickhouse_table):
                where = "embedded ClickHouse" if is_embedded(settings) else "the server"
                raise CliError(
                    f"{' '.join(str(exc).split())[:300]} (the `{settings.clickhouse_table}` "
                    f"table does not exist in {where}: create it with `eventbuffer migrate`)"
                ) from None
            raise
    seconds = time.perf_counter() - started
    if args.format == "json":
        print(json.dumps({"columns": columns, "rows": rows}, ensure_ascii=False, default=str))
    elif args.format == "tsv":
        if columns:
            print("\t".join(_tsv(c) for c in columns))
        for row in rows:
            print("\t".join(_tsv(v) for v in row))
    elif not columns:
        console.print(f"OK ({seconds:.3f} s)")
    else:
        table = Table()
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(_cell(v) for v in row))
        console.print(table)
        console.print(f"{len(rows):,} row{'s' if len(rows) != 1 else ''} in {seconds:.3f} s")
    return 0
