"""ingest: events/s from the producer client through Celery into the buffer.

eventbuffer's path: `EventProducer` (batches of 1000) in this process
publishes `eventbuffer.ingest_events` tasks to the Redis broker; ONE Celery
worker process (`-P solo`, queue `ingest`) validates and applies them. The
clock runs from the first `send()` until the buffer holds every event: the
queue's LLEN reaches the number of rows the events produce (all of them
minus the last views of sessions still open, which wait as last views).

Baseline: the same events applied in this process by the worker's own
function (`worker.ingest.ingest`: parse_event + EventBuffer.apply, batches
of 1000), i.e. the apply benchmark's path including validation. The ratio is
what Celery (serialization, broker, task dispatch) costs.

The broker and the buffer use two databases of one private redis-server, so
the buffer can be emptied between rounds without touching kombu's bindings.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.support import (
    Result,
    alternate,
    celery_worker,
    cpu_seconds,
    log,
    median,
    private_redis,
    project_env,
    wait_until,
)
from tests.support.traffic import mix, traffic
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.ingest import ingest
from worker.producer import EventProducer
from worker.settings import Settings

BATCH = 1000
TARGET_EVENTS_PER_S = 50_000


def run(args: argparse.Namespace) -> list[Result]:
    n = args.ingest_events
    rounds = args.rounds
    dicts, waiting = traffic(n, seed=11)
    expected = n - waiting
    log(f"[ingest] {mix(dicts)}; producer batch {BATCH}; {rounds} rounds")
    producer_rates: list[float] = []
    worker_busy: list[float] = []

    with (
        private_redis("ingest") as server,
        tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp,
    ):
        values = {
            "REDIS_URL": server.db_url(0),
            "CELERY_BROKER_URL": server.db_url(1),
            "CLICKHOUSE_URL": f"chdb://{tmp}/clickhouse",
            # No flush worker runs here: keep back-pressure from queueing flush tasks.
            "EVENT_BUFFER_HIGH_WATER": str(10**9),
        }
        settings = Settings.from_env(values)
        worker = celery_worker("ingest", "ingest", project_env(**values), Path(tmp) / "logs")
        client = server.client(0)
        buffer = EventBuffer(client, settings)
        queue = buffer.keyspace.shard(0).queue
        app = create_app(settings)
        producer = EventProducer(app, batch_size=BATCH, settings=settings)

        def applied() -> bool:
            return bool(int(client.llen(queue)) >= expected)

        def through_celery() -> float:
            client.flushdb()
            cpu_before = cpu_seconds(worker.pid)
            started = time.perf_counter()
            for event in dicts:
                producer.send(event)
            producer.flush(timeout=60)
            sent = time.perf_counter()
            wait_until(
                applied, 120, "the worker to apply every event", interval=0.002, alive=worker.alive
            )
            seconds = time.perf_counter() - started
            producer_rates.append(n / (sent - started))
            worker_busy.append((cpu_seconds(worker.pid) - cpu_before) / seconds)
            return seconds

        def in_process() -> float:
            client.flushdb()
            started = time.perf_counter()
            for number, start in enumerate(range(0, n, BATCH)):
                ingest(buffer, dicts[start : start + BATCH], f"bench-{time.time_ns()}-{number}")
            seconds = time.perf_counter() - started
            if int(client.llen(queue)) != expected:
                log(f"[ingest] WARNING: in-process left {client.llen(queue)} rows, not {expected}")
            return seconds

        try:
            through_celery()  # warm-up: imports, connections, script cache in the worker
            in_process()
            producer_rates.clear()
            worker_busy.clear()
            timings = alternate(rounds, {"celery": through_celery, "in-process": in_process})
        finally:
            producer.close(timeout=5)
            app.close()
            client.close()
            worker.stop()

    celery_rate = median([n / s for s in timings["celery"]])
    direct_rate = median([n / s for s in timings["in-process"]])
    producer_rate = median(producer_rates)
    busy = median(worker_busy)
    log(f"[ingest] through Celery  {celery_rate:>10,.0f} events/s (median of {rounds})")
    log(f"[ingest] in-process      {direct_rate:>10,.0f} events/s")
    log(f"[ingest] producer side   {producer_rate:>10,.0f} events/s (send() + flush() returned)")
    log(f"[ingest] worker CPU      {100 * busy:>9.0f}% of one core while the round ran")
    args.ingest_rate = celery_rate
    return [
        Result(
            "ingest via Celery (1 worker)",
            "events/s",
            celery_rate,
            direct_rate,
            "validate+apply in-process, batches of 1000",
            rounds,
            target=f">= {TARGET_EVENTS_PER_S:,}/s",
            passed=celery_rate >= TARGET_EVENTS_PER_S,
            note=(
                f"producer side {producer_rate:,.0f} events/s; worker busy {100 * busy:.0f}% of a "
                "core; ratio = what Celery costs against the same work in-process"
            ),
            extra={
                "events": n,
                "producer_batch": BATCH,
                "producer_rate": producer_rate,
                "worker_cpu_share": busy,
            },
        )
    ]
