"""Versioned migrations on embedded chDB (ClickHouse 26.x, no mocks): a fresh
migrate applies every version once, a table created the way the previous release
did is upgraded in place, `migrate --status` lists applied and pending versions,
and several `migrate` processes at once apply each version once.

Elsewhere: retention (tests/test_retention.py); the lock on a ClickHouse server
(tests/test_migrations_lock.py); rolling upgrades (tests/test_migrations_rolling_upgrade.py);
Debian's ClickHouse 18.16 (tests/test_migrations_old_server.py) and its loopback
cluster (tests/test_migrations_cluster.py).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Result
from tests.support.migrations import (
    ALL,
    AUDIT,
    DAY_MS,
    LATEST,
    ONCE,
    PREVIOUS_RELEASE_DDL,
    RETENTION,
    after,
    applied_details,
    engine_full,
    finish,
    ids,
    index_names,
    now_ms,
    row,
    start_migrate,
    versions,
)
from worker.privacy.clickhouse import audit_ddl
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink, path_from_url
from worker.sinks.migrations import MIGRATIONS, read_records
from worker.sinks.migrations_lock import _host
from worker.sinks.schema import AUDIT_COLUMNS, AUDIT_TABLE, COLUMNS


def test_fresh_migrate_applies_every_version_once(embedded: ChdbSink) -> None:
    report = embedded.migrate()
    assert [v for v, _, _ in report.applied] == ALL == sorted(set(ALL))
    assert report.created and not report.found and report.version == LATEST
    described = [(r[0], r[1]) for r in embedded.query("DESCRIBE TABLE events")]
    assert described == list(COLUMNS)
    assert index_names(embedded) == ["idx_device_id", "idx_profile_id"]
    assert " TTL " not in engine_full(embedded)
    again = embedded.migrate()
    assert (again.applied, again.version, again.created) == ([], LATEST, False)
    records = read_records(embedded.query, None)
    assert versions(records) == ONCE
    assert records[1][0].host == _host() and records[1][0].checksum


def test_a_previous_release_table_upgrades_in_place(embedded: ChdbSink) -> None:
    embedded.query(PREVIOUS_RELEASE_DDL)
    kept = [row(now_ms() - n * DAY_MS, id=str(uuid.UUID(int=n + 1))) for n in range(20)]
    embedded.write(kept, "old:0")
    assert index_names(embedded) == []

    report = embedded.migrate()

    assert report.found and not report.created
    assert [v for v, _, _ in report.applied] == after(1)
    records = read_records(embedded.query, None)
    assert versions(records) == ONCE
    assert records[1][0].detail == "created by an earlier release"
    assert ids(embedded) == [str(uuid.UUID(int=n + 1)) for n in range(20)]
    assert index_names(embedded) == ["idx_device_id", "idx_profile_id"]
    # The dedup window the previous release relied on is still there.
    embedded.write(kept, "old:0")
    assert len(ids(embedded)) == 20
    # The index serves a person's rows (what `forget` will look them up by).
    [(found,)] = embedded.query("SELECT count() FROM events WHERE profile_id = 'u1'")
    assert int(found) == 20


def test_status_lists_applied_and_pending(
    run_main: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:

    old = ChdbSink(path_from_url(settings.clickhouse_url))
    old.query(PREVIOUS_RELEASE_DDL)
    old.close()

    before = run_main("migrate", "--status", "--json")
    assert before.code == 0, before.err
    data = __import__("json").loads(before.out)
    states = {m["version"]: (m["status"], m["found"]) for m in data["migrations"]}
    assert states == {1: ("applied", True)} | dict.fromkeys(after(1), ("pending", False))
    assert data["pending"] == after(1)
    text = run_main("migrate", "--status")
    pending = f"{len(after(1))} pending: run `eventbuffer migrate`."
    assert pending in text.out and "(found)" in text.out

    upgraded: Result = run_main("migrate")
    assert upgraded.code == 0, upgraded.err
    assert "recorded as migration 1" in upgraded.out
    assert "applied 2: skipping indexes" in upgraded.out
    assert "Nothing pending." in run_main("migrate", "--status").out

    monkeypatch.setenv("EVENT_BUFFER_RETENTION_DAYS", "7")
    changed = __import__("json").loads(run_main("migrate", "--status", "--json").out)
    assert changed["pending"] == [RETENTION]
    retention = next(m for m in changed["migrations"] if m["version"] == RETENTION)
    assert retention["status"] == "outdated"
    assert "TTL created_at + INTERVAL 7 DAY DELETE" in retention["detail"]
    assert "applied 3: retention TTL" in run_main("migrate").out
    assert __import__("json").loads(run_main("migrate", "--status", "--json").out)["pending"] == []
    assert run_main("migrate", "--json").code != 0  # --json goes with --status


def test_several_processes_migrate_embedded_at_once(tmp_path: Path) -> None:
    url = f"chdb://{tmp_path / 'clickhouse'}"
    results = [finish(p) for p in [start_migrate(url) for _ in range(3)]]
    assert [code for code, _, _ in results] == [0, 0, 0], results
    assert sum("created table `events`" in out for _, out, _ in results) == 1
    sink = ChdbSink(str(tmp_path / "clickhouse"))
    try:
        assert versions(read_records(sink.query, None)) == ONCE
    finally:
        sink.close()


def test_the_versions_tests_name_are_those_migrations() -> None:
    names = {m.version: m.name for m in MIGRATIONS}
    assert (names[RETENTION], names[AUDIT]) == ("retention TTL", "forget audit table")
    assert list(range(1, LATEST + 1)) == ALL


def test_migrate_creates_the_forget_audit_table_forget_would(embedded: ChdbSink) -> None:
    """Migration 4 creates the audit table with the columns forget inserts (defined once,
    in worker.sinks.schema); forget's own CREATE IF NOT EXISTS is then a no-op."""
    assert embedded.query(f"EXISTS TABLE {AUDIT_TABLE}") == [(0,)]
    report = embedded.migrate()
    assert applied_details(report)[AUDIT] == f"table `{AUDIT_TABLE}`"
    described = [(r[0], r[1]) for r in embedded.query(f"DESCRIBE TABLE {AUDIT_TABLE}")]
    assert described == list(AUDIT_COLUMNS)
    [(engine,)] = embedded.query(
        f"SELECT engine FROM system.tables WHERE database = currentDatabase() "
        f"AND name = '{AUDIT_TABLE}'"
    )
    assert engine == "MergeTree"
    embedded.query(audit_ddl())  # forget's fallback: the table is there already
    assert versions(read_records(embedded.query, None)) == ONCE


def test_an_installation_migrated_before_the_audit_table_gets_only_it(
    embedded: ChdbSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release before migration 4 migrated (1-3 recorded), then its forget created
    the audit table itself; this release's migrate applies 4 alone and keeps the rows."""
    previous = tuple(m for m in MIGRATIONS if m.version < AUDIT)
    with monkeypatch.context() as patched:
        patched.setattr("worker.sinks.migrations.MIGRATIONS", previous)
        assert [v for v, _, _ in embedded.migrate().applied] == [m.version for m in previous]
    embedded.query(audit_ddl())
    embedded.query(f"INSERT INTO {AUDIT_TABLE} (user, host) VALUES ('ops', 'h1')")

    report = embedded.migrate()

    assert [v for v, _, _ in report.applied] == after(RETENTION) and report.version == LATEST
    assert versions(read_records(embedded.query, None)) == ONCE
    assert embedded.query(f"SELECT user, host FROM {AUDIT_TABLE}") == [("ops", "h1")]
