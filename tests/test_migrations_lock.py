"""The migrations lock, on ClickHouse 26.x from chDB serving the native protocol:
several `migrate` processes at once, eight sinks migrating at the same instant,
a `migrate` waits for the lock's holder, and a dead holder's lock is broken.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlsplit

from tests.support.migrations import (
    ALL,
    ONCE,
    create_database,
    dead_holder,
    finish,
    index_names,
    migrate_together,
    race_for_a_dead_holders_lock,
    start_migrate,
    versions,
)
from worker.sinks.migrations import read_records
from worker.sinks.migrations_lock import break_lock_table, migrations_lock
from worker.sinks.native import NativeSink
from worker.sinks.schema import MIGRATIONS_LOCK_TABLE


def test_several_processes_migrate_a_server_at_once(db_url: str) -> None:
    results = [finish(p) for p in [start_migrate(db_url) for _ in range(4)]]
    assert [code for code, _, _ in results] == [0] * 4, results
    assert sum("created table `events`" in out for _, out, _ in results) == 1
    assert sum("nothing to do" in out for _, out, _ in results) == 3
    sink = NativeSink(db_url)
    try:
        database = urlsplit(db_url).path[1:]
        assert versions(read_records(sink.query, database)) == ONCE
        assert index_names(sink, f"'{database}'") == ["idx_device_id", "idx_profile_id"]
        assert not sink.query(f"EXISTS TABLE {MIGRATIONS_LOCK_TABLE}")[0][0]
    finally:
        sink.close()


def test_concurrent_migrates_apply_each_version_once(db_url: str) -> None:
    """Eight at the same instant: without the lock, several read an empty record and
    each applies and records every migration."""
    create_database(db_url)
    reports = migrate_together(db_url, 8)
    assert all(not isinstance(r, Exception) for r in reports), reports
    assert sorted(len(r.applied) for r in reports) == [0] * 7 + [len(ALL)]
    sink = NativeSink(db_url)
    try:
        assert versions(read_records(sink.query, urlsplit(db_url).path[1:])) == ONCE
    finally:
        sink.close()


def test_migrate_waits_for_the_lock_holder(db_url: str) -> None:
    create_database(db_url)
    database = urlsplit(db_url).path[1:]
    admin = NativeSink(db_url)
    try:
        with migrations_lock(admin.query, database, None):
            waiting = start_migrate(db_url)
            assert waiting.stderr is not None
            line = waiting.stderr.readline()
            assert line.startswith("waiting for another migrate to finish"), line
            assert f"pid={os.getpid()}" in line
            time.sleep(1)
            assert waiting.poll() is None  # still waiting
            assert read_records(admin.query, database) == {}
        code, out, err = finish(waiting)
        assert code == 0, err
        assert "created table `events`" in out
        assert versions(read_records(admin.query, database)) == ONCE
    finally:
        admin.close()


def test_a_dead_holders_lock_is_broken(db_url: str) -> None:
    create_database(db_url)
    database = urlsplit(db_url).path[1:]
    admin = NativeSink(db_url)
    try:
        dead_holder(admin.query, database, None)
        seen: list[str] = []
        report = admin.migrate(on_wait=seen.append)
        assert [v for v, _, _ in report.applied] == ALL
        assert seen and seen[0].startswith("breaking the migrations lock") and "gone" in seen[0]
    finally:
        admin.close()


def test_a_dead_holders_lock_is_broken_by_one_of_many(db_url: str, tmp_path: Path) -> None:
    """Six processes find the same dead holder's lock at once: one breaks it, and the
    lock still lets one in at a time (two breakers would each drop the lock, the second
    dropping the one the first had just taken)."""
    create_database(db_url)
    database = urlsplit(db_url).path[1:]
    admin = NativeSink(db_url)
    try:
        race_for_a_dead_holders_lock(admin.query, [db_url] * 6, database, None, tmp_path)
    finally:
        admin.close()


def test_a_dead_breakers_break_lock_is_broken_too(db_url: str) -> None:
    """A breaker killed between taking the right to break and dropping it: the next
    waiter breaks its break lock, then the lock."""
    create_database(db_url)
    database = urlsplit(db_url).path[1:]
    admin = NativeSink(db_url)
    try:
        stale = dead_holder(admin.query, database, None)
        dead_holder(admin.query, database, None, break_lock_table(stale))
        report = admin.migrate()
        assert [v for v, _, _ in report.applied] == ALL
        assert not admin.query(f"SHOW TABLES LIKE '{MIGRATIONS_LOCK_TABLE}%'")
    finally:
        admin.close()
