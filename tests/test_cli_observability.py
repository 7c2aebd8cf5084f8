"""`eventbuffer status --watch` and `eventbuffer metrics` against a real Redis with data."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from tests.conftest import Result, free_port
from worker import runtime
from worker.buffer import EventBuffer
from worker.cli.status import status_data
from worker.cli.watch import WatchState, render, sparkline, watch
from worker.events import parse_event
from worker.flush import Flusher
from worker.keys import ShardKeys
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink

ROOT = Path(__file__).resolve().parent.parent
SHARD = ShardKeys("eventbuffer", 0)


@pytest.fixture
def run_main_env() -> dict[str, str | None]:
    return {"COLUMNS": "200", "PROMETHEUS_MULTIPROC_DIR": None}


def fill(buffer: EventBuffer, count: int, at_ms: int, project: str = "shop") -> None:
    buffer.apply(
        [
            parse_event(
                {
                    "project_id": project,
                    "name": "click",
                    "profile_id": f"{project}-u{n % 7}",
                    "created_at": at_ms,
                }
            )
            for n in range(count)
        ]
    )


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


# -- status --watch -------------------------------------------------------------------------


def test_watch_renders_live_against_real_redis(
    run_main: Callable[..., Result], redis: redis_lib.Redis, settings: Settings
) -> None:
    buffer = EventBuffer(redis, settings)
    now = int(time.time() * 1000)
    fill(buffer, 40, now - 90_000)
    fill(buffer, 5, now, project="blog")
    redis.rpush(SHARD.dead, b'{"reason":"invalid_event"}\n{}')
    result = run_main("status", "--watch", "--iterations", "3", "--interval", "0.05")
    assert (result.code, result.err) == (0, "")
    out = result.out
    for expected in ("depth history", "refresh 3", "ingest", "flush", "shop", "blog", "45"):
        assert expected in out, expected
    assert "1 min" in out or "90 s" in out  # the oldest event's age
    assert "Traceback" not in out


def test_watch_rates_come_from_the_difference_between_refreshes(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    runtime.configure(settings)
    try:
        buffer = EventBuffer(redis, settings)
        now = int(time.time() * 1000)
        fill(buffer, 30, now)
        state = WatchState()
        state.update(status_data(settings), at=100.0)
        # Between two refreshes: 20 events arrive and a flush writes all 50.
        fill(buffer, 20, now)
        Flusher(redis, settings, lambda: sink).process_buffer()
        fill(buffer, 10, now)
        second = status_data(settings)
        state.update(second, at=102.0)
    finally:
        runtime.reset()
    assert state.rates.flushed_per_s == 25.0  # 50 rows in 2 s
    assert state.rates.ingested_per_s == 15.0  # (10 - 30 queued) + 50 removed, in 2 s
    console = Console(record=True, width=160, force_terminal=False)
    console.print(render(second, state, settings.high_water))
    text = console.export_text()
    assert "ingest 15.0 rows/s" in text and "flush 25.0 rows/s" in text
    assert "50 rows" in text  # the last flush
    assert sparkline([30, 10, 0]) == "█▃▁"
    assert sparkline([0, 0]) == "▁▁"


def test_watch_stops_on_ctrl_c(redis: redis_lib.Redis, settings: Settings) -> None:
    calls = 0

    def snapshot(s: Settings) -> dict[str, object]:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return status_data(s)

    runtime.configure(settings)
    try:
        console = Console(record=True, width=160)
        args = Namespace(interval=0, iterations=0)
        assert watch(args, settings, console, snapshot) == 0
    finally:
        runtime.reset()
    assert calls == 3
    assert "refresh 2" in console.export_text()


def test_watch_and_json_cannot_be_combined(run_main: Callable[..., Result]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_main("status", "--watch", "--json")
    assert exit_info.value.code == 2


def test_status_json_reports_the_oldest_event_age(
    run_main: Callable[..., Result], redis: redis_lib.Redis, settings: Settings
) -> None:
    fill(EventBuffer(redis, settings), 3, int(time.time() * 1000) - 30_000)
    result = run_main("status", "--json")
    [shard] = json.loads(result.out)["shards"]
    assert 29 <= shard["oldest_event_age_s"] < 60


# -- metrics --------------------------------------------------------------------------------


def test_metrics_prints_the_redis_gauges(
    run_main: Callable[..., Result], redis: redis_lib.Redis, settings: Settings
) -> None:
    fill(EventBuffer(redis, settings), 12, int(time.time() * 1000))
    result = run_main("metrics")
    assert (result.code, result.err) == (0, "")
    values = samples(result.out)
    assert values[("eventbuffer_buffer_depth", frozenset({("shard", "0")}))] == 12
    assert values[("eventbuffer_buffer_depth", frozenset({("shard", "0")}))] == redis.llen(
        SHARD.queue
    )
    assert values[("eventbuffer_active_visitors", frozenset({("project", "shop")}))] == 7
    assert values[("eventbuffer_redis_up", frozenset())] == 1
    # Without PROMETHEUS_MULTIPROC_DIR a one-shot command has no counters to show.
    assert not any(name.endswith("_total") for name, _ in values)


def test_metrics_includes_the_counters_of_the_multiprocess_directory(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    # Another process counts there, as a worker's pool process does.
    script = (
        "import sys; from worker import metrics; from worker.ingest import IngestResult;"
        "metrics.enable_multiprocess(sys.argv[1]);"
        "metrics.record_ingest(IngestResult('b', 3, 0, 3, False, 3, {'regular': 3}), 0.01)"
    )
    subprocess.run([sys.executable, "-c", script, str(directory)], check=True, cwd=ROOT)
    run_main("metrics")  # (fixture: clears the variable first)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    result = run_main("metrics")
    assert result.code == 0
    values = samples(result.out)
    assert values[("eventbuffer_events_applied_total", frozenset({("kind", "regular")}))] == 3
    assert values[("eventbuffer_apply_seconds_count", frozenset())] == 1


def test_metrics_without_redis_reports_it_down(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0",
        "CLICKHOUSE_URL": f"chdb://{tmp_path}/ch",
    }
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "metrics"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert samples(result.stdout)[("eventbuffer_redis_up", frozenset())] == 0
    [line] = result.stderr.strip().splitlines()
    assert "cannot reach Redis at redis://:***@127.0.0.1" in line
    assert "hunter2" not in result.stdout + result.stderr
