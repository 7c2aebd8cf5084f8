"""Erasing a person's rows from ClickHouse, and the audit table of every request.

- Embedded ClickHouse (chDB) and servers that have it: a lightweight
  `DELETE FROM` (rows are masked at once, dropped at the next merges).
- A server without it (the Debian 18.16 one): `ALTER TABLE ... DELETE WHERE`,
  a mutation, which forget waits for.
- A cluster (the events table is Distributed): the mutation on every shard's
  local table, `ON CLUSTER`.

In every case forget then reads the rows back through the events table until
none is left: the erasure is complete when that count is 0, whatever ran it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.errors import PermanentSinkError
from worker.events import format_datetime
from worker.privacy.selector import Selector
from worker.sinks.base import Sink
from worker.sinks.schema import (
    AUDIT_COLUMNS,
    AUDIT_ORDER_BY,
    AUDIT_TABLE,
    audit_body,
    identifier,
    qualified,
)

# How long forget waits for a mutation to have deleted every row.
MUTATION_WAIT_S = 600.0
MUTATION_POLL_S = 0.2
_DISTRIBUTED = re.compile(r"Distributed\(\s*'?([A-Za-z0-9_]+)'?\s*,\s*'?([A-Za-z0-9_]*)'?\s*,")


def audit_ddl(database: str | None = None) -> str:
    """CREATE TABLE IF NOT EXISTS for the audit table (any ClickHouse since 18.16): the
    fallback on a database `eventbuffer migrate` has not created it in (migration 4)."""
    return (
        f"CREATE TABLE IF NOT EXISTS {qualified(AUDIT_TABLE, database)}\n{audit_body()}\n"
        f"ENGINE = MergeTree\nORDER BY {AUDIT_ORDER_BY}"
    )


def _embedded(sink: Sink) -> bool:
    return type(sink).__name__ == "ChdbSink"


class Params:
    """Query parameters in the syntax of the sink: chDB binds `{name:Type}`,
    clickhouse-driver quotes `%(name)s` on the client."""

    def __init__(self, sink: Sink) -> None:
        self.embedded = _embedded(sink)
        self.values: dict[str, Any] = {}

    def __call__(self, name: str, value: Any, kind: str = "String") -> str:
        self.values[name] = value
        return f"{{{name}:{kind}}}" if self.embedded else f"%({name})s"


@dataclass(frozen=True)
class Target:
    """Where the rows are: the table read through, and the table (and cluster) to delete in."""

    read: str
    delete: str
    cluster: str | None
    created_at_ms: bool  # created_at keeps milliseconds (DateTime64), else seconds


def target(sink: Sink) -> Target:
    table = sink.table
    identifier(table)  # a plain name: it is quoted into the lookups below
    rows = sink.query(
        "SELECT engine_full FROM system.tables WHERE database = currentDatabase() "
        f"AND name = '{table}'"
    )
    if not rows:
        raise PermanentSinkError(f"table {table} does not exist: run `eventbuffer migrate`")
    engine = str(rows[0][0])
    kinds = sink.query(
        "SELECT type FROM system.columns WHERE database = currentDatabase() "
        f"AND table = '{table}' AND name = 'created_at'"
    )
    millis = bool(kinds) and "DateTime64" in str(kinds[0][0])
    match = _DISTRIBUTED.match(engine)
    if match is None:
        return Target(identifier(table), identifier(table), None, millis)
    cluster, database = match.group(1), match.group(2)
    local = engine[match.end() :].split(",", 1)[0].strip().strip("'` ")
    delete = f"{identifier(database)}.{identifier(local)}" if database else identifier(local)
    return Target(identifier(table), delete, cluster, millis)


def _where(selector: Selector, until_ms: int, millis: bool, p: Params) -> str:
    moment = until_ms / 1000 if millis else until_ms // 1000
    text = format_datetime(datetime.fromtimestamp(moment, UTC))
    # A typed constant: 18.16 cannot compare its sort key's toDate(created_at) with text.
    if millis:
        moment_sql = f"toDateTime64({p('until', text)}, 3, 'UTC')"
    else:
        moment_sql = f"toDateTime({p('until', text[:19])}, 'UTC')"
    return (
        f"project_id = {p('project', selector.project_id)} "
        f"AND {selector.column} = {p('person', selector.value)} "
        f"AND created_at <= {moment_sql}"
    )


def count_rows(sink: Sink, selector: Selector, until_ms: int, where: Target | None = None) -> int:
    where = where or target(sink)
    p = Params(sink)
    condition = _where(selector, until_ms, where.created_at_ms, p)
    [(count,)] = sink.query(f"SELECT count() FROM {where.read} WHERE {condition}", p.values)
    return int(count)


def erase_rows(sink: Sink, selector: Selector, until_ms: int) -> int:
    """Delete the person's rows created up to `until_ms`; returns how many there were."""
    where = target(sink)
    found = count_rows(sink, selector, until_ms, where)
    if not found:
        return 0
    p = Params(sink)
    condition = _where(selector, until_ms, where.created_at_ms, p)
    if p.embedded:
        sink.query(f"DELETE FROM {where.delete} WHERE {condition}", p.values)
    else:
        on = f" ON CLUSTER {identifier(where.cluster)}" if where.cluster else ""
        sink.query(f"ALTER TABLE {where.delete}{on} DELETE WHERE {condition}", p.values)
    deadline = time.monotonic() + MUTATION_WAIT_S
    while (left := count_rows(sink, selector, until_ms, where)) > 0:
        if time.monotonic() > deadline:
            raise PermanentSinkError(
                f"{left} row(s) of the person are still in {sink.table} after "
                f"{MUTATION_WAIT_S:.0f} s: see system.mutations; run forget again"
            )
        time.sleep(MUTATION_POLL_S)
    return found


def record_audit(sink: Sink, values: dict[str, Any], cluster: str | None = None) -> None:
    """Create the audit table if missing and add one request's row to it."""
    sink.query(audit_ddl())
    p = Params(sink)
    kinds = dict(AUDIT_COLUMNS)
    names = ", ".join(column for column, _ in AUDIT_COLUMNS)
    # INSERT ... SELECT: the whole statement runs on the server (an INSERT ... VALUES
    # over the native protocol waits for data blocks instead).
    selected = ", ".join(
        f"CAST({p(column, values[column], kinds[column].split('(')[0])} AS {kinds[column]})"
        for column, _ in AUDIT_COLUMNS
    )
    sink.query(f"INSERT INTO {identifier(AUDIT_TABLE)} ({names}) SELECT {selected}", p.values)
