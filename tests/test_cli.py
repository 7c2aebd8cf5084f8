"""The `eventbuffer` command against real Redis and real embedded ClickHouse (chDB).

Quick commands run in-process through `main(argv)`; what is about processes
(exit codes and stderr of a failing start, `run` with its children, `demo`
against running workers) runs as `python -m worker.cli` subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from celery import Celery

from tests.conftest import Result
from tests.support.dates import BASE_MS
from tests.support.polling import wait_until
from tests.support.servers import free_port
from worker import cli
from worker.broker.keys import BrokerKeys
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.claims import Claims
from worker.cli.local_redis import redis_answers
from worker.cli.run import INGEST_LAYOUT
from worker.events import Event, parse_event
from worker.ingest import ingest
from worker.keys import ShardKeys
from worker.lock import FlushLock
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink, path_from_url

ROOT = Path(__file__).resolve().parent.parent
SHARD = ShardKeys("eventbuffer", 0)


def project_env(**overrides: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EVENT_BUFFER_", "CELERY_"))
        and k not in ("REDIS_URL", "CLICKHOUSE_URL")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["COLUMNS"] = "200"
    env.update(overrides)
    return env


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def closed_port() -> int:
    """A port nothing listens on (for a server that must not answer)."""
    return free_port()


def event(name: str, at: int, **fields: Any) -> Event:
    return parse_event({"project_id": "p1", "name": name, "created_at": at, **fields})


def chdb_count(url: str, sql: str) -> int:
    sink = ChdbSink(path_from_url(url))
    try:
        return int(sink.query(sql)[0][0])
    finally:
        sink.close()


# -- migrate and query ------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("eventbuffer ")


def test_migrate_is_idempotent_and_query_prints_rows(run_main: Callable[..., Result]) -> None:
    first = run_main("migrate")
    assert (first.code, first.err) == (0, "")
    assert "created table `events`" in first.out
    again = run_main("migrate")
    assert again.code == 0
    assert "already exists" in again.out

    sql = "SELECT toUInt8(number) AS n, concat('v', toString(number)) AS s FROM numbers(3)"
    as_json = run_main("query", sql, "--format", "json")
    assert as_json.code == 0
    assert json.loads(as_json.out) == {
        "columns": ["n", "s"],
        "rows": [[0, "v0"], [1, "v1"], [2, "v2"]],
    }
    as_tsv = run_main("query", sql, "--format", "tsv")
    assert as_tsv.out.splitlines() == ["n\ts", "0\tv0", "1\tv1", "2\tv2"]
    as_table = run_main("query", "SHOW TABLES")
    assert as_table.code == 0
    assert "events" in as_table.out
    assert "1 row in" in as_table.out


def test_query_output_is_verbatim(run_main: Callable[..., Result]) -> None:
    assert run_main("migrate").code == 0
    sql = "SELECT '[/bold] :smile: [red]x' AS s, NULL AS n, 'a\tb' AS t"
    as_table = run_main("query", sql)
    assert as_table.code == 0
    assert "[/bold] :smile: [red]x" in as_table.out  # no rich markup or emoji codes
    assert run_main("query", sql, "--format", "tsv").out.splitlines()[1] == (
        "[/bold] :smile: [red]x\t\\N\ta\\tb"
    )


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE events",
        "INSERT INTO events (project_id, name, created_at) VALUES ('p', 'x', now())",
        "  /* a note */ -- and a comment\n  TRUNCATE TABLE events",
        "ALTER TABLE events DELETE WHERE 1",
        "SELECT 1; DROP TABLE events",
        "SELECT 1 INTO OUTFILE 'out.csv'",
        "SELECT 1 INTO/**/OUTFILE '/tmp/eventbuffer-test-outfile'",
        "SELECT 1 INTO -- a comment\n OUTFILE '/tmp/eventbuffer-test-outfile'",
        "-- only a comment",
        # readonly = 1 lets DESCRIBE over it read the file: refused before it runs.
        "SELECT * FROM file('/etc/hostname', 'LineAsString')",
        "DESCRIBE file('/etc/hostname', 'LineAsString')",
    ],
)
def test_query_refuses_writes_without_write(run_main: Callable[..., Result], sql: str) -> None:
    assert run_main("migrate").code == 0
    refused = run_main("query", sql)
    assert refused.code == 2
    assert len(refused.err.strip().splitlines()) == 1
    if sql == "-- only a comment":  # nothing to run: a parse error, --write would not help
        assert "ClickHouse cannot parse the query" in refused.err
    else:
        assert "--write" in refused.err
    assert run_main("query", "EXISTS TABLE events", "--format", "tsv").out.splitlines()[1] == "1"
    assert not Path("/tmp/eventbuffer-test-outfile").exists()


@pytest.mark.parametrize(
    "sql",
    [
        # Starting with a reading keyword, still writing: the engine refuses them (its
        # parser, for the INSERT; readonly = 1, for the settings).
        "SELECT * FROM events SETTINGS readonly = 0",
        "WITH 1 AS x INSERT INTO events (project_id, name, created_at) VALUES ('p', 'x', now())",
        "EXPLAIN SELECT 1 SETTINGS readonly = 0",
    ],
)
def test_read_only_is_enforced_by_the_engine(run_main: Callable[..., Result], sql: str) -> None:
    assert run_main("migrate").code == 0
    refused = run_main("query", sql)
    assert refused.code in (1, 2), refused.out
    assert "readonly" in refused.err.lower() or "read-only" in refused.err.lower(), refused.err
    assert len(refused.err.strip().splitlines()) == 1
    # A write in the same process afterwards still works (readonly stayed in its session).
    insert = "INSERT INTO events (project_id, name, created_at) VALUES ('p', 'x', now())"
    assert run_main("query", insert, "--write").code == 0
    assert run_main("query", "SELECT count() FROM events", "--format", "tsv").out == "count()\n1\n"


def test_read_only_commands_create_no_data_directory(
    run_main: Callable[..., Result],
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("CLICKHOUSE_URL", "chdb://data/clickhouse")
    for argv in (["query", "SELECT count() FROM events"], ["flush"]):
        EventBuffer(redis_lib.Redis.from_url(settings.redis_url), settings).add(
            event("x", int(time.time() * 1000))
        )
        result = run_main(*argv)
        assert result.code == 1, result.out
        [line] = result.err.strip().splitlines()
        assert f"no embedded ClickHouse at {elsewhere / 'data' / 'clickhouse'}" in line
        assert f"relative to the current directory {elsewhere}" in line
    assert list(elsewhere.iterdir()) == []


def test_a_missing_table_says_how_to_create_it(run_main: Callable[..., Result]) -> None:
    scratch = "CREATE TABLE scratch (x UInt8) ENGINE = MergeTree ORDER BY x"
    assert run_main("query", scratch, "--write").code == 0  # data, but no events table
    result = run_main("query", "SELECT count() FROM events")
    assert result.code == 1
    [line] = result.err.strip().splitlines()
    assert "create it with `eventbuffer migrate`" in line


@pytest.mark.parametrize(
    "sql",
    [
        "-- the count\nSELECT 1;",
        "/* c */ (SELECT 1) UNION ALL (SELECT 2)",
        "WITH 1 AS x SELECT x",
        "select ';DROP TABLE events' AS s",
        "DESC events",
        "EXPLAIN SELECT 1",
    ],
)
def test_query_allows_reads(run_main: Callable[..., Result], sql: str) -> None:
    assert run_main("migrate").code == 0
    result = run_main("query", sql, "--format", "tsv")
    assert (result.code, result.err) == (0, "")


def test_query_write_runs_changes(run_main: Callable[..., Result]) -> None:
    assert run_main("migrate").code == 0  # ClickHouse checks the statement: it must be there
    create = "CREATE TABLE scratch (x UInt8) ENGINE = MergeTree ORDER BY x"
    assert run_main("query", create).code == 2
    assert run_main("query", create, "--write").code == 0
    assert run_main("query", "INSERT INTO scratch VALUES (7)", "--write").code == 0
    assert run_main("query", "SELECT x FROM scratch", "--format", "tsv").out == "x\n7\n"


def test_busy_embedded_clickhouse_is_waited_for_then_reported(
    run_main: Callable[..., Result], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_main("migrate").code == 0
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom chdb import session\n"
            "s = session.Session(sys.argv[1]); print('open', flush=True)\n"
            "time.sleep(float(sys.argv[2])); s.close()",
            path_from_url(settings.clickhouse_url),
            "2.5",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        monkeypatch.setattr("worker.cli.common.BUSY_WAIT_S", 0.3)
        busy = run_main("query", "SELECT 1")
        assert busy.code == 1
        assert "in use by another process" in busy.err
        assert len(busy.err.strip().splitlines()) == 1  # chDB's own complaint is silenced
        monkeypatch.setattr("worker.cli.common.BUSY_WAIT_S", 15.0)
        waited = run_main("query", "SELECT 41 + 1", "--format", "tsv")
        assert (waited.code, waited.out.splitlines()[1]) == (0, "42")
    finally:
        holder.kill()
        holder.wait()


# -- flush and status -------------------------------------------------------------


def test_flush_drains_the_buffer(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    settings: Settings,
    sink: ChdbSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EVENT_BUFFER_BATCH_SIZE", "5000")
    buffer = EventBuffer(redis, settings)
    base = BASE_MS
    for start in range(0, 12_000, 2_000):
        buffer.apply(
            [event("click", base + n, profile_id=f"u{n % 7}") for n in range(start, start + 2_000)]
        )
    buffer.apply(
        [
            event("screen_view", base, session_id="s1"),
            event("screen_view", base + 4_000, session_id="s1"),
            event("session_end", base + 9_000, session_id="s1"),
            event("screen_view", base, session_id="s2"),  # stays: its session goes on
        ]
    )
    assert buffer.get_buffer_size() == 12_003

    result = run_main("flush")
    assert (result.code, result.err) == (0, "")
    assert "Flushed 12,003 rows" in result.out
    assert "3 batches, 0 re-driven, 0 dead letters" in result.out
    assert "1 screen_view(s) wait as their session's last view" in result.out
    assert buffer.get_buffer_size() == 0
    assert chdb_count(settings.clickhouse_url, "SELECT count() FROM events") == 12_003
    durations = sink.query(
        "SELECT duration FROM events WHERE session_id = 's1' ORDER BY created_at"
    )
    sink.close()
    assert [int(d) for (d,) in durations] == [4000, 0, 0]

    empty = run_main("flush")
    assert empty.code == 0
    assert "nothing to flush" in empty.out


def test_flush_skips_a_shard_whose_live_holder_keeps_its_lock(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    settings: Settings,
    sink: ChdbSink,
) -> None:
    """A live flusher (this process: its pid is alive, its watchdog extends the lock
    every third of its 1 s TTL) keeps the lock past the 1 s it had left: `flush` waits
    that long, then skips the shard with one line naming the holder, and exits 1."""
    EventBuffer(redis, settings).apply([event("click", BASE_MS)])
    lock = FlushLock(redis, SHARD.lock, 1)
    assert lock.acquire()
    try:
        result = run_main("flush")
        assert lock.token == redis.get(SHARD.lock)  # still its own: never taken over
    finally:
        lock.release()
    assert result.code == 1
    holder = f"{socket.gethostname()}:{os.getpid()}"
    assert re.search(
        f"Shard 0: its flush lock is held by {re.escape(holder)} \\(heartbeat [01] s ago, fresh\\)",
        result.out,
    )
    assert re.search("waiting up to [01] s for it", result.out)
    [line] = result.err.strip().splitlines()
    assert f"skipped shard 0: its flush lock is held by {holder} (heartbeat" in line
    assert re.search("past the [01] s it had left: a live flusher extends it", line)
    assert redis.llen(SHARD.queue) == 1


def test_status_json_matches_redis(
    run_main: Callable[..., Result], redis: redis_lib.Redis, settings: Settings
) -> None:
    buffer = EventBuffer(redis, settings)
    now = int(time.time() * 1000)
    buffer.apply(
        [
            event("click", now, profile_id="u1"),
            event("click", now, profile_id="u2"),
            event("click", now, profile_id="u1"),
            event("screen_view", now, project_id="p2", profile_id="u3", session_id="s9"),
            event("click", now, project_id="[/p3]", profile_id="u4"),
        ]
    )
    ingest(buffer, [{"project_id": "p1", "name": "bad", "created_at": "yesterday"}], "b1")
    # Two session events held by a reorder window (another buffer's settings).
    window = Settings.from_env({"REDIS_URL": settings.redis_url})
    EventBuffer(redis, window).apply(
        [
            event("screen_view", now, session_id="s10"),
            event("session_end", now + 1, session_id="s10"),
        ]
    )
    claim = Claims(redis).claim(SHARD, "claim-1", 2, now - 5_000, 1000)
    assert claim is not None
    redis.hset(
        SHARD.stats,
        mapping={"at": now - 60_000, "rows": 17, "dead": 1, "claim": "c0", "claimed": 18},
    )
    lock = FlushLock(redis, SHARD.lock, 60)
    assert lock.acquire()
    token = lock.token.decode()
    try:
        result = run_main("status", "--json")
        human = run_main("status")
    finally:
        lock.release()

    assert (result.code, result.err) == (0, "")
    data = json.loads(result.out)
    [shard] = data["shards"]
    assert shard["queued"] == redis.llen(SHARD.queue) == 4
    assert shard["claimed"]["id"] == "claim-1" and shard["claimed"]["count"] == 2
    assert shard["claimed"]["age_s"] >= 5
    assert shard["dead_letters"] == redis.llen(SHARD.dead) == 1
    assert shard["waiting_views"] == 1
    assert shard["held_sessions"] == redis.zcard(SHARD.held_due) == 1
    assert shard["lock"]["token"] == token
    assert 0 < shard["lock"]["ttl_ms"] <= 60_000
    # Who holds it, and its heartbeat: fresh (it was just taken).
    assert shard["lock"]["holder"]["host"] == socket.gethostname()
    assert shard["lock"]["holder"]["pid"] == os.getpid()
    assert shard["lock"]["holder_ttl_ms"] == 60_000
    assert 0 <= shard["lock"]["heartbeat_age_ms"] < 20_000
    assert shard["lock"]["stale"] is False
    assert shard["last_flush"]["rows"] == 17 and shard["last_flush"]["at_ms"] == now - 60_000
    assert data["totals"] == {
        "queued": 4,
        "claimed": 2,
        "dead_letters": 1,
        "waiting_views": 1,
        "held_sessions": 1,
    }
    assert data["active_visitors"] == {"[/p3]": 1, "p1": 2, "p2": 1}
    assert human.code == 0
    assert "[/p3]" in human.out and "claimed" in human.out
    assert re.search(r"busy \d+s", human.out)
    holder = f"{socket.gethostname()}:{os.getpid()}"
    assert re.search(
        f"Shard 0 lock: {re.escape(holder)}, heartbeat \\d+ s ago, fresh: a flush is at work",
        human.out,
    )


# -- expected failures: one line, the right exit code -----------------------------


@pytest.mark.parametrize(
    ("variable", "value", "command"),
    [
        ("EVENT_BUFFER_BATCH_SIZE", "abc", "status"),
        ("CLICKHOUSE_URL", "http://example.com", "migrate"),
        ("EVENT_BUFFER_TABLE", "events; DROP", "query"),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    redis_url: str, tmp_path: Path, variable: str, value: str, command: str
) -> None:
    env = project_env(REDIS_URL=redis_url, CLICKHOUSE_URL=f"chdb://{tmp_path}/ch")
    env[variable] = value
    args = [command, "SELECT 1"] if command == "query" else [command]
    result = run_cli(args, env)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert variable in line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["status", "flush"])
def test_unreachable_redis_is_one_line_without_the_password(tmp_path: Path, command: str) -> None:
    url = f"redis://:hunter2@127.0.0.1:{closed_port()}/0"
    result = run_cli([command], project_env(REDIS_URL=url, CLICKHOUSE_URL=f"chdb://{tmp_path}/ch"))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "cannot reach Redis at redis://:***@127.0.0.1" in line
    assert "hunter2" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["migrate", "query", "flush"])
def test_unreachable_clickhouse_is_one_line_naming_the_url(
    redis_url: str, redis: redis_lib.Redis, settings: Settings, command: str
) -> None:
    EventBuffer(redis, settings).add(event("x", int(time.time() * 1000)))  # for `flush`
    url = f"clickhouse://app:hunter2@127.0.0.1:{closed_port()}/analytics"
    args = [command, "SELECT 1"] if command == "query" else [command]
    result = run_cli(args, project_env(REDIS_URL=redis_url, CLICKHOUSE_URL=url))
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()  # no clickhouse-driver warning, no traceback
    assert line.startswith("eventbuffer: error: ClickHouse at 127.0.0.1:")
    assert "Connection refused" in line
    assert f"CLICKHOUSE_URL=clickhouse://app:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in line
    assert "hunter2" not in result.stderr + result.stdout


def test_a_celery_worker_with_a_bad_setting_says_one_line(tmp_path: Path) -> None:
    env = project_env(EVENT_BUFFER_SHARDS="many", REDIS_URL="redis://:hunter2@127.0.0.1:1/0")
    for program in ("worker", "beat"):
        result = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "worker", program],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            "eventbuffer: bad setting: EVENT_BUFFER_SHARDS must be an integer, got 'many'"
        ]


@pytest.mark.slow
def test_a_failing_flush_logs_one_line_per_retry_in_the_worker(
    redis_url: str, redis: redis_lib.Redis, settings: Settings, tmp_path: Path
) -> None:
    from tests.support.celery_procs import worker

    EventBuffer(redis, settings).add(event("x", int(time.time() * 1000)))
    url = f"clickhouse://app:hunter2@127.0.0.1:{closed_port()}/analytics"
    env = project_env(REDIS_URL=redis_url, CLICKHOUSE_URL=url)
    proc = worker(env, tmp_path / "flush.log", "-Q", "flush", "-P", "solo")
    app = create_app(Settings.from_env({"REDIS_URL": redis_url}))
    try:
        proc.wait_for(" ready.", 60)
        summary = app.send_task("eventbuffer.process_buffer").get(timeout=60)
        assert summary["errors"] == 1
        proc.wait_for("will retry next run", 10)
    finally:
        proc.stop()
        app.close()
    log = proc.text()
    assert "Traceback" not in log, log
    # clickhouse-driver's warning keeps one line, with the exception, and no password.
    assert "Failed to connect to 127.0.0.1:" in log and "ConnectionRefusedError" in log, log
    assert "hunter2" not in log
    failed = [line for line in log.splitlines() if "flush of shard 0 failed" in line]
    assert len(failed) == 1 and "Connection refused" in failed[0], log


# -- run and demo, as real processes ----------------------------------------------


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            table[int(entry.name)] = (int(ppid), state)
    return table


def descendants(pid: int) -> set[int]:
    table = _process_table()
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _) in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    state = _process_table().get(pid, (0, "X"))[1]
    return state not in ("Z", "X")


def wait_for(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    """`wait_until` that shows `run`'s output when it gives up."""
    detail = (lambda: f"--- run output ---\n{log.read_text()}") if log else None
    wait_until(check, timeout, what, interval=0.2, detail=detail)


def stack_up(process: subprocess.Popen[bytes], log: Path, timeout: float = 40) -> None:
    """Until `run` (writing to `log`) says everything is up; fails if it exited instead."""
    wait_for(
        lambda: "Everything is up" in log.read_text() or process.poll() is not None,
        timeout,
        "the stack",
        log,
    )
    assert process.poll() is None, log.read_text()


@pytest.fixture
def run_stack(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], Path]]:
    """`eventbuffer run` in tmp_path, with REDIS_URL on a closed port: it starts its own Redis."""
    env = project_env(
        REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0",
        CLICKHOUSE_URL=f"chdb://{tmp_path / 'ch'}",
        EVENT_BUFFER_FLUSH_INTERVAL_S="1",
    )
    log = tmp_path / "run.out"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    seen: set[int] = set()
    try:
        yield process, env, log
    finally:
        seen |= descendants(process.pid)
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_run_starts_the_stack_and_stops_it_cleanly(
    run_stack: tuple[subprocess.Popen[bytes], dict[str, str], Path], tmp_path: Path
) -> None:
    process, env, log = run_stack
    stack_up(process, log)
    client = redis_lib.Redis.from_url(env["REDIS_URL"])
    assert client.ping()
    assert client.info("memory")["maxmemory_policy"] == "noeviction"  # workers refuse others
    pids = descendants(process.pid)
    assert len(pids) >= 4  # redis-server, 2 workers (+ pool processes), beat
    # The migration ran in a child: chDB (~250 MB of RSS) never loads into the supervisor.
    mapped = {
        line.split()[-1] for line in Path(f"/proc/{process.pid}/maps").read_text().splitlines()
    }
    assert not [path for path in mapped if "chdb" in path]
    # Every worker consumes with the reliable transport: each is a registered consumer.
    registry = BrokerKeys().registry
    workers = len(INGEST_LAYOUT) + 1  # and the flush worker
    wait_for(lambda: client.zcard(registry) == workers, 20, "reliable-transport consumers", log)

    # Celery tasks, as any producer would send them.
    app = create_app(Settings.from_env({"REDIS_URL": env["REDIS_URL"]}))
    try:
        for n in range(3):
            body = {"project_id": "cli-run", "name": "signup", "created_at": BASE_MS + n}
            app.send_task("eventbuffer.ingest_event", args=[body], queue="ingest")
    finally:
        app.close()
    # A foreign app sends by name without `queue=`: Celery's default queue, also consumed.
    foreign = Celery("foreign", broker=env["REDIS_URL"])
    try:
        body = {"project_id": "foreign", "name": "signup", "created_at": int(time.time() * 1000)}
        foreign.send_task("eventbuffer.ingest_events", args=[[body, body | {"name": "login"}]])
    finally:
        foreign.close()

    # The demo, against the running workers.
    demo = run_cli(["demo", "--sessions", "5", "--seed", "7", "--timeout", "40"], env, tmp_path)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "events in 5 sessions landed in ClickHouse" in demo.stdout
    assert "Rows per event name" in demo.stdout
    assert "screen_view" in demo.stdout and "session_end" in demo.stdout
    assert "Average screen_view duration" in demo.stdout

    def landed() -> bool:
        sql = "SELECT project_id, count() FROM events WHERE project_id IN ('cli-run', 'foreign')"
        query = run_cli(["query", f"{sql} GROUP BY 1 ORDER BY 1", "--format", "tsv"], env, tmp_path)
        return query.returncode == 0 and query.stdout.splitlines()[1:] == [
            "cli-run\t3",
            "foreign\t2",
        ]

    wait_for(landed, 20, "the Celery-sent events in ClickHouse", log)
    client.close()

    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0, log.read_text()
    assert "Stopped." in log.read_text()
    pids |= descendants(process.pid)
    stray = [pid for pid in pids if alive(pid)]
    ingest_logs = sorted((tmp_path / "data" / "logs").glob("ingest*.log"))
    assert len(ingest_logs) == len(INGEST_LAYOUT)
    for ingest_log in ingest_logs:
        assert "Connected to eventbuffer-redis://" in ingest_log.read_text()
    assert stray == [], f"processes left behind: {stray}"
    assert any((tmp_path / "data" / "redis" / "appendonlydir").iterdir())
    assert (tmp_path / "data" / "logs" / "flush.log").exists()


@pytest.mark.slow
def test_a_second_run_in_the_directory_or_on_the_redis_is_refused(
    run_stack: tuple[subprocess.Popen[bytes], dict[str, str], Path], tmp_path: Path
) -> None:
    process, env, log = run_stack
    stack_up(process, log)
    # Same directory: it would share the logs and, with its own Redis, the AOF.
    again = run_cli(["run"], env, tmp_path, timeout=30)
    assert again.returncode == 2, again.stdout + again.stderr
    [line] = again.stderr.strip().splitlines()
    assert f"another `eventbuffer run` (pid {process.pid}) is running in this directory" in line
    # Another directory, the same Redis: a second Beat and more workers on one buffer.
    other = tmp_path / "other"
    other.mkdir()
    elsewhere = run_cli(["run"], env, other, timeout=30)
    assert elsewhere.returncode == 2, elsewhere.stdout + elsewhere.stderr
    [line] = elsewhere.stderr.strip().splitlines()
    assert "another `eventbuffer run` (" in line and f":{process.pid} in {tmp_path}" in line
    assert "uses the Redis at redis://127.0.0.1:" in line
    assert process.poll() is None  # the first stack runs on, untouched
    assert not list((other / "data" / "logs").iterdir())  # the second started nothing


@pytest.mark.slow
def test_run_keeps_its_data_and_logs_to_its_user(tmp_path: Path) -> None:
    """Under umask 022, the AOF (every buffered event), logs and chDB data stay private."""
    data = tmp_path / "data"
    data.mkdir(mode=0o755)  # from an older run
    data.chmod(0o755)
    env = project_env(
        REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0",
        CLICKHOUSE_URL="chdb://data/clickhouse",
        EVENT_BUFFER_FLUSH_INTERVAL_S="1",
    )
    log = tmp_path / "run.out"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            umask=0o022,
        )
    pids: set[int] = set()
    try:
        stack_up(process, log)
        pids = descendants(process.pid)
        app = create_app(Settings.from_env({"REDIS_URL": env["REDIS_URL"]}))
        try:
            body = {"project_id": "private", "name": "signup", "created_at": BASE_MS}
            app.send_task("eventbuffer.ingest_event", args=[body], queue="ingest")
        finally:
            app.close()
        aof = data / "redis" / "appendonlydir"
        wait_for(
            lambda: any(b"private" in f.read_bytes() for f in aof.iterdir()), 20, "the AOF", log
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()
    finally:
        pids |= descendants(process.pid)
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert data.stat().st_mode & 0o777 == 0o700
    found = {path.relative_to(data).parts[0] for path in data.rglob("*")}
    assert {"redis", "logs", "clickhouse", "celerybeat-schedule.dat"} <= found, found
    shared = [
        f"{path.relative_to(data)} {path.stat().st_mode & 0o777:o}"
        for path in [data, *data.rglob("*")]
        if not path.is_symlink() and path.stat().st_mode & 0o077
    ]
    assert shared == []


def redis_pids(log: Path) -> list[int]:
    """The private redis-server's pids, as `run` printed them: first start, then each restart."""
    text = log.read_text()
    first = re.findall(r"private redis-server, pid (\d+)", text)
    return [int(pid) for pid in first + re.findall(r"restarted on port \d+ .*\(pid (\d+)", text)]


LINGERING = {"04", "05", "06", "0B"}  # /proc/net/tcp states: FIN_WAIT1/2, TIME_WAIT, CLOSING


def lingering_connections(port: int) -> int:
    """TCP sockets on local `port` left by a closed server (FIN-WAIT, CLOSING, TIME-WAIT)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = f"0100007F:{port:04X}"
    return sum(1 for row in rows if row.split()[1] == local and row.split()[3] in LINGERING)


def test_port_check_ignores_connections_a_dead_server_left() -> None:
    # A server that closes its connections first leaves them in TIME-WAIT on
    # its port, as a killed redis-server does with its clients.
    from worker.cli.local_redis import _port_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end goes to TIME-WAIT
        client.recv(1)
        client.close()
    wait_for(lambda: lingering_connections(port) > 0, 5, "TIME-WAIT on the port")
    with socket.socket() as plain, pytest.raises(OSError):  # what the old check did
        plain.bind(("127.0.0.1", port))
    assert _port_free("127.0.0.1", port)


def test_run_refuses_a_port_another_program_listens_on(tmp_path: Path) -> None:
    # Something that is not Redis holds REDIS_URL's port: `run` must say so,
    # not start Redis on some other port where producers would not find it.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = project_env(
            REDIS_URL=f"redis://127.0.0.1:{port}/0", CLICKHOUSE_URL=f"chdb://{tmp_path}/ch"
        )
        result = run_cli(["run"], env, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"another program listens on port {port}" in line
    assert "Traceback" not in result.stderr


def test_run_with_unreachable_clickhouse_is_one_line_naming_the_url(tmp_path: Path) -> None:
    env = project_env(
        REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0",
        CLICKHOUSE_URL="clickhouse://eventbuffer:hunter2@127.0.0.1:1/db",
    )
    result = run_cli(["run"], env, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("eventbuffer: error: cannot create table `events`: ")
    assert line.count("clickhouse://eventbuffer:***@127.0.0.1:1/db") == 1
    assert "Connection refused" in line
    assert "hunter2" not in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not redis_answers(env["REDIS_URL"])  # its private Redis was stopped


@pytest.mark.slow
def test_run_restarts_a_killed_private_redis_on_its_port_with_its_aof(
    run_stack: tuple[subprocess.Popen[bytes], dict[str, str], Path], tmp_path: Path
) -> None:
    process, env, log = run_stack
    stack_up(process, log)
    url = env["REDIS_URL"]
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    client = redis_lib.Redis.from_url(url)
    client.set("test:marker", "written before the crash")
    run_id = client.info("server")["run_id"]
    [pid] = redis_pids(log)

    # Killed with clients connected (the workers, Beat and this test).
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: "restarted on port" in log.read_text() or process.poll() is not None,
        20,
        "the restart",
        log,
    )
    assert process.poll() is None, log.read_text()
    assert f"redis-server exited (killed by SIGKILL); restarted on port {port}" in log.read_text()
    # The dead server's connections still sit on the port: what used to move Redis elsewhere.
    assert lingering_connections(port) > 0
    assert client.info("server")["run_id"] != run_id  # a new server, on the same URL
    assert client.get("test:marker") == b"written before the crash"  # loaded from the AOF
    [_, new_pid] = redis_pids(log)
    assert alive(new_pid) and new_pid in descendants(process.pid)

    # The stack keeps working: events sent after the restart land.
    app = create_app(Settings.from_env({"REDIS_URL": url}))
    try:
        for n in range(3):
            at = int(time.time() * 1000) + n
            body = {"project_id": "after-crash", "name": "signup", "created_at": at}
            app.send_task("eventbuffer.ingest_event", args=[body], queue="ingest")
    finally:
        app.close()

    def landed() -> bool:
        sql = "SELECT count() FROM events WHERE project_id = 'after-crash'"
        query = run_cli(["query", sql, "--format", "tsv"], env, tmp_path)
        return query.returncode == 0 and query.stdout.splitlines()[1:] == ["3"]

    wait_for(landed, 40, "events sent after the restart in ClickHouse", log)
    client.close()
    pids = descendants(process.pid)
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0, log.read_text()
    assert [pid for pid in pids if alive(pid)] == []


@pytest.mark.slow
def test_run_stops_with_one_line_when_its_redis_keeps_failing(
    run_stack: tuple[subprocess.Popen[bytes], dict[str, str], Path], tmp_path: Path
) -> None:
    process, _, log = run_stack
    stack_up(process, log)
    # A damaged AOF manifest: every restart of redis-server fails at once.
    [manifest] = (tmp_path / "data" / "redis" / "appendonlydir").glob("*.manifest")
    manifest.write_text("not a manifest\n")
    pids = descendants(process.pid)
    [pid] = redis_pids(log)
    os.kill(pid, signal.SIGKILL)
    assert process.wait(60) == 1, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("eventbuffer: error: the private redis-server exited 6 times in 60 s")
    assert "giving up: redis-server did not start" in last
    assert "restarted on port" not in text
    assert [pid for pid in pids if alive(pid)] == []


@pytest.mark.slow
def test_demo_without_workers_times_out_with_advice(
    redis: redis_lib.Redis, redis_url: str, tmp_path: Path
) -> None:
    env = project_env(REDIS_URL=redis_url, CLICKHOUSE_URL=f"chdb://{tmp_path}/ch")
    assert run_cli(["migrate"], env, tmp_path).returncode == 0
    result = run_cli(["demo", "--sessions", "2", "--timeout", "1"], env, tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "No worker seems to be consuming the `ingest` queue" in line
    assert "eventbuffer run" in line
    assert "ingest task(s) wait in the broker" in line and not line.endswith("…")


def test_demo_elsewhere_refuses_to_create_a_stray_database(
    redis: redis_lib.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Run in another directory, the demo must not make ./data/clickhouse there and flush
    the shared buffer into it: it says where it looked, as query and flush do."""
    queue = ShardKeys("eventbuffer", 0).queue
    redis.rpush(queue, b'{"id":"someone-elses"}')  # a real producer's event, buffered
    env = project_env(REDIS_URL=redis_url)  # the default: chdb://./data/clickhouse
    result = run_cli(["demo", "--sessions", "2", "--timeout", "5"], env, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no embedded ClickHouse at" in result.stderr and "eventbuffer migrate" in result.stderr
    assert not (tmp_path / "data").exists()
    assert redis.llen(queue) == 1  # nothing flushed anywhere


@pytest.mark.slow
def test_demo_timing_out_with_a_worker_running_says_where_the_events_are(
    redis: redis_lib.Redis, redis_url: str, tmp_path: Path
) -> None:
    from tests.support.celery_procs import worker

    env = project_env(
        REDIS_URL=redis_url,
        CLICKHOUSE_URL=f"chdb://{tmp_path}/ch",
        EVENT_BUFFER_REORDER_WINDOW_MS="60000",  # views surely still held when the demo gives up
    )
    assert run_cli(["migrate"], env, tmp_path).returncode == 0
    running = worker(env, tmp_path / "worker.log", "-Q", "ingest", "-P", "solo")
    try:
        running.wait_for("ready", timeout=60)
        result = run_cli(["demo", "--sessions", "20", "--timeout", "5"], env, tmp_path)
    finally:
        running.stop()
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "No worker seems" not in line
    assert "1 worker(s) answered a ping; views wait for the reorder window" in line
    assert re.search(r"\d+ of \d+ demo events are in ClickHouse", line)
    assert "0 ingest task(s) wait in the broker" in line
    assert re.search(r"[1-9]\d* session\(s\) held by the reorder window", line)
    assert not line.endswith("…"), "cut short"


@pytest.mark.timeout(30)
def test_run_signal_handling_cannot_deadlock() -> None:
    # A handler that takes a lock (threading.Event.set) deadlocks when the
    # signal lands while the main thread holds that lock inside Event.wait.
    # Many signals during the wait would hit that window; this must return.
    import signal
    import threading

    from worker.cli.processes import Signals

    signals = Signals()
    signals.install()
    stop = threading.Event()

    def pelt() -> None:
        while not stop.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.0005)

    thread = threading.Thread(target=pelt)
    handled = 0
    try:
        thread.start()
        for _ in range(50):
            signals.count = 0  # re-arm: the next signal must land during this wait
            assert signals.wait(5.0)
            handled += signals.count
        assert handled >= 50
    finally:
        stop.set()
        thread.join()
        signals.restore()


def test_query_against_a_port_that_never_answers_says_so_within_the_timeout(
    tmp_path: Path,
) -> None:
    """A ClickHouse URL whose port accepts and never answers (a wrong port, a hung server):
    the query stops after the timeout the settings give, and says what happened."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel accepts connections; nothing ever answers
        port = silent.getsockname()[1]
        env = project_env(
            CLICKHOUSE_URL=f"clickhouse://127.0.0.1:{port}/default",
            EVENT_BUFFER_CLICKHOUSE_CONNECT_TIMEOUT_S="2",
            EVENT_BUFFER_CLICKHOUSE_INSERT_TIMEOUT_S="3",
            EVENT_BUFFER_FLUSH_STALL_S="60",
        )
        result = run_cli(["query", "SELECT 1"], env, tmp_path, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"no answer from 127.0.0.1:{port} within 3 s" in line
    assert "EVENT_BUFFER_CLICKHOUSE_INSERT_TIMEOUT_S" in line


def test_query_against_an_http_port_names_the_native_port(tmp_path: Path) -> None:
    """ClickHouse's HTTP port (8123) where the native one belongs: say so."""
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        env = project_env(CLICKHOUSE_URL=f"clickhouse://127.0.0.1:{port}/default")
        result = run_cli(["query", "SELECT 1"], env, tmp_path, timeout=60)
    finally:
        server.shutdown()
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "HTTP port (8123)?" in line and "9000" in line


def test_run_with_a_local_tls_url_says_what_it_cannot_start(tmp_path: Path) -> None:
    env = project_env(
        REDIS_URL=f"rediss://127.0.0.1:{closed_port()}/0", CLICKHOUSE_URL=f"chdb://{tmp_path}/ch"
    )
    result = run_cli(["run"], env, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "only for a plain redis:// URL, not rediss://" in line
    assert "point REDIS_URL at a local address" not in line


def test_run_help_names_the_settings_and_where_data_goes() -> None:
    result = run_cli(["run", "--help"], project_env())
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for needle in ("REDIS_URL", "CLICKHOUSE_URL", "./data/redis", "./data/clickhouse"):
        assert needle in text, text


def test_query_mistakes_get_messages_about_the_mistake(run_main: Callable[..., Result]) -> None:
    assert run_main("migrate").code == 0
    typo = run_main("query", "SELEC 1")
    assert typo.code == 2
    assert "ClickHouse cannot parse the query" in typo.err and "--write" not in typo.err
    table = run_main("query", "SELECT count() FROM event")
    assert table.code == 1
    assert "Unknown table" in table.err and "eventbuffer migrate" not in table.err
    several = run_main("query", "SELECT 1; SELECT 2")
    assert several.code == 2 and "several statements" in several.err and "--write" in several.err


def test_dlq_reason_help_lists_every_stored_reason() -> None:
    from worker.deadletters import REASONS

    result = run_cli(["dlq", "list", "--help"], project_env(COLUMNS="200"))
    text = " ".join(result.stdout.split())
    for reason in REASONS:
        assert reason in text, reason


def test_run_banner_fits_80_columns_without_breaking_the_python_example(
    settings: Settings,
) -> None:
    from rich.console import Console

    from worker.cli.run import print_banner

    console = Console(width=80, record=True, color_system=None)
    print_banner(console, settings, None, [])
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    example = "\n".join(line for line in lines if line.startswith("          "))
    assert '"name": "signup",' in example and '"created_at": "2026-01-01T12:00:00Z"})' in example


def test_dlq_list_at_80_columns_keeps_each_reason_whole(
    run_main: Callable[..., Result], redis: redis_lib.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.ingest import ingest

    buffer = EventBuffer(redis, Settings.from_env({"REDIS_URL": run_main_redis(redis)}))
    ingest(buffer, [{"name": "x" * 300}, {"project_id": "p"}], "b-80")
    monkeypatch.setenv("COLUMNS", "80")
    listing = run_main("dlq", "list")
    assert listing.code == 0, listing.err
    assert listing.out.count("invalid_event") >= 2, listing.out
    assert all(len(line) <= 80 for line in listing.out.splitlines())


def run_main_redis(redis: redis_lib.Redis) -> str:
    kwargs = redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"
