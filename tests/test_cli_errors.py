"""Expected failures of the command line and of the workers: one line, the right exit code,
no password."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_lib

from tests.support.cli import (
    cli_env,
    closed_port,
    event,
    run_cli,
)
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.settings import Settings


@pytest.mark.parametrize(
    ("variable", "value", "command"),
    [
        ("EVENT_BUFFER_BATCH_SIZE", "abc", "status"),
        ("CLICKHOUSE_URL", "http://example.com", "migrate"),
        ("EVENT_BUFFER_TABLE", "events; DROP", "query"),
        ("CLICKHOUSE_URL", "chdb://", "status"),
        ("CLICKHOUSE_URL", "clickhouse://h:9000/db?connect_timeout=x", "status"),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    redis_url: str, tmp_path: Path, variable: str, value: str, command: str
) -> None:
    env = cli_env(REDIS_URL=redis_url, CLICKHOUSE_URL=f"chdb://{tmp_path}/ch")
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
    result = run_cli([command], cli_env(REDIS_URL=url, CLICKHOUSE_URL=f"chdb://{tmp_path}/ch"))
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
    result = run_cli(args, cli_env(REDIS_URL=redis_url, CLICKHOUSE_URL=url))
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()  # no clickhouse-driver warning, no traceback
    assert line.startswith("eventbuffer: error: ClickHouse at 127.0.0.1:")
    assert "Connection refused" in line
    assert f"CLICKHOUSE_URL=clickhouse://app:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in line
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("EVENT_BUFFER_SHARDS", "many", "EVENT_BUFFER_SHARDS must be an integer, got 'many'"),
        # Settings are checked alike for the CLI and the workers: not at the first flush.
        (
            "CLICKHOUSE_URL",
            "clickhouse://h:9000/db?connect_timeout=x",
            "CLICKHOUSE_URL cannot be used: could not convert string to float: 'x': "
            "'clickhouse://h:9000/db'",
        ),
        (
            "EVENT_BUFFER_TABLE",
            "events; DROP",
            "EVENT_BUFFER_TABLE must be a ClickHouse identifier (letters, digits, _), "
            "got 'events; DROP'",
        ),
    ],
)
def test_a_celery_worker_with_a_bad_setting_says_one_line(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    env = cli_env(REDIS_URL="redis://:hunter2@127.0.0.1:1/0", **{variable: value})
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
        assert result.stderr.strip().splitlines() == [f"eventbuffer: bad setting: {message}"]


@pytest.mark.slow
def test_a_failing_flush_logs_one_line_per_retry_in_the_worker(
    redis_url: str, redis: redis_lib.Redis, settings: Settings, tmp_path: Path
) -> None:
    from tests.support.celery_procs import worker

    EventBuffer(redis, settings).add(event("x", int(time.time() * 1000)))
    url = f"clickhouse://app:hunter2@127.0.0.1:{closed_port()}/analytics"
    env = cli_env(REDIS_URL=redis_url, CLICKHOUSE_URL=url)
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
