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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Result
from tests.support.migrations import (
    DAY_MS,
    PREVIOUS_RELEASE_DDL,
    engine_full,
    finish,
    ids,
    index_names,
    now_ms,
    row,
    start_migrate,
    versions,
)
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink, path_from_url
from worker.sinks.migrations import MIGRATIONS, read_records
from worker.sinks.migrations_lock import _host
from worker.sinks.schema import COLUMNS


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[ChdbSink]:
    sink = ChdbSink(str(tmp_path / "clickhouse"))
    try:
        yield sink
    finally:
        sink.close()


def test_fresh_migrate_applies_every_version_once(embedded: ChdbSink) -> None:
    report = embedded.migrate()
    assert [v for v, _, _ in report.applied] == [m.version for m in MIGRATIONS] == [1, 2, 3]
    assert report.created and not report.found and report.version == 3
    described = [(r[0], r[1]) for r in embedded.query("DESCRIBE TABLE events")]
    assert described == list(COLUMNS)
    assert index_names(embedded) == ["idx_device_id", "idx_profile_id"]
    assert " TTL " not in engine_full(embedded)
    again = embedded.migrate()
    assert (again.applied, again.version, again.created) == ([], 3, False)
    records = read_records(embedded.query, None)
    assert versions(records) == {1: 1, 2: 1, 3: 1}
    assert records[1][0].host == _host() and records[1][0].checksum


def test_a_previous_release_table_upgrades_in_place(embedded: ChdbSink) -> None:
    embedded.query(PREVIOUS_RELEASE_DDL)
    kept = [row(now_ms() - n * DAY_MS, id=str(uuid.UUID(int=n + 1))) for n in range(20)]
    embedded.write(kept, "old:0")
    assert index_names(embedded) == []

    report = embedded.migrate()

    assert report.found and not report.created
    assert [v for v, _, _ in report.applied] == [2, 3]
    records = read_records(embedded.query, None)
    assert versions(records) == {1: 1, 2: 1, 3: 1}
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
    assert states == {1: ("applied", True), 2: ("pending", False), 3: ("pending", False)}
    assert data["pending"] == [2, 3]
    text = run_main("migrate", "--status")
    assert "2 pending: run `eventbuffer migrate`." in text.out and "(found)" in text.out

    upgraded: Result = run_main("migrate")
    assert upgraded.code == 0, upgraded.err
    assert "recorded as migration 1" in upgraded.out
    assert "applied 2: skipping indexes" in upgraded.out
    assert "Nothing pending." in run_main("migrate", "--status").out

    monkeypatch.setenv("EVENT_BUFFER_RETENTION_DAYS", "7")
    changed = __import__("json").loads(run_main("migrate", "--status", "--json").out)
    assert changed["pending"] == [3]
    assert changed["migrations"][2]["status"] == "outdated"
    assert "TTL created_at + INTERVAL 7 DAY DELETE" in changed["migrations"][2]["detail"]
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
        assert versions(read_records(sink.query, None)) == {1: 1, 2: 1, 3: 1}
    finally:
        sink.close()
