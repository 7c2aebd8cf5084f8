"""Rolling upgrades, on ClickHouse 26.x from chDB serving the native protocol and
real Redis: rows queued in Redis before the migration are flushed into the
migrated table while migrations apply; the previous release's own code (from
git) creates the table, queues rows and flushes them into the migrated table,
also while this release's flusher runs. Every row lands once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis as redis_lib

from tests.support.migrations import (
    ONCE,
    PREVIOUS_RELEASE_DDL,
    RETENTION,
    ROOT,
    after,
    cli_env,
    create_database,
    engine_full,
    flush_all,
    ids,
    index_names,
    versions,
)
from tests.test_crash_safety import make_events, send
from worker.settings import Settings
from worker.sinks.migrations import read_records
from worker.sinks.native import NativeSink


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
        assert versions(read_records(admin.query, database)) == ONCE | {RETENTION: 3}
        assert index_names(admin, f"'{database}'") == ["idx_device_id", "idx_profile_id"]
    finally:
        admin.close()


# --- The previous release's own code, against the migrated table ----------------------

PREVIOUS_RELEASE = "162dd52"  # the commit before versioned migrations

# The previous release's module names (its flusher was worker/flush.py), not this
# release's: a name only this release has would be imported from the editable install.
PREVIOUS_RELEASE_RUNNER = """
import json, os, sys, time
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
root = os.path.dirname(__import__("worker").__file__)
files = {n: getattr(m, "__file__", None) or root for n, m in list(sys.modules.items())}
stray = sorted(n for n, f in files.items() if n.startswith("worker.") and not f.startswith(root))
assert not stray, f"modules not of the previous release: {stray}"
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
        assert report.found and [v for v, _, _ in report.applied] == after(1)
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
