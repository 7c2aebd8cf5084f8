"""transport: ingest throughput on the reliable Redis transport against kombu's stock one.

The ingest benchmark's path (`EventProducer` in this process, ONE solo
Celery worker applying `eventbuffer.ingest_events`), twice: a worker
consuming with the reliable transport (`worker.broker`, the default) and
one with kombu's stock transport (`EVENT_BUFFER_BROKER_TRANSPORT=kombu`),
each on its own database of one private broker redis-server, the buffer on
another server. Rounds alternate between the two on the same events; the
idle worker meanwhile waits (the reliable one with two calls a second).

Two task sizes: batches of 1000 events (a task body of almost 1 MB, where
the stock transport's JSON re-encoding of each message into its `unacked`
hash shows) and of 20 (where per-task costs dominate). Besides events/s,
each round reads the broker's CPU time and its command counts: the
consumer's round trips per task (reliable: EVALSHA+LINDEX for a fetch, a
BLMOVE wait when it was idle, DEL+HDEL for the ack, each pair pipelined;
stock: BRPOP, then a MULTI/EXEC pipeline to record and another to ack).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.support import (
    CeleryChild,
    Result,
    alternate,
    celery_worker,
    cpu_seconds,
    log,
    median,
    private_redis,
    project_env,
)
from tests.support.polling import wait_until
from tests.support.traffic import traffic
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.producer import EventProducer
from worker.settings import Settings

SIZES = (1000, 20)
TRANSPORTS = {"reliable": 1, "kombu": 2}  # name -> broker database
# The consumer's round trips: the commands that start one (see the docstring).
ROUND_TRIPS = {"reliable": ("evalsha", "blmove", "del"), "kombu": ("brpop", "exec")}


@dataclass
class Setup:
    rounds: int
    settings: dict[str, Settings]
    events: list[dict[str, Any]]
    expected_rows: int
    apps: dict[str, Any]
    workers: dict[str, CeleryChild]
    buffer: Any
    broker: Any
    queue: str
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def _calls(client: Any) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def _cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _body_bytes(app: Any, client: Any, batch: list[dict[str, Any]]) -> int:
    """The size of one task's message as it sits in a queue (sent where nobody consumes)."""
    app.send_task("eventbuffer.ingest_events", args=[batch], queue="bench-sample")
    raw = client.rpop("bench-sample")
    client.close()
    return len(raw or b"")


def run(args: argparse.Namespace) -> list[Result]:
    dicts, waiting = traffic(args.ingest_events, seed=11)
    results: list[Result] = []
    with (
        private_redis("transport-buffer") as buffer_server,
        private_redis("transport-broker") as broker_server,
        tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp,
    ):
        workers: dict[str, CeleryChild] = {}
        apps: dict[str, Any] = {}
        settings_of: dict[str, Settings] = {}
        for name, db in TRANSPORTS.items():
            values = {
                "REDIS_URL": buffer_server.db_url(0),
                "CELERY_BROKER_URL": broker_server.db_url(db),
                "CLICKHOUSE_URL": f"chdb://{tmp}/clickhouse",
                "EVENT_BUFFER_HIGH_WATER": str(10**9),
                "EVENT_BUFFER_BROKER_TRANSPORT": name,
            }
            workers[name] = celery_worker(
                f"transport-{name}", "ingest", project_env(**values), Path(tmp) / "logs"
            )
            settings_of[name] = Settings.from_env(values)
            apps[name] = create_app(settings_of[name])
        buffer = buffer_server.client(0)
        settings = Settings.from_env({"REDIS_URL": buffer_server.db_url(0)})
        setup = Setup(
            rounds=args.rounds,
            settings=settings_of,
            events=dicts,
            expected_rows=len(dicts) - waiting,
            apps=apps,
            workers=workers,
            buffer=buffer,
            broker=broker_server.client(0),
            queue=EventBuffer(buffer, settings).keyspace.shard(0).queue,
        )
        try:
            for size in SIZES:
                body = _body_bytes(apps["kombu"], broker_server.client(2), dicts[:size])
                results.append(_one_size(setup, size, body))
        finally:
            for app in apps.values():
                app.close()
            for child in workers.values():
                child.stop()
            setup.buffer.close()
            setup.broker.close()
    return results


def _one_size(setup: Setup, size: int, body_bytes: int) -> Result:
    n = len(setup.events)
    tasks = -(-n // size)
    log(f"[transport] {n:,} events in tasks of {size} ({tasks:,} tasks); {setup.rounds} rounds")
    producers = {
        name: EventProducer(app, batch_size=size, settings=setup.settings[name])
        for name, app in setup.apps.items()
    }
    trips: dict[str, list[float]] = {name: [] for name in TRANSPORTS}
    worker_cpu: dict[str, list[float]] = {name: [] for name in TRANSPORTS}
    broker_cpu: dict[str, list[float]] = {name: [] for name in TRANSPORTS}

    def through(name: str) -> float:
        setup.buffer.flushdb()
        setup.broker.config_resetstat()
        broker_before = _cpu(setup.broker)
        worker = setup.workers[name]
        cpu_before = cpu_seconds(worker.pid)
        started = time.perf_counter()
        for event in setup.events:
            producers[name].send(event)
        producers[name].flush(timeout=120)
        wait_until(
            lambda: int(setup.buffer.llen(setup.queue)) >= setup.expected_rows,
            300,
            f"the {name} worker to apply every event",
            interval=0.002,
            alive=worker.alive,
        )
        seconds = time.perf_counter() - started
        calls = _calls(setup.broker)
        trips[name].append(sum(calls.get(c, 0) for c in ROUND_TRIPS[name]) / tasks)
        worker_cpu[name].append(cpu_seconds(worker.pid) - cpu_before)
        broker_cpu[name].append(_cpu(setup.broker) - broker_before)
        return seconds

    try:
        through("reliable")  # warm-up: imports, connections, script caches
        through("kombu")
        for samples in (trips, worker_cpu, broker_cpu):
            for values in samples.values():
                values.clear()
        timings = alternate(
            setup.rounds,
            {"reliable": lambda: through("reliable"), "kombu": lambda: through("kombu")},
        )
    finally:
        for producer in producers.values():
            producer.close(timeout=5)

    rates = {name: median([n / s for s in timings[name]]) for name in TRANSPORTS}
    per_task = {name: median(trips[name]) for name in TRANSPORTS}
    wcpu = {name: median(worker_cpu[name]) * 1e6 / n for name in TRANSPORTS}
    bcpu = {name: median(broker_cpu[name]) * 1e6 / tasks for name in TRANSPORTS}
    for name in TRANSPORTS:
        log(
            f"[transport] {size:>4}-event tasks, {name:<8} {rates[name]:>9,.0f} events/s; "
            f"{per_task[name]:.1f} consumer round trips and {bcpu[name]:,.0f} µs broker CPU "
            f"per task (publishing included); worker {wcpu[name]:.1f} µs CPU per event"
        )
    return Result(
        f"ingest, tasks of {size} events: reliable transport vs kombu's stock one",
        "events/s",
        rates["reliable"],
        rates["kombu"],
        "the same worker on kombu's stock Redis transport",
        setup.rounds,
        note=(
            f"task body {body_bytes / 1000:,.0f} kB; per task: consumer round trips "
            f"{per_task['reliable']:.1f} vs {per_task['kombu']:.1f}, broker CPU "
            f"{bcpu['reliable']:,.0f} vs {bcpu['kombu']:,.0f} µs (publishing included); "
            f"worker CPU per event {wcpu['reliable']:.1f} vs {wcpu['kombu']:.1f} µs"
        ),
        extra={
            "events": n,
            "task_size": size,
            "task_body_bytes": body_bytes,
            "consumer_round_trips_per_task": per_task,
            "broker_cpu_us_per_task": bcpu,
            "worker_cpu_us_per_event": wcpu,
        },
    )
