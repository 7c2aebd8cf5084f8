"""`eventbuffer run`: the whole stack as real processes, its start, its stop, its Redis."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from celery import Celery

from tests.support.cli import (
    alive,
    cli_env,
    closed_port,
    descendants,
    lingering_connections,
    redis_pids,
    run_cli,
    running_stack,
    stack_up,
    wait_for,
)
from tests.support.dates import BASE_MS
from worker.broker.broker_keys import BrokerKeys
from worker.celery import create_app
from worker.cli.local_redis import redis_answers
from worker.cli.run import INGEST_LAYOUT
from worker.settings import Settings


@pytest.fixture
def run_stack(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], Path]]:
    """`eventbuffer run` in tmp_path, with REDIS_URL on a closed port: it starts its own Redis."""
    env = cli_env(
        REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0",
        CLICKHOUSE_URL=f"chdb://{tmp_path / 'ch'}",
        EVENT_BUFFER_FLUSH_INTERVAL_S="1",
    )
    with running_stack(tmp_path, env) as (process, log, _):
        yield process, env, log


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
    env = cli_env(
        REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0",
        CLICKHOUSE_URL="chdb://data/clickhouse",
        EVENT_BUFFER_FLUSH_INTERVAL_S="1",
    )
    with running_stack(tmp_path, env, umask=0o022) as (process, log, pids):
        stack_up(process, log)
        pids |= descendants(process.pid)
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
    assert data.stat().st_mode & 0o777 == 0o700
    found = {path.relative_to(data).parts[0] for path in data.rglob("*")}
    assert {"redis", "logs", "clickhouse", "celerybeat-schedule.dat"} <= found, found
    shared = [
        f"{path.relative_to(data)} {path.stat().st_mode & 0o777:o}"
        for path in [data, *data.rglob("*")]
        if not path.is_symlink() and path.stat().st_mode & 0o077
    ]
    assert shared == []


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
        env = cli_env(
            REDIS_URL=f"redis://127.0.0.1:{port}/0", CLICKHOUSE_URL=f"chdb://{tmp_path}/ch"
        )
        result = run_cli(["run"], env, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"another program listens on port {port}" in line
    assert "Traceback" not in result.stderr


def test_run_with_unreachable_clickhouse_is_one_line_naming_the_url(tmp_path: Path) -> None:
    env = cli_env(
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
    # With `appendfsync everysec` Redis may hold a write back from its AOF for up to 2 s
    # (while a background fsync runs): a SIGKILL then loses it (the README says so). The
    # restart is what is tested: kill once the marker is in the AOF.
    wait_for(
        lambda: any(b"before the crash" in aof.read_bytes() for aof in tmp_path.rglob("*.aof")),
        20,
        "the marker in the AOF",
        log,
    )
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


def test_run_with_a_local_tls_url_says_what_it_cannot_start(tmp_path: Path) -> None:
    env = cli_env(
        REDIS_URL=f"rediss://127.0.0.1:{closed_port()}/0", CLICKHOUSE_URL=f"chdb://{tmp_path}/ch"
    )
    result = run_cli(["run"], env, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "only for a plain redis:// URL, not rediss://" in line
    assert "point REDIS_URL at a local address" not in line
