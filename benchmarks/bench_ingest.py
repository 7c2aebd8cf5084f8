"""ingest: events/s from the producer client's tasks, drained from a full queue.

`EventProducer` (batches of `BATCH` events: each task's argument is the JSON
array of the batch's validated rows) fills the Redis broker's `ingest`
queue; then the ingest workers start, in the layout `eventbuffer run` uses
(`worker.cli.run.INGEST_LAYOUT`), and the clock runs from the first row in
the buffer until every task's batch marker is set (start-up not counted).
The producer's own rate (validation and publishing, in this process) is
reported beside it.

Baseline: the same events applied in this process by the worker's own
function (`worker.ingestion.ingest`, batches of `BATCH`), one process: the
ratio shows what Celery costs and what a second process gains.
"""

from __future__ import annotations

import argparse
import time
import uuid

from benchmarks.support import (
    CeleryChild,
    Result,
    alternate,
    bench_stack,
    cpu_seconds,
    log,
    median,
)
from tests.support.polling import wait_until
from tests.support.traffic import mix, traffic
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.cli.run import INGEST_LAYOUT
from worker.ingestion import ingest
from worker.producer import EventProducer

BATCH = 1000
TARGET_EVENTS_PER_S = 80_000
# The producer client's path against the standard interface's (issue 22).
TARGET_STANDARD_RATIO = 1.5


def run(args: argparse.Namespace) -> list[Result]:
    n = args.ingest_events
    rounds = args.rounds
    dicts, _ = traffic(n, seed=11)
    log(f"[ingest] {mix(dicts)}; producer batch {BATCH}; {rounds} rounds")
    producer_rates: list[float] = []
    busy: list[float] = []

    # No flush worker runs here: bench_stack keeps back-pressure from queueing flush tasks.
    with bench_stack("ingest") as stack:
        server, settings, env = stack.server, stack.settings, stack.env
        client = server.client(0)
        buffer = EventBuffer(client, settings)
        queue = buffer.keyspace.shard(0).queue
        app = create_app(settings)
        logs = stack.logs

        def fill() -> None:
            """Send every event through the producer (timed apart: the producer's rate)."""
            producer = EventProducer(app, batch_size=BATCH, batch_ms=3_600_000, settings=settings)
            started = time.perf_counter()
            for event in dicts:
                producer.send(event)
            producer.close(timeout=60)
            producer_rates.append(n / (time.perf_counter() - started))

        def through_celery() -> float:
            client.flushdb()
            server.client(1).flushdb()
            fill()
            tasks = (n + BATCH - 1) // BATCH
            common = ["worker", "-Q", "ingest", "--without-mingle", "--without-gossip"]
            workers = [
                CeleryChild(f"ingest{i}", [*common, *argv, "-n", f"ingest{i}@%h"], env, logs)
                for i, argv in enumerate(INGEST_LAYOUT)
            ]
            marker_pattern = f"{buffer.keyspace.shard(0).tag}:batch:*"
            try:
                wait_until(lambda: int(client.llen(queue)) > 0, 60, "the first row")
                started = time.perf_counter()
                before = sum(cpu_seconds(w.pid) for w in workers)
                wait_until(
                    lambda: len(list(client.scan_iter(match=marker_pattern, count=1000))) >= tasks,
                    300,
                    "the workers to apply every batch",
                    interval=0.01,
                    alive=lambda: all(w.alive() for w in workers),
                )
                seconds = time.perf_counter() - started
                busy.append((sum(cpu_seconds(w.pid) for w in workers) - before) / seconds)
                return seconds
            finally:
                for worker in workers:
                    worker.stop()

        def in_process() -> float:
            client.flushdb()
            started = time.perf_counter()
            for start in range(0, n, BATCH):
                ingest(buffer, dicts[start : start + BATCH], str(uuid.uuid4()))
            return time.perf_counter() - started

        try:
            timings = alternate(rounds, {"celery": through_celery, "in-process": in_process})
        finally:
            app.close()
            client.close()

    celery_rate = median([n / s for s in timings["celery"]])
    direct_rate = median([n / s for s in timings["in-process"]])
    producer_rate = median(producer_rates)
    layout = " + ".join(" ".join(argv) for argv in INGEST_LAYOUT)
    log(f"[ingest] through Celery  {celery_rate:>10,.0f} events/s (median of {rounds})")
    log(f"[ingest] in-process      {direct_rate:>10,.0f} events/s")
    log(f"[ingest] producer side   {producer_rate:>10,.0f} events/s (send() until close())")
    log(f"[ingest] workers' CPU    {median(busy):>10.2f} cores while draining ({layout})")
    args.stage_rates.update(producer=producer_rate, ingest=celery_rate)
    standard = getattr(args, "standard_rate", None)  # the standard benchmark, in this run
    versus = (
        [
            Result(
                "ingest: producer client vs standard interface",
                "events/s",
                celery_rate,
                standard,
                "send_task of 500 dicts, drained (the standard benchmark)",
                rounds,
                target=f">= {TARGET_STANDARD_RATIO}x",
                passed=celery_rate >= TARGET_STANDARD_RATIO * standard,
                note="both drained by the same layout, in this run",
            )
        ]
        if standard
        else []
    )
    return [
        Result(
            "ingest: producer client's tasks, drained",
            "events/s",
            celery_rate,
            direct_rate,
            f"validate+apply in-process, batches of {BATCH}",
            rounds,
            target=f">= {TARGET_EVENTS_PER_S:,}/s",
            passed=celery_rate >= TARGET_EVENTS_PER_S,
            note=(
                f"layout {layout}; the producer itself sends {producer_rate:,.0f} events/s "
                "(validation and publishing in one thread)"
            ),
            extra={"events": n, "producer_batch": BATCH, "producer_rate": producer_rate},
        ),
        *versus,
    ]
