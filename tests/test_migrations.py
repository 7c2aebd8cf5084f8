"""Versioned migrations and retention, on real ClickHouse (no mocks).

- Embedded chDB (ClickHouse 26.x): a fresh migrate, a table created the way
  the previous release did upgraded in place, `--status`, retention on a new
  and an existing table, `migrate` from several processes at once.
- ClickHouse 26.x from chDB serving the native protocol: the lock (a `migrate`
  waits for the holder; a dead holder's lock is broken), several processes at
  once, and a rolling upgrade: rows queued in Redis before the migration are
  flushed into the migrated table, and a flush runs while migrations apply;
  the previous release's own code (from git) creates the table, queues rows and
  flushes them into the migrated table, also while this release's flusher runs.
- Debian's ClickHouse 18.16: an existing table is recognised as migration 1,
  the skipping indexes are a recorded no-op, a retention TTL is refused, the
  lock works from several processes. (18.16 cannot create the full `events`
  table: it has no Map or DateTime64, so these use the columns it has.)

The loopback 18.16 cluster: tests/test_migrations_cluster.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis as redis_lib

from tests.conftest import Result
from tests.support.native_server import chdb_server, chdb_serves, local_server, server_binary
from tests.test_crash_safety import make_events, send
from worker.buffer import EventBuffer
from worker.deadletters import REASON_INVALID_EVENT, iter_dead_letters
from worker.events import encode_event, parse_event
from worker.flush import Flusher
from worker.ingest import ingest
from worker.retention import REASON_PAST_RETENTION
from worker.settings import Settings
from worker.sinks.base import RetryableSinkError
from worker.sinks.chdb import ChdbSink
from worker.sinks.migrations import (
    MIGRATIONS,
    MigrationError,
    Record,
    _host,
    migrations_lock,
    read_records,
    status,
)
from worker.sinks.native import NativeSink
from worker.sinks.schema import COLUMNS, MIGRATIONS_LOCK_TABLE, create_lock_table

ROOT = Path(__file__).resolve().parent.parent
DAY_MS = 86_400_000

# The previous release's `eventbuffer migrate` ran exactly this (its
# worker.sinks.schema.create_table("events")): kept verbatim, not generated.
PREVIOUS_RELEASE_DDL = """CREATE TABLE IF NOT EXISTS `events`
(
    id UUID,
    name LowCardinality(String),
    device_id String,
    profile_id String,
    project_id String,
    session_id String,
    path String,
    origin String,
    referrer String,
    referrer_name String,
    referrer_type LowCardinality(String),
    properties Map(String, String),
    created_at DateTime64(3, 'UTC'),
    country LowCardinality(FixedString(2)),
    city String,
    region LowCardinality(String),
    longitude Nullable(Float32),
    latitude Nullable(Float32),
    os LowCardinality(String),
    os_version LowCardinality(String),
    browser LowCardinality(String),
    browser_version LowCardinality(String),
    device LowCardinality(String),
    brand LowCardinality(String),
    model LowCardinality(String),
    imported_at Nullable(DateTime('UTC')),
    sdk_name LowCardinality(String),
    sdk_version LowCardinality(String),
    duration UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(created_at)
ORDER BY (project_id, toDate(created_at), profile_id, name)
SETTINGS non_replicated_deduplication_window = 10000"""

# The columns of `events` 18.16 has (and the table layout needs).
COMPAT_COLUMNS = (
    ("id", "UUID"),
    ("name", "String"),
    ("device_id", "String"),
    ("project_id", "String"),
    ("profile_id", "String"),
    ("session_id", "String"),
    ("created_at", "DateTime"),
    ("duration", "UInt64"),
)


def row(created_ms: int, **fields: Any) -> bytes:
    data = {"name": "click", "project_id": "p", "profile_id": "u1", "created_at": created_ms}
    data.update(fields)
    return encode_event(parse_event(data))


def now_ms() -> int:
    return int(time.time() * 1000)


def ids(sink: Any, table: str = "events") -> list[str]:
    return sorted(r[0] for r in sink.query(f"SELECT toString(id) FROM {table}"))


def versions(records: dict[int, list[Record]]) -> dict[int, int]:
    """How many rows each version has in the record table."""
    return {version: len(rows) for version, rows in records.items()}


def index_names(sink: Any, database: str = "currentDatabase()") -> list[str]:
    rows = sink.query(
        "SELECT name FROM system.data_skipping_indices "
        f"WHERE database = {database} AND table = 'events' ORDER BY name"
    )
    return [r[0] for r in rows]


def engine_full(sink: Any, database: str = "currentDatabase()") -> str:
    [(text,)] = sink.query(
        f"SELECT engine_full FROM system.tables WHERE database = {database} AND name = 'events'"
    )
    return str(text)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[ChdbSink]:
    sink = ChdbSink(str(tmp_path / "clickhouse"))
    try:
        yield sink
    finally:
        sink.close()


# --- Embedded chDB -------------------------------------------------------------------


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
    from worker.sinks.chdb import path_from_url

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


def test_retention_on_a_new_table(embedded: ChdbSink) -> None:
    report = embedded.migrate(retention_days=30)
    assert report.applied[-1][2].startswith("TTL created_at + INTERVAL 30 DAY DELETE")
    assert "TTL created_at + toIntervalDay(30)" in engine_full(embedded)
    old, recent = str(uuid.UUID(int=1)), str(uuid.UUID(int=2))
    embedded.write(
        [row(now_ms() - 40 * DAY_MS, id=old), row(now_ms() - 2 * DAY_MS, id=recent)], "t:0"
    )
    embedded.query("OPTIMIZE TABLE events FINAL")
    assert ids(embedded) == [recent]
    # A caller not told the setting (retention_days=None) leaves the TTL alone.
    assert embedded.migrate().applied == []
    assert "TTL created_at + toIntervalDay(30)" in engine_full(embedded)


def test_retention_on_an_existing_table_then_changed_and_removed(embedded: ChdbSink) -> None:
    embedded.query(PREVIOUS_RELEASE_DDL)
    old, recent, older = (str(uuid.UUID(int=n)) for n in (1, 2, 3))
    embedded.write(
        [row(now_ms() - 40 * DAY_MS, id=old), row(now_ms() - 2 * DAY_MS, id=recent)], "t:0"
    )
    embedded.query("OPTIMIZE TABLE events FINAL")
    assert ids(embedded) == [old, recent]  # no TTL yet: the merge keeps both

    embedded.migrate(retention_days=30)
    embedded.query("OPTIMIZE TABLE events FINAL")
    assert ids(embedded) == [recent]

    # A longer retention later: applied again (recorded as another row of 3).
    assert [v for v, _, _ in embedded.migrate(retention_days=90).applied] == [3]
    assert "toIntervalDay(90)" in engine_full(embedded)
    # 0 removes the TTL: an old row then stays.
    assert embedded.migrate(retention_days=0).applied[0][2] == "retention TTL removed"
    assert " TTL " not in engine_full(embedded)
    embedded.write([row(now_ms() - 200 * DAY_MS, id=older)], "t:1")
    embedded.query("OPTIMIZE TABLE events FINAL")
    assert ids(embedded) == sorted([recent, older])
    assert versions(read_records(embedded.query, None)) == {1: 1, 2: 1, 3: 3}
    assert embedded.migrate(retention_days=0).applied == []


def test_ingest_dead_letters_an_event_past_retention(
    redis: redis_lib.Redis, settings: Settings
) -> None:
    kept = Settings.from_env({"REDIS_URL": settings.redis_url, "EVENT_BUFFER_RETENTION_DAYS": "30"})
    buffer = EventBuffer(redis, kept)
    old = {"id": str(uuid.UUID(int=1)), "name": "a", "project_id": "p"}
    recent = {"id": str(uuid.UUID(int=2)), "name": "b", "project_id": "p"}
    payload = [
        {**old, "created_at": now_ms() - 31 * DAY_MS},
        {**recent, "created_at": now_ms() - 29 * DAY_MS},
    ]
    result = ingest(buffer, payload, "batch-1")
    assert (result.accepted, result.invalid) == (1, 1)
    letters = [letter for shard in buffer.shards() for letter in iter_dead_letters(redis, shard)]
    assert [letter.reason for letter in letters] == [REASON_PAST_RETENTION]
    assert letters[0].header is not None and letters[0].header.field == "created_at"
    assert "retention of 30 days" in letters[0].header.error
    # Without retention the same event is valid (only max_past_days bounds it).
    redis.flushall()
    forever = EventBuffer(redis, Settings.from_env({"REDIS_URL": settings.redis_url}))
    assert ingest(forever, payload, "batch-2").accepted == 2
    assert REASON_INVALID_EVENT != REASON_PAST_RETENTION


def cli_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENT_BUFFER_")}
    env.update(PYTHONPATH=str(ROOT), CLICKHOUSE_URL=url, COLUMNS="200", **extra)
    return env


def start_migrate(url: str, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "migrate", *args],
        env=cli_env(url, **env),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


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


# --- ClickHouse 26.x served by chDB ----------------------------------------------------


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    why = chdb_serves()
    if why is not None:
        pytest.skip(f"no ClickHouse 26.x server here: {why}")
    with chdb_server() as url:
        yield url


@pytest.fixture
def db_url(server_url: str) -> str:
    """The URL of a fresh database (created by `migrate`, or by the test)."""
    return with_database(server_url, f"eb_{uuid.uuid4().hex[:10]}")


def create_database(url: str) -> None:
    admin = NativeSink(with_database(url, "default"))
    try:
        admin.query(f"CREATE DATABASE IF NOT EXISTS {urlsplit(url).path[1:]}")
    finally:
        admin.close()


def test_several_processes_migrate_a_server_at_once(db_url: str) -> None:
    results = [finish(p) for p in [start_migrate(db_url) for _ in range(4)]]
    assert [code for code, _, _ in results] == [0] * 4, results
    assert sum("created table `events`" in out for _, out, _ in results) == 1
    assert sum("nothing to do" in out for _, out, _ in results) == 3
    sink = NativeSink(db_url)
    try:
        database = urlsplit(db_url).path[1:]
        assert versions(read_records(sink.query, database)) == {1: 1, 2: 1, 3: 1}
        assert index_names(sink, f"'{database}'") == ["idx_device_id", "idx_profile_id"]
        assert not sink.query(f"EXISTS TABLE {MIGRATIONS_LOCK_TABLE}")[0][0]
    finally:
        sink.close()


def migrate_together(url: str, count: int, **options: Any) -> list[Any]:
    """`count` sinks call migrate() at the same moment (a barrier); their reports."""
    barrier = threading.Barrier(count)
    reports: list[Any] = [None] * count

    def one(n: int) -> None:
        sink = NativeSink(url, require_dedup=False)
        try:
            sink.query("SELECT 1")  # connected before the barrier
            barrier.wait(timeout=30)
            reports[n] = sink.migrate(**options)
        except Exception as exc:
            reports[n] = exc
        finally:
            sink.close()

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return reports


def test_concurrent_migrates_apply_each_version_once(db_url: str) -> None:
    """Eight at the same instant: without the lock, several read an empty record and
    each applies and records every migration."""
    create_database(db_url)
    reports = migrate_together(db_url, 8)
    assert all(not isinstance(r, Exception) for r in reports), reports
    assert sorted(len(r.applied) for r in reports) == [0] * 7 + [3]
    sink = NativeSink(db_url)
    try:
        assert versions(read_records(sink.query, urlsplit(db_url).path[1:])) == {1: 1, 2: 1, 3: 1}
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
        assert versions(read_records(admin.query, database)) == {1: 1, 2: 1, 3: 1}
    finally:
        admin.close()


def test_a_dead_holders_lock_is_broken(db_url: str) -> None:
    create_database(db_url)
    database = urlsplit(db_url).path[1:]
    gone = subprocess.Popen(["true"])
    gone.wait()
    admin = NativeSink(db_url)
    try:
        [(since,)] = admin.query("SELECT toUInt32(toUnixTimestamp(now()))")
        admin.query(
            create_lock_table(database, None, f"host={_host()} pid={gone.pid} since={since}")
        )
        seen: list[str] = []
        report = admin.migrate(on_wait=seen.append)
        assert [v for v, _, _ in report.applied] == [1, 2, 3]
        assert seen and seen[0].startswith("breaking the migrations lock") and "gone" in seen[0]
    finally:
        admin.close()


def flush_all(redis: redis_lib.Redis, settings: Settings, stop: threading.Event | None) -> int:
    """Flush until the buffer is empty (and, with `stop`, until it is set): chunks written."""
    buffer = EventBuffer(redis, settings)
    flusher = Flusher(redis, settings, lambda: NativeSink(settings.clickhouse_url))
    deadline = time.monotonic() + 120
    written = 0
    while buffer.get_buffer_size() > 0 or (stop is not None and not stop.is_set()):
        assert time.monotonic() < deadline, "the flush makes no progress"
        for shard in range(settings.shards):
            try:
                written += flusher.flush_shard(shard, respect_backoff=False).rows
            except RetryableSinkError:
                time.sleep(0.1)
        time.sleep(0.01)
    return written


def test_rolling_upgrade_flushes_queued_rows_into_the_migrated_table(
    db_url: str, redis: redis_lib.Redis, redis_url: str
) -> None:
    """The previous release's table and rows queued by its workers; the new release
    migrates while a flusher writes, then flushes the rest into the migrated table."""
    create_database(db_url)
    database = urlsplit(db_url).path[1:]
    admin = NativeSink(db_url)
    admin.query(PREVIOUS_RELEASE_DDL.replace("`events`", f"`{database}`.`events`"))
    settings = Settings.from_env(
        {
            "REDIS_URL": redis_url,
            "CLICKHOUSE_URL": db_url,
            "EVENT_BUFFER_BATCH_SIZE": "20",
            "EVENT_BUFFER_CHUNK_SIZE": "10",
        }
    )
    queued = send(redis, settings, make_events(400, seed=5))
    stop = threading.Event()
    flushed: list[int] = []
    flusher = threading.Thread(target=lambda: flushed.append(flush_all(redis, settings, stop)))
    flusher.start()
    try:
        # While the flush runs: the upgrade, then retention set, changed and removed.
        for days in (3650, 3000, 0):
            admin.migrate(retention_days=days)
    finally:
        stop.set()
        flusher.join(timeout=150)
    assert not flusher.is_alive() and flushed and flushed[0] > 0
    later = send(redis, settings, make_events(50, seed=6))
    flush_all(redis, settings, None)
    try:
        stored = admin.query("SELECT toString(id), count() FROM events GROUP BY id")
        assert {i for i, _ in stored} == queued | later
        assert all(n == 1 for _, n in stored)
        assert versions(read_records(admin.query, database)) == {1: 1, 2: 1, 3: 3}
        assert index_names(admin, f"'{database}'") == ["idx_device_id", "idx_profile_id"]
    finally:
        admin.close()


# --- Debian's ClickHouse 18.16 ------------------------------------------------------------


@pytest.fixture(scope="module")
def old_url() -> Iterator[str]:
    if server_binary() is None:
        pytest.skip("clickhouse-server (Debian package) is not installed")
    with local_server() as url:
        yield url


def old_table(url: str) -> str:
    """A fresh database holding an `events` table 18.16 can have; its URL."""
    database = f"eb_{uuid.uuid4().hex[:10]}"
    admin = NativeSink(url, require_dedup=False)
    columns = ", ".join(f"{name} {kind}" for name, kind in COMPAT_COLUMNS)
    try:
        admin.query(f"CREATE DATABASE {database}")
        admin.query(
            f"CREATE TABLE {database}.events ({columns}) ENGINE = MergeTree "
            "PARTITION BY toYYYYMM(created_at) ORDER BY (project_id, toDate(created_at), "
            "profile_id, name)"
        )
    finally:
        admin.close()
    return with_database(url, database)


def test_old_server_upgrades_with_recorded_no_ops(old_url: str) -> None:
    url = old_table(old_url)
    database = urlsplit(url).path[1:]
    sink = NativeSink(url, require_dedup=False)
    try:
        sink.write([row(now_ms(), id=str(uuid.UUID(int=7)))], "t")
        report = sink.migrate(columns=COMPAT_COLUMNS)
        assert report.found and [v for v, _, _ in report.applied] == [2, 3]
        details = dict((v, d) for v, _, d in report.applied)
        assert details[2].startswith("skipped: ClickHouse 18.16 has no data-skipping indexes")
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
        assert [s.state for s in states] == ["applied", "applied", "blocked"]
        assert sink.migrate(columns=COMPAT_COLUMNS).applied == []
        assert versions(read_records(sink.query, database)) == {1: 1, 2: 1, 3: 1}
    finally:
        sink.close()


def test_old_server_concurrent_migrates_apply_each_version_once(old_url: str) -> None:
    url = old_table(old_url)
    reports = migrate_together(url, 6, columns=COMPAT_COLUMNS)
    assert all(not isinstance(r, Exception) for r in reports), reports
    assert sorted(len(r.applied) for r in reports) == [0] * 5 + [2]
    assert sum(r.found for r in reports) == 1
    sink = NativeSink(url, require_dedup=False)
    try:
        assert versions(read_records(sink.query, urlsplit(url).path[1:])) == {1: 1, 2: 1, 3: 1}
    finally:
        sink.close()


OLD_SERVER_RUNNER = """
import sys
from tests.test_migrations import COMPAT_COLUMNS
from worker.sinks.native import NativeSink
sink = NativeSink(sys.argv[1], require_dedup=False)
report = sink.migrate(columns=COMPAT_COLUMNS, on_wait=lambda m: print(m, file=sys.stderr))
print([v for v, _, _ in report.applied], report.found)
"""


def test_old_server_several_processes_at_once(old_url: str) -> None:
    url = old_table(old_url)
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
    assert outs == ["[2, 3] True"] + ["[] False"] * 3 or outs.count("[] False") == 3, outs
    sink = NativeSink(url, require_dedup=False)
    try:
        assert versions(read_records(sink.query, database)) == {1: 1, 2: 1, 3: 1}
    finally:
        sink.close()


# --- The previous release's own code, against the migrated table ----------------------

PREVIOUS_RELEASE = "162dd52"  # the commit before versioned migrations

PREVIOUS_RELEASE_RUNNER = """
import json, sys, time
import redis
from worker.buffer import EventBuffer
from worker.events import parse_event
from worker.flush import Flusher
from worker.settings import Settings
from worker.sinks.base import RetryableSinkError
from worker.sinks.native import NativeSink

settings = Settings.from_env()
client = redis.Redis.from_url(settings.redis_url)
action = sys.argv[1]
if action == "create":
    sink = NativeSink(settings.clickhouse_url)
    sink.migrate()
    sink.close()
elif action == "queue":
    buffer = EventBuffer(client, settings)
    events = [parse_event(e) for e in json.loads(sys.stdin.read())]
    for start in range(0, len(events), 25):
        buffer.apply(events[start : start + 25])
elif action == "flush":
    buffer = EventBuffer(client, settings)
    flusher = Flusher(client, settings, lambda: NativeSink(settings.clickhouse_url))
    deadline = time.monotonic() + 120
    while buffer.get_buffer_size() > 0 and time.monotonic() < deadline:
        for shard in range(settings.shards):
            try:
                flusher.flush_shard(shard, respect_backoff=False)
            except RetryableSinkError:
                time.sleep(0.1)
        time.sleep(0.01)
print(__import__("worker").__file__)
"""


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's `worker` and `lua_scripts`, from git."""
    where = tmp_path_factory.mktemp("previous-release")
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "worker", "lua_scripts"],
            capture_output=True,
            check=True,
        )
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"the previous release {PREVIOUS_RELEASE} is not in this checkout's git: {exc}")
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return where


def run_previous(where: Path, action: str, env: dict[str, str], stdin: str = "") -> str:
    done = subprocess.run(
        [sys.executable, "-c", PREVIOUS_RELEASE_RUNNER, action],
        input=stdin,
        env={**env, "PYTHONPATH": str(where)},
        cwd=where,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(where / "worker" / "__init__.py"), done.stdout
    return done.stdout


def test_rolling_upgrade_with_the_previous_releases_workers(
    db_url: str, previous_release: Path, redis: redis_lib.Redis, redis_url: str
) -> None:
    """The previous release creates the table and queues rows; this release migrates.
    Then both run at once on the same Redis: the previous release's flusher and this
    one's, and each release queues more. Every row lands once in the migrated table."""
    import json

    database = urlsplit(db_url).path[1:]
    env = cli_env(
        db_url,
        REDIS_URL=redis_url,
        EVENT_BUFFER_BATCH_SIZE="20",
        EVENT_BUFFER_CHUNK_SIZE="10",
    )
    settings = Settings.from_env({k: v for k, v in env.items() if k != "PYTHONPATH"})
    run_previous(previous_release, "create", env)
    before = make_events(200, seed=8)
    run_previous(previous_release, "queue", env, json.dumps(before))

    admin = NativeSink(db_url)
    try:
        report = admin.migrate(retention_days=3650)
        assert report.found and [v for v, _, _ in report.applied] == [2, 3]
        # The previous release's flusher writes its queued rows into the migrated table.
        run_previous(previous_release, "flush", env)
        assert set(ids(admin)) == {e["id"] for e in before}
        run_previous(previous_release, "queue", env, json.dumps(make_events(60, seed=11)))
        old_flusher = subprocess.Popen(
            [sys.executable, "-c", PREVIOUS_RELEASE_RUNNER, "flush"],
            env={**env, "PYTHONPATH": str(previous_release)},
            cwd=previous_release,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        ours = send(redis, settings, make_events(150, seed=9))
        stop = threading.Event()
        new_flusher = threading.Thread(target=flush_all, args=(redis, settings, stop))
        new_flusher.start()
        theirs = make_events(100, seed=10)
        run_previous(previous_release, "queue", env, json.dumps(theirs))
        stop.set()
        new_flusher.join(timeout=150)
        _, err = old_flusher.communicate(timeout=150)
        assert old_flusher.returncode == 0, err
        flush_all(redis, settings, None)
        stored = admin.query("SELECT toString(id), count() FROM events GROUP BY id")
        queued_by_previous = before + make_events(60, seed=11) + theirs
        expected = {e["id"] for e in queued_by_previous} | ours
        assert {i for i, _ in stored} == expected
        assert all(n == 1 for _, n in stored)
        assert " TTL " in engine_full(admin, f"'{database}'")
    finally:
        admin.close()
