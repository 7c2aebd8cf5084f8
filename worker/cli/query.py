"""`eventbuffer query SQL`: run a query against ClickHouse, read-only unless --write.

Read-only is enforced by the engine: the query runs with ClickHouse's
`readonly = 1` (which the query cannot lift). This module's own checks come
first and say why in plain words: one statement, a reading keyword, and no
`INTO OUTFILE` (a client-side file write that `readonly` does not stop),
looked for in the statement with its comments and quoted text taken out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from worker.cli.common import CliError, clickhouse, is_embedded
from worker.errors import SinkError
from worker.settings import Settings

UNKNOWN_TABLE = 60  # ClickHouse's error code

READ_ONLY_STATEMENTS = ("SELECT", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "WITH", "EXISTS")

# Whitespace, comments and opening parentheses before a statement's first keyword.
_LEADING = re.compile(r"(?:\s+|--[^\n]*|#[^\n]*|/\*.*?(?:\*/|\Z)|\()*", re.DOTALL)


def _spans(sql: str) -> list[tuple[str, int, int]]:
    """The statement cut into (kind, start, end): "code", "quoted" or "comment"."""
    spans: list[tuple[str, int, int]] = []
    i, n, code = 0, len(sql), 0
    while i < n:
        c = sql[i]
        if c in "'\"`":
            start = i
            i += 1
            while i < n and sql[i] != c:
                i += 2 if sql[i] == "\\" else 1
            i = min(n, i + 1)
            kind = "quoted"
        elif sql.startswith("--", i) or c == "#":
            start = i
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
            kind = "comment"
        elif sql.startswith("/*", i):
            start = i
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
            kind = "comment"
        else:
            i += 1
            continue
        if code < start:
            spans.append(("code", code, start))
        spans.append((kind, start, i))
        code = i
    if code < n:
        spans.append(("code", code, n))
    return spans


def _first_semicolon(sql: str) -> int:
    """Index of the first `;` outside quotes and comments, or -1."""
    for kind, start, end in _spans(sql):
        if kind == "code" and (at := sql.find(";", start, end)) >= 0:
            return at
    return -1


def code_only(sql: str) -> str:
    """The statement with every comment a space and every quoted text an empty quote."""
    parts = []
    for kind, start, end in _spans(sql):
        parts.append(sql[start:end] if kind == "code" else " " if kind == "comment" else "''")
    return "".join(parts)


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
    if re.search(r"\bINTO\s+OUTFILE\b", code_only(statement), re.IGNORECASE):
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
    # Only a writing query may create embedded ClickHouse's data directory.
    with clickhouse(settings, create=args.write) as sink:
        try:
            columns, rows = sink.query_with_columns(
                sql if more else statement, readonly=not args.write
            )
        except SinkError as exc:
            if exc.code == UNKNOWN_TABLE and settings.clickhouse_table in str(exc):
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
