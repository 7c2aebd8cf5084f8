"""`eventbuffer query SQL`: run a query against ClickHouse, read-only unless --write."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from worker.cli.common import CliError, clickhouse
from worker.settings import Settings

READ_ONLY_STATEMENTS = ("SELECT", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "WITH", "EXISTS")

# Whitespace, comments and opening parentheses before a statement's first keyword.
_LEADING = re.compile(r"(?:\s+|--[^\n]*|#[^\n]*|/\*.*?(?:\*/|\Z)|\()*", re.DOTALL)


def _first_semicolon(sql: str) -> int:
    """Index of the first `;` outside quotes and comments, or -1."""
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            i += 1
            while i < n and sql[i] != c:
                i += 2 if sql[i] == "\\" else 1
            i += 1
        elif sql.startswith("--", i) or c == "#":
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c == ";":
            return i
        else:
            i += 1
    return -1


def _skip_leading(sql: str) -> str:
    return sql[_LEADING.match(sql).end() :]  # type: ignore[union-attr]


def split_statement(sql: str) -> tuple[str, bool]:
    """(the first statement without a trailing `;`, whether more statements follow)."""
    end = _first_semicolon(sql)
    if end < 0:
        return sql, False
    rest = _skip_leading(sql[end + 1 :].replace(";", " "))
    return sql[:end], bool(rest.strip())


def statement_keyword(sql: str) -> str:
    match = re.match(r"[A-Za-z]+", _skip_leading(sql))
    return match.group(0).upper() if match else ""


def check_read_only(sql: str) -> None:
    statement, more = split_statement(sql)
    if more:
        raise CliError("refusing several statements at once without --write", 2)
    keyword = statement_keyword(statement)
    if keyword not in READ_ONLY_STATEMENTS:
        shown = keyword or "an empty statement"
        raise CliError(
            f"refusing {shown}: read-only by default (SELECT, SHOW, DESCRIBE, EXPLAIN, WITH, "
            "EXISTS); pass --write to run it",
            2,
        )
    if re.search(r"\bINTO\s+OUTFILE\b", statement, re.IGNORECASE):
        raise CliError("refusing INTO OUTFILE: it writes a file; pass --write to run it", 2)


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


def cmd_query(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    sql = sys.stdin.read() if args.sql == "-" else args.sql
    if not args.write:
        check_read_only(sql)
    statement, more = split_statement(sql)
    started = time.perf_counter()
    with clickhouse(settings) as sink:
        columns, rows = sink.query_with_columns(sql if more else statement)
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
