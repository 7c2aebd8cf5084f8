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

from tests.conftest import Result
from tests.support.servers import free_port
from worker import runtime
from worker.buffer import EventBuffer
from worker.cli.status import status_data
from worker.cli.watch import WatchState, render, sparkline, watch
from worker.events import parse_event
from worker.flusher import Flusher
from worker.keys import ShardKeys
from worker.lock import Process, make_token
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
    for expected in ("history", "as of ", "ingest", "(30 s avg)", "flush", "shop", "blog", "45"):
        assert expected in out, expected
    assert " 2m " in out or " 90s " in out  # the oldest event's age
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
    assert "ingest 15/s" in text and "flush 25/s" in text
    assert "<1s ago" in text or "0s ago" in text  # the last flush
    assert sparkline([30, 10, 0]) == "█▃▁"
    assert sparkline([0, 0]) == "▁▁"


def snapshot(shards: list[dict[str, object]], queued: int) -> dict[str, object]:
    """A status_data-shaped snapshot with the given shards (what render and rates read)."""
    return {
        "redis": "redis://h/0",
        "key_prefix": "eventbuffer",
        "now_ms": 1_000_000,
        "flush_pending": False,
        "totals": {"queued": queued, "claimed": 0, "dead_letters": 0, "waiting_views": 0},
        "shards": shards,
        "active_visitors": {},
        "active_visitor_window_s": 300,
        "broker": {"url": "redis://h/0", "queues": {"ingest": {"waiting": 0, "consumers": None}}},
    }


def shard_snapshot(n: int, **fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "shard": n,
        "queued": 0,
        "claimed": None,
        "dead_letters": 0,
        "oldest_event_age_s": 0.0,
        "waiting_views": 0,
        "lock": None,
        "backoff_s": 0.0,
        "failures": 0,
        "last_flush": None,
        "rows_total": 0,
        "removed_total": 0,
    }
    return {**base, **fields}


def test_watch_rates_are_smoothed_over_bursty_flushes() -> None:
    """1,000 events/s in, one flush of 10,000 rows every 10 s, refreshed every second."""
    state = WatchState()
    rates = []
    inserted = queued = 0
    for second in range(60):
        queued += 1000
        if second % 10 == 9:
            inserted += queued
            queued = 0
        data = snapshot(
            [shard_snapshot(0, queued=queued, rows_total=inserted, removed_total=inserted)], queued
        )
        state.update(data, at=float(second))
        rates.append(state.rates)
    steady = [r.flushed_per_s for r in rates[31:]]  # once a whole window has passed
    assert steady and all(f is not None and 600 <= f <= 1400 for f in steady), steady
    assert all(r.ingested_per_s == 1000 for r in rates[1:])


def test_watch_and_status_show_a_shards_back_off_within_80_columns(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dataclasses import replace

    wide = replace(settings, shards=4)
    buffer = EventBuffer(redis, wide)
    now = int(time.time() * 1000)
    fill(buffer, 40, now)
    # Shards 0-1: tokens that do not name their holder; 2-3: a long host name's holder,
    # extended 2 s ago (busy) and 12 s ago (STALE: no heartbeat for 2/3 of its 15 s TTL).
    holder = Process("ip-10-20-30-40.eu-west-1.compute.internal", 4_194_303, 7, "feedfacecafe")
    tokens = ["4f2a9c0e7d6b11efb3a1" * 2] * 2 + [make_token(15_000, holder)] * 2
    for n, (token, left_ms) in enumerate(zip(tokens, (58_000, 58_000, 13_000, 3_000), strict=True)):
        shard = ShardKeys("eventbuffer", n)
        redis.set(shard.backoff, 3, px=64_000)
        redis.set(shard.failures, 6)
        redis.set(shard.lock, token, px=left_ms)
        redis.hset(shard.claim, mapping={"id": "c", "count": 4000, "at": now - 12_000})
        redis.hset(shard.stats, mapping={"at": now - 5000, "rows": 123_456, "claim": "c"})
    data = status_data_for(wide)
    state = WatchState()
    state.update(data, at=0.0)
    console = Console(record=True, width=80, force_terminal=False)
    console.print(render(data, state, wide.high_water))
    view = console.export_text()
    assert max(len(line) for line in view.splitlines()) <= 80, view
    assert view.count("64s (6x)") == 4, view
    assert "busy 2s" in view and "STALE 12s" in view, view
    assert " ".join(view.split()).count("ip-10-20-30-40.eu-west-1.compute.internal:4194303") == 2
    # Nothing cut to fit: the only ellipses are the lock token's and the rates not known yet.
    assert "…" not in view.replace("4f2a9c…", "").replace("ingest …", "").replace("flush …", "")

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("EVENT_BUFFER_SHARDS", "4")
    status = run_main("status")
    assert status.code == 0, status.err
    text = status.out
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "64s (6x)" in text, text
    assert "busy 2s" in text and "STALE 12s" in text, text
    assert "STALE: looks dead, the next flush takes over" in " ".join(text.split()), text
    assert "back off after ClickHouse failures" in text


def status_data_for(settings: Settings) -> dict[str, object]:
    runtime.configure(settings)
    try:
        return status_data(settings)
    finally:
        runtime.reset()


def test_status_warns_about_tasks_waiting_in_the_default_queue(
    run_main: Callable[..., Result], redis: redis_lib.Redis
) -> None:
    redis.lpush("celery", b"{}", b"{}")  # two tasks sent by name without queue=
    redis.lpush("ingest", b"{}")
    out = run_main("status").out
    assert "Broker queues (tasks waiting): ingest 1, flush 0, celery 2" in out
    assert "2 task(s) wait in Celery's default queue `celery`" in out
    data = json.loads(run_main("status", "--json").out)
    assert data["broker"]["queues"]["celery"] == {"waiting": 2, "consumers": None}


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
    assert "as of " in console.export_text()  # a clock time, not a count of refreshes


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
        "import sys; from worker import metrics; from worker.ingestion import IngestResult;"
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


def test_metrics_in_the_stacks_directory_include_its_workers_counters(
    run_main: Callable[..., Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `eventbuffer run` has its workers count in data/metrics; run from that directory,
    # `eventbuffer metrics` finds them without PROMETHEUS_MULTIPROC_DIR set by hand.
    directory = tmp_path / "data" / "metrics"
    directory.mkdir(parents=True)
    script = (
        "import sys; from worker import metrics; from worker.ingestion import IngestResult;"
        "metrics.enable_multiprocess(sys.argv[1]);"
        "metrics.record_ingest(IngestResult('b', 5, 0, 5, False, 5, {'regular': 5}), 0.01)"
    )
    subprocess.run([sys.executable, "-c", script, str(directory)], check=True, cwd=ROOT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # unset (empty), restored afterwards
    result = run_main("metrics")
    assert result.code == 0
    values = samples(result.out)
    assert values[("eventbuffer_events_applied_total", frozenset({("kind", "regular")}))] == 5


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
