"""Prometheus metrics: a real prefork worker's endpoint, the Redis gauges, the monitoring files."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from tests.support.celery_procs import project_env, worker
from tests.support.clock import ManualClock
from tests.support.dates import DAY
from tests.support.polling import wait_until
from tests.support.prometheus import (
    Samples,
    parse,
    total,
    value,
)
from tests.support.servers import free_port
from tests.support.traffic import ReferenceTraffic
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.claims import Claims
from worker.events import datetime_ms, parse_event
from worker.flush_report import FlushResult
from worker.ingestion import IngestResult
from worker.lock import Process, make_token
from worker.metrics import (
    OTHER_PROJECTS,
    Metrics,
    RedisCollector,
    exposed_names,
    top_projects,
)
from worker.reorder import held_packs, held_rows
from worker.settings import Settings, SettingsError
from worker.sinks import open_sink

ROOT = Path(__file__).resolve().parent.parent


MONITORING = ROOT / "monitoring"


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return parse(response.read().decode())


def reachable(port: int) -> bool:
    try:
        scrape(port)
        return True
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


@pytest.mark.slow
def test_worker_endpoint_counts_real_traffic(
    redis_url: str, redis: redis_lib.Redis, tmp_path: Path
) -> None:
    chdb_url = f"chdb://{tmp_path / 'ch'}"
    sink = open_sink(chdb_url)
    sink.migrate()
    sink.close()
    port = free_port()
    env = project_env(
        REDIS_URL=redis_url, CLICKHOUSE_URL=chdb_url, EVENT_BUFFER_METRICS_PORT=str(port)
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("prometheus_multiproc_dir", None)
    settings = Settings.from_env(env)
    app = create_app(settings)
    buffer = EventBuffer(redis, settings)
    queue = buffer.keyspace.shard(0).queue
    sessions = ReferenceTraffic("metrics", project="shop")
    events = [event for _ in range(20) for event in sessions.session()]
    invalid = [{"name": "no project", "created_at": 1}, {"project_id": "shop"}]
    proc = worker(env, tmp_path / "worker.log", "-Q", "ingest,flush", "-c", "2")
    try:
        proc.wait_for("ready.")
        wait_until(lambda: reachable(port), 20, "the metrics endpoint", alive=proc.alive)
        before = scrape(port)
        assert value(before, "eventbuffer_redis_up") == 1
        assert total(before, "eventbuffer_events_applied_total") == 0
        assert value(before, "eventbuffer_buffer_depth", shard="0") == 0

        # Several tasks, so both pool processes are likely to count some.
        # Whole sessions per task (2 each): tasks can run in any order on the two processes.
        batches = [events[i : i + 14] for i in range(0, len(events), 14)]
        batches[0] = batches[0] + invalid
        results = [app.send_task("eventbuffer.ingest_events", args=[b]) for b in batches]
        wait_until(
            lambda: (
                redis.exists(*(f"{buffer.keyspace.shard(0).tag}:batch:{r.id}" for r in results))
                == len(results)
            ),
            30,
            "every ingest batch to be applied",
            alive=proc.alive,
        )
        wait_until(
            lambda: total(scrape(port), "eventbuffer_events_applied_total") == len(events),
            10,
            "the counters of both pool processes",
        )
        applied = scrape(port)
        assert value(applied, "eventbuffer_events_applied_total", kind="screen_view") == 100
        assert value(applied, "eventbuffer_events_applied_total", kind="regular") == 20
        assert value(applied, "eventbuffer_events_applied_total", kind="session_end") == 20
        assert value(applied, "eventbuffer_ingest_batches_total", outcome="applied") == len(batches)
        assert value(applied, "eventbuffer_apply_seconds_count") == len(batches)
        assert value(applied, "eventbuffer_dead_letters_total", reason="invalid_event") == 2
        # Views and session_ends wait for the reorder window; the rest is queued.
        shard = buffer.keyspace.shard(0)
        packs = held_packs(redis, shard)
        held = sum(len(held_rows(pack)) for pack in packs.values())
        sessions = value(applied, "eventbuffer_held_sessions", shard="0")
        assert sessions == len(packs) > 0
        assert value(applied, "eventbuffer_buffer_depth", shard="0") == redis.llen(queue)
        # (an apply that ran after a window had passed gave some to their session already)
        assert redis.llen(queue) + held + redis.hlen(shard.views) == 140
        assert value(applied, "eventbuffer_dead_letter_depth", shard="0") == 2
        assert value(applied, "eventbuffer_active_visitors", project="shop") == 20
        assert value(applied, "eventbuffer_active_projects") == 1
        assert value(applied, "eventbuffer_oldest_event_age_seconds", shard="0") > 0

        time.sleep(settings.reorder_window_ms / 1000)  # the window passes: the flush releases
        summary = app.send_task("eventbuffer.process_buffer").get(timeout=60)
        assert summary["rows"] == 140
        assert held_packs(redis, shard) == {} and redis.hlen(shard.views) == 0
        flushed = scrape(port)
        assert value(flushed, "eventbuffer_events_flushed_total") == 140
        assert value(flushed, "eventbuffer_events_late_total") == 0
        assert value(flushed, "eventbuffer_flush_runs_total", result="success") == 1
        assert value(flushed, "eventbuffer_flush_batches_total") == 1
        assert value(flushed, "eventbuffer_insert_chunk_rows_sum") == 140
        assert value(flushed, "eventbuffer_insert_chunk_rows_count") == 1
        for phase in ("claim", "insert", "ack"):
            assert value(flushed, "eventbuffer_flush_phase_seconds_count", phase=phase) == 1
        assert value(flushed, "eventbuffer_buffer_depth", shard="0") == redis.llen(queue) == 0
        assert value(flushed, "eventbuffer_last_flush_timestamp_seconds", shard="0") > 0

        # A flush that finds the lock held counts as "locked".
        redis.set(buffer.keyspace.shard(0).lock, "someone-else", px=60_000)
        app.send_task("eventbuffer.process_buffer").get(timeout=30)
        locked = scrape(port)
        assert value(locked, "eventbuffer_flush_runs_total", result="locked") == 1
        assert value(locked, "eventbuffer_flush_lock_skips_total") == 1
        assert value(locked, "eventbuffer_flush_lock_held", shard="0") == 1
    finally:
        proc.stop()
        app.close()
    assert "serving Prometheus metrics on port" in proc.text()


@pytest.mark.slow
def test_a_busy_metrics_port_is_logged_and_the_worker_runs_on(
    redis_url: str, redis: redis_lib.Redis, tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = project_env(
            REDIS_URL=redis_url,
            CLICKHOUSE_URL=f"chdb://{tmp_path / 'ch'}",
            EVENT_BUFFER_METRICS_PORT=str(port),
        )
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        app = create_app(Settings.from_env(env))
        proc = worker(env, tmp_path / "worker.log", "-Q", "ingest", "-P", "solo")
        try:
            proc.wait_for("ready.")
            app.send_task(
                "eventbuffer.ingest_events",
                args=[[{"project_id": "p", "name": "x", "created_at": int(time.time() * 1000)}]],
            )
            wait_until(lambda: redis.llen("{eventbuffer:0}:queue") == 1, 20, "the event")
        finally:
            proc.stop()
            app.close()
    assert f"metrics: cannot serve on port {port}" in proc.text()


@pytest.mark.slow
def test_worker_processes_of_one_host_share_one_endpoint(
    redis_url: str, redis: redis_lib.Redis, tmp_path: Path
) -> None:
    """The layout `eventbuffer run` uses: solo processes, one directory, one port."""
    port = free_port()
    shared = tmp_path / "prom"
    shared.mkdir()
    env = project_env(
        REDIS_URL=redis_url,
        CLICKHOUSE_URL=f"chdb://{tmp_path / 'ch'}",
        EVENT_BUFFER_METRICS_PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(shared),
    )
    app = create_app(Settings.from_env(env))
    procs = [
        worker(env, tmp_path / f"w{n}.log", "-Q", "ingest", "-P", "solo", "-n", f"w{n}@%h")
        for n in range(2)
    ]
    try:
        for proc in procs:
            proc.wait_for("ready.")
        now = int(time.time() * 1000)
        for n in range(40):
            event = {"project_id": "p", "name": "x", "created_at": now + n}
            app.send_task("eventbuffer.ingest_events", args=[[event]], queue="ingest")
        wait_until(lambda: redis.llen("{eventbuffer:0}:queue") == 40, 30, "every event")
        wait_until(
            lambda: total(scrape(port), "eventbuffer_events_applied_total") == 40,
            10,
            "both processes' counters on the one endpoint",
        )
    finally:
        for proc in procs:
            proc.stop()
        app.close()
    logs = [proc.text() for proc in procs]
    assert all(" received" in log for log in logs), "each process ran some of the tasks"
    assert sum("serving Prometheus metrics on port" in log for log in logs) == 1
    assert sum("is taken, by another worker of this host" in log for log in logs) == 1
    assert not any("cannot serve" in log for log in logs)


def outward_address() -> str | None:
    """This host's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_the_endpoint_listens_on_loopback_unless_told_otherwise(
    redis_url: str, tmp_path: Path
) -> None:
    outward = outward_address()
    for address in (None, "0.0.0.0"):
        port = free_port("0.0.0.0")
        env = project_env(
            REDIS_URL=redis_url,
            CLICKHOUSE_URL=f"chdb://{tmp_path / 'ch'}",
            EVENT_BUFFER_METRICS_PORT=str(port),
            **({"EVENT_BUFFER_METRICS_ADDRESS": address} if address else {}),
        )
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        proc = worker(env, tmp_path / f"worker-{port}.log", "-Q", "ingest", "-P", "solo")
        try:
            proc.wait_for("ready.")
            wait_until(
                lambda port=port: reachable(port), 20, "the metrics endpoint", alive=proc.alive
            )
            if outward is not None:
                assert connects(outward, port) == (address == "0.0.0.0"), (address, outward)
        finally:
            proc.stop()
        shown = address or "127.0.0.1"
        assert f"serving Prometheus metrics on port {port} of {shown}" in proc.text()


def test_the_metrics_address_is_an_ip_address() -> None:
    assert Settings.from_env({}).metrics_address == "127.0.0.1"
    assert Settings.from_env({"EVENT_BUFFER_METRICS_ADDRESS": " :: "}).metrics_address == "::"
    with pytest.raises(SettingsError, match="EVENT_BUFFER_METRICS_ADDRESS must be an IP"):
        Settings.from_env({"EVENT_BUFFER_METRICS_ADDRESS": "everywhere"})


def test_recording_from_result_objects() -> None:
    import worker.metrics.counters as metrics_module

    metrics = Metrics(CollectorRegistry())
    metrics_module._metrics = metrics
    try:
        metrics_module.record_ingest(
            IngestResult("b1", 3, 1, 3, False, 3, {"regular": 2, "screen_view": 1}), 0.002
        )
        metrics_module.record_ingest(IngestResult("b1", 3, 1, 0, True, 3, {}), 0.001)
        result = FlushResult(shard=0, rows=7, dead=1, batches=1, chunk_rows=[4, 4])
        result.dead_reasons["rejected_by_clickhouse"] = 1
        metrics_module.record_flush(result)
        metrics_module.record_flush(FlushResult(shard=0, locked=False))
        metrics_module.record_flush(FlushResult(shard=0, took_over="far-away:4242: gone"))
        metrics_module.record_flush(FlushResult(shard=0, backoff_s=3.5))
        metrics_module.record_flush_error()
    finally:
        metrics_module._metrics = None
    samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "eventbuffer_events_applied_total", kind="regular") == 2
    assert value(samples, "eventbuffer_events_applied_total", kind="screen_view") == 1
    assert value(samples, "eventbuffer_ingest_batches_total", outcome="duplicate") == 1
    # The duplicate's invalid event was dead-lettered by the first delivery only.
    assert value(samples, "eventbuffer_dead_letters_total", reason="invalid_event") == 1
    assert value(samples, "eventbuffer_dead_letters_total", reason="rejected_by_clickhouse") == 1
    assert value(samples, "eventbuffer_events_flushed_total") == 7
    assert value(samples, "eventbuffer_insert_chunk_rows_count") == 2
    for result_label in ("locked", "error", "backoff"):
        assert value(samples, "eventbuffer_flush_runs_total", result=result_label) == 1
    assert value(samples, "eventbuffer_flush_runs_total", result="success") == 2
    assert value(samples, "eventbuffer_flush_lock_takeovers_total") == 1
    assert value(samples, "eventbuffer_apply_seconds_count") == 2


def test_top_projects_bound_the_label_cardinality() -> None:
    counts = {"a": 5, "b": 9, "c": 1, "d": 5, "idle": 0}
    assert top_projects(counts, 2) == {"b": 9, "a": 5, OTHER_PROJECTS: 6}
    assert top_projects(counts, 10) == {"b": 9, "a": 5, "d": 5, "c": 1, OTHER_PROJECTS: 0}
    assert top_projects(counts, 0) == {OTHER_PROJECTS: 20}


def test_redis_gauges_match_the_buffer(redis: redis_lib.Redis, settings: Settings) -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": settings.redis_url,
            "EVENT_BUFFER_SHARDS": "2",
            "EVENT_BUFFER_METRICS_TOP_PROJECTS": "1",
        }
    )
    clock = ManualClock()
    buffer = EventBuffer(redis, settings, clock)
    created = f"{DAY} 12:00:00.000"
    events = [
        parse_event(
            {
                "project_id": "big" if n % 3 else "small",
                "name": "click",
                "session_id": f"s{n}",
                "profile_id": f"u{n}",
                "created_at": created,
            }
        )
        for n in range(30)
    ]
    clock.set(datetime_ms(created) + 42_000)
    buffer.apply(events)
    registry = CollectorRegistry()
    registry.register(RedisCollector(settings, lambda: redis, clock))
    samples = parse(generate_latest(registry).decode())
    lengths = buffer.queue_lengths()
    assert sum(lengths.values()) == 30
    for shard, length in lengths.items():
        assert value(samples, "eventbuffer_buffer_depth", shard=str(shard)) == length
        if length:
            assert value(samples, "eventbuffer_oldest_event_age_seconds", shard=str(shard)) == 42
    assert value(samples, "eventbuffer_active_visitors", project="big") == 20
    assert value(samples, "eventbuffer_active_visitors", project=OTHER_PROJECTS) == 10
    assert ("eventbuffer_active_visitors", frozenset({("project", "small")})) not in samples
    assert value(samples, "eventbuffer_active_projects") == 2
    assert value(samples, "eventbuffer_flush_interval_seconds") == 10
    assert value(samples, "eventbuffer_redis_up") == 1

    # An open claim, a back-off and a held lock show on the next scrape.
    shard = buffer.keyspace.shard(0)
    claim = Claims(redis).claim(shard, "claim-1", 5, clock.now_ms() - 7_000, 1000)
    assert claim is not None
    redis.set(shard.backoff, 1, px=4_000)
    redis.set(shard.lock, "token", px=60_000)
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "eventbuffer_claimed_in_flight", shard="0") == 5
    assert value(samples, "eventbuffer_claim_age_seconds", shard="0") == 7
    assert 3 < value(samples, "eventbuffer_flush_backoff_seconds", shard="0") <= 4
    assert value(samples, "eventbuffer_flush_lock_held", shard="0") == 1
    assert value(samples, "eventbuffer_flush_lock_held", shard="1") == 0
    # A token that does not name its holder: no heartbeat to read, not judged stale.
    assert ("eventbuffer_flush_lock_heartbeat_age_seconds", frozenset({("shard", "0")})) not in (
        samples
    )
    assert value(samples, "eventbuffer_flush_lock_stale", shard="0") == 0

    # Named holders on another host: shard 0's was extended 1 s ago, shard 1's 11 s ago.
    far_away = Process("far-away", 4242, 123, "feedfacecafe")
    redis.set(shard.lock, make_token(15_000, far_away), px=14_000)
    redis.set(buffer.keyspace.shard(1).lock, make_token(15_000, far_away), px=4_000)
    samples = parse(generate_latest(registry).decode())
    busy = value(samples, "eventbuffer_flush_lock_heartbeat_age_seconds", shard="0")
    stuck = value(samples, "eventbuffer_flush_lock_heartbeat_age_seconds", shard="1")
    assert 1 <= busy < 2 and 11 <= stuck < 12
    assert value(samples, "eventbuffer_flush_lock_stale", shard="0") == 0
    assert value(samples, "eventbuffer_flush_lock_stale", shard="1") == 1


def test_redis_down_is_a_gauge_not_an_error() -> None:
    port = free_port()  # nothing listens there
    settings = Settings.from_env({"REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    collector = RedisCollector(settings, lambda: redis_lib.Redis(port=port))
    families = {f.name: f for f in collector.collect()}
    assert families["eventbuffer_redis_up"].samples[0].value == 0
    assert "eventbuffer_buffer_depth" not in families


_NAME = re.compile(r"\beventbuffer_[a-z0-9_]+\b")


def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_dashboard_uses_only_exposed_metric_names() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["panels"] and dashboard["schemaVersion"]
    exprs = _exprs(dashboard["panels"])
    assert len(exprs) >= 10
    used = {name for expr in exprs for name in _NAME.findall(expr)}
    assert used, "the dashboard queries no eventbuffer metric"
    assert used <= exposed_names(), f"unknown metric names: {sorted(used - exposed_names())}"


def test_alert_rules_use_only_exposed_metric_names() -> None:
    rules = yaml.safe_load((MONITORING / "prometheus-alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in alerts}
    assert {
        "EventBufferDepthGrowing",
        "EventBufferOldestEventTooOld",
        "EventBufferDeadLettersRising",
        "EventBufferFlushErrors",
        "EventBufferRedisMemoryHigh",
        "EventBufferRedisMemoryCritical",
        "EventBufferRedisEvicts",
    } <= names
    used = {name for rule in alerts for name in _NAME.findall(rule["expr"])}
    assert used <= exposed_names(), f"unknown metric names: {sorted(used - exposed_names())}"
    for rule in alerts:
        assert rule["labels"]["severity"] and rule["annotations"]["summary"]


def test_redis_memory_alerts_fire_at_80_and_95_percent_of_a_set_maxmemory() -> None:
    rules = yaml.safe_load((MONITORING / "prometheus-alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    for name, threshold, severity in (
        ("EventBufferRedisMemoryHigh", "0.80", "warning"),
        ("EventBufferRedisMemoryCritical", "0.95", "critical"),
    ):
        expr = " ".join(alerts[name]["expr"].split())
        # A Redis without a limit (maxmemory 0) divides by nothing: no series, no alert.
        assert (
            "eventbuffer_redis_used_memory_bytes / (eventbuffer_redis_maxmemory_bytes > 0)" in expr
        )
        assert expr.endswith(f"> {threshold}"), expr
        assert "by (job, node)" in expr  # a Redis both buffer and broker alerts once
        assert alerts[name]["labels"]["severity"] == severity
    assert 'policy!="noeviction"' in alerts["EventBufferRedisEvicts"]["expr"]


def test_every_metric_is_named_consistently() -> None:
    names = exposed_names()
    assert all(name.startswith("eventbuffer_") for name in names)
    assert len(names) >= 20


def test_the_readme_names_every_exposed_series() -> None:
    """The README's Observability section is the catalogue: no series goes unnamed there."""
    readme = (ROOT / "README.md").read_text()
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exposed_names()}
    assert sorted(name for name in families if name not in readme) == []
