"""`eventbuffer demo`: traffic sent, and what it says when the events do not land."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis as redis_lib

from tests.support.cli import (
    cli_env,
    run_cli,
)
from worker.keys import ShardKeys


@pytest.mark.slow
def test_demo_without_workers_times_out_with_advice(
    redis: redis_lib.Redis, redis_url: str, tmp_path: Path
) -> None:
    env = cli_env(REDIS_URL=redis_url, CLICKHOUSE_URL=f"chdb://{tmp_path}/ch")
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
    env = cli_env(REDIS_URL=redis_url)  # the default: chdb://./data/clickhouse
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

    env = cli_env(
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
