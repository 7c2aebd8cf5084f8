"""What the migration tests share: the previous release's table, the columns
ClickHouse 18.16 has, rows, the record table read as counts, the `migrate` command
as a process, fresh databases on a server, and a flush until the buffer is empty."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis as redis_lib

from worker.buffer import EventBuffer
from worker.events import encode_event, parse_event
from worker.flusher import Flusher
from worker.settings import Settings
from worker.sinks.base import RetryableSinkError
from worker.sinks.migrations import MIGRATIONS, Record
from worker.sinks.migrations_lock import Holder, _host
from worker.sinks.native import NativeSink
from worker.sinks.schema import AUDIT_COLUMNS, MIGRATIONS_LOCK_TABLE, create_lock_table

ROOT = Path(__file__).resolve().parents[2]
DAY_MS = 86_400_000

# Every migration's version, in order: what a test meaning "every migration" expects
# (a new migration then needs no test edited), and each recorded once.
ALL = [migration.version for migration in MIGRATIONS]
LATEST = ALL[-1]
ONCE = dict.fromkeys(ALL, 1)
# The specific migrations tests name.
EVENTS_TABLE, SKIPPING_INDEXES, RETENTION, AUDIT = 1, 2, 3, 4

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


def after(version: int) -> list[int]:
    """Every migration after `version`, in order."""
    return [v for v in ALL if v > version]


def applied_details(report: Any) -> dict[int, str]:
    """A `migrate` report's applied migrations: version -> detail."""
    return {version: detail for version, _, detail in report.applied}


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


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def create_database(url: str) -> None:
    admin = NativeSink(with_database(url, "default"))
    try:
        admin.query(f"CREATE DATABASE IF NOT EXISTS {urlsplit(url).path[1:]}")
    finally:
        admin.close()


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


def fresh_database_url(server_url: str) -> str:
    """The URL of a database no test has used (created by `migrate`, or by the test)."""
    return with_database(server_url, f"eb_{uuid.uuid4().hex[:10]}")


def contenders(urls: list[str], database: str, cluster: str | None, tmp: Path) -> list[Any]:
    """One process per URL that takes the migrations lock once a round, released at the
    same moment (tests/support/lock_contender.py), logging to `tmp`/inside.log."""
    contender = [sys.executable, "-m", "tests.support.lock_contender"]
    log, go = tmp / "inside.log", tmp / "go"
    processes = [
        subprocess.Popen(
            [*contender, url, database, cluster or "", str(log), str(go)],
            env=cli_env(url),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for url in urls
    ]
    for process in processes:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready", finish(process)
    return processes


def contend_for_lock(processes: list[Any], tmp: Path, round: int) -> list[str]:
    """Release every contender for a round; once each is done, the round's `enter`/`exit`
    lines, in order."""
    log = tmp / "inside.log"
    log.write_text("")
    for process in processes:
        process.stdin.write(f"{round}\n")
        process.stdin.flush()
    (tmp / f"go{round}").touch()
    for process in processes:
        line = process.stdout.readline().strip()
        assert line == "done", (line, finish(process))
    return log.read_text().splitlines()


def one_at_a_time(lines: list[str]) -> bool:
    """Whether the contenders' log shows each `enter` followed by its own `exit`."""
    pairs = [lines[n : n + 2] for n in range(0, len(lines), 2)]
    return all(
        len(pair) == 2 and pair[0].startswith("enter ") and pair[1] == "exit " + pair[0][6:]
        for pair in pairs
    )


def dead_holder(
    run: Any, database: str, cluster: str | None, table: str = MIGRATIONS_LOCK_TABLE
) -> Holder:
    """Leave the migrations lock (or `table`) held by a process of this host that no
    longer runs; that holder."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    [(since,)] = run("SELECT toUInt32(toUnixTimestamp(now()))")
    holder = Holder(_host(), gone.pid, int(since))
    run(create_lock_table(database, cluster, str(holder), table))
    return holder


def race_for_a_dead_holders_lock(
    run: Any, urls: list[str], database: str, cluster: str | None, tmp: Path, rounds: int = 20
) -> None:
    """`rounds` times (the race between breakers is not lost every time): the lock left
    to a dead holder, then one process per URL released at once to take it; they must
    enter one at a time, and leave no lock table behind."""
    processes = contenders(urls, database, cluster, tmp)
    try:
        for n in range(rounds):
            dead_holder(run, database, cluster)
            lines = contend_for_lock(processes, tmp, n)
            assert len(lines) == 2 * len(urls) and one_at_a_time(lines), (n, lines)
            assert not run(f"SHOW TABLES LIKE '{MIGRATIONS_LOCK_TABLE}%'")
    finally:
        results = [finish(process) for process in processes]  # stdin closed: they stop
    assert [code for code, _, _ in results] == [0] * len(urls), results


# One forget request's audit row (worker.privacy.forget_request's audit_row()): every
# column, the counts at 0.
AUDIT_ROW = dict.fromkeys((name for name, _ in AUDIT_COLUMNS), 0) | {
    "requested_at": "2026-01-02 03:04:05",
    "tombstone_expires_at": "2026-02-01 03:04:05",
    "user": "ops",
    "host": "h1",
    "project_id": "p",
    "selector": "profile",
    "selector_id": "u1",
}
