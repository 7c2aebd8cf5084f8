"""Migrations on Debian's ClickHouse 18.16: an existing table is recognised as
migration 1, the skipping indexes are a recorded no-op, a retention TTL is
refused, and the lock works from several threads and processes at once. (18.16
cannot create the full `events` table: it has no Map or DateTime64, so these use
the columns it has.)
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.migrations import (
    ALL,
    AUDIT,
    AUDIT_ROW,
    COMPAT_COLUMNS,
    ONCE,
    RETENTION,
    ROOT,
    SKIPPING_INDEXES,
    after,
    applied_details,
    cli_env,
    finish,
    ids,
    migrate_together,
    now_ms,
    old_table,
    race_for_a_dead_holders_lock,
    row,
    versions,
)
from worker.privacy.clickhouse import record_audit
from worker.sinks.migrations import MigrationError, read_records, status
from worker.sinks.native import NativeSink
from worker.sinks.schema import AUDIT_COLUMNS, AUDIT_TABLE


def test_old_server_upgrades_with_recorded_no_ops(old_server_url: str) -> None:
    url = old_table(old_server_url)
    database = urlsplit(url).path[1:]
    sink = NativeSink(url, require_dedup=False)
    try:
        sink.write([row(now_ms(), id=str(uuid.UUID(int=7)))], "t")
        report = sink.migrate(columns=COMPAT_COLUMNS)
        assert report.found and [v for v, _, _ in report.applied] == after(1)
        details = applied_details(report)
        skipped = "skipped: ClickHouse 18.16 has no data-skipping indexes"
        assert details[SKIPPING_INDEXES].startswith(skipped)
        # The forget audit table, with its DateTime('UTC') columns, as forget fills it.
        assert details[AUDIT] == f"table `{AUDIT_TABLE}`"
        described = [(r[0], r[1]) for r in sink.query(f"DESCRIBE TABLE {AUDIT_TABLE}")]
        assert described == list(AUDIT_COLUMNS)
        record_audit(sink, AUDIT_ROW)
        [(selector, at)] = sink.query(f"SELECT selector, toString(requested_at) FROM {AUDIT_TABLE}")
        assert (selector, at) == ("profile", "2026-01-02 03:04:05")
        assert ids(sink) == [str(uuid.UUID(int=7))]
        with pytest.raises(MigrationError, match=r"ClickHouse 18\.16 does not have"):
            sink.migrate(columns=COMPAT_COLUMNS, retention_days=30)
        _, states = status(
            sink.query,
            table="events",
            database=database,
            retention_days=30,
            columns=COMPAT_COLUMNS,
        )
        assert {s.version: s.state for s in states} == dict.fromkeys(ALL, "applied") | {
            RETENTION: "blocked"
        }
        assert sink.migrate(columns=COMPAT_COLUMNS).applied == []
        assert versions(read_records(sink.query, database)) == ONCE
    finally:
        sink.close()


def test_old_server_concurrent_migrates_apply_each_version_once(old_server_url: str) -> None:
    url = old_table(old_server_url)
    reports = migrate_together(url, 6, columns=COMPAT_COLUMNS)
    assert all(not isinstance(r, Exception) for r in reports), reports
    assert sorted(len(r.applied) for r in reports) == [0] * 5 + [len(after(1))]
    assert sum(r.found for r in reports) == 1
    sink = NativeSink(url, require_dedup=False)
    try:
        assert versions(read_records(sink.query, urlsplit(url).path[1:])) == ONCE
    finally:
        sink.close()


OLD_SERVER_RUNNER = """
import sys
from tests.support.migrations import COMPAT_COLUMNS
from worker.sinks.native import NativeSink
sink = NativeSink(sys.argv[1], require_dedup=False)
report = sink.migrate(columns=COMPAT_COLUMNS, on_wait=lambda m: print(m, file=sys.stderr))
print([v for v, _, _ in report.applied], report.found)
"""


def test_old_server_several_processes_at_once(old_server_url: str) -> None:
    url = old_table(old_server_url)
    database = urlsplit(url).path[1:]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OLD_SERVER_RUNNER, url],
            env=cli_env(url),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [finish(p) for p in processes]
    assert [code for code, _, _ in results] == [0] * 4, results
    outs = sorted(out.strip() for _, out, _ in results)
    assert outs == [f"{after(1)} True"] + ["[] False"] * 3 or outs.count("[] False") == 3, outs
    sink = NativeSink(url, require_dedup=False)
    try:
        assert versions(read_records(sink.query, database)) == ONCE
    finally:
        sink.close()


def test_old_server_dead_holders_lock_is_broken_by_one_of_many(
    old_server_url: str, tmp_path: Path
) -> None:
    url = old_table(old_server_url)
    database = urlsplit(url).path[1:]
    admin = NativeSink(url, require_dedup=False)
    try:
        race_for_a_dead_holders_lock(admin.query, [url] * 6, database, None, tmp_path)
    finally:
        admin.close()
