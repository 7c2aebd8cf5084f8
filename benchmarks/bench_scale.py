"""scale: each stage's rate and CPU per event as processes and shards are added.

Three short measurements, each a stage drained from a full queue (start-up
not counted), with the CPU every process used while it drained (/proc):

- producer: `EventProducer` (batches of 1000, the app's own path) sends the
  events into the broker, in this process; CPU of this process and Redis.
- ingest: the standard interface's tasks (a plain Celery app's `send_task` of
  500 event dicts, `bench_standard.fill`) drained by 1, 2 and 4 `-P solo`
  ingest processes (2 is the README's layout: the standard interface's rate).
- flush: the buffer filled in this process (`EVENT_BUFFER_SHARDS` = 1, 2, 4,
  no reorder window, so every event is a row at once), then as many solo flush
  workers as shards drain it into a ClickHouse 26.x server (chDB's engine
  serving the native protocol: several flush processes cannot share an
  embedded chDB), `process_buffer` tasks sent as each shard empties.

From the per-event CPU of each stage (`costs`) a sizing model (`sizing`):
cores for eventbuffer's processes, Redis nodes (one core each) and
ClickHouse shards for 10k, 100k and 1M events/s.
"""

from __future__ import annotations

import argparse
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from benchmarks.bench_standard import TASK_EVENTS, fill
from benchmarks.support import (
    BenchStack,
    Result,
    bench_stack,
    cpu_seconds,
    flush_children,
    ingest_children,
    log,
    private_redis,
    redis_values,
    wait_applied,
)
from tests.support.native_server import ChdbServer
from tests.support.polling import wait_until
from tests.support.traffic import traffic
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.ingestion import ingest
from worker.names import FLUSH_QUEUE, TASK_PROCESS_BUFFER
from worker.producer import EventProducer
from worker.settings import Settings
from worker.sinks import open_sink
from worker.sinks.schema import create_table

INGEST_PROCESSES = (1, 2, 4)
FLUSH_SHARDS = (1, 2, 4)  # as many solo flush workers as shards
RATES = (10_000, 100_000, 1_000_000)
# Sizing headroom: a process planned at this share of its core (Redis, eventbuffer's
# processes) or of a ClickHouse server's cores (merges and queries take the rest).
UTILISATION = 0.5
CLICKHOUSE_CORES = 8  # cores of one ClickHouse server (shard) in the sizing model


@dataclass
class Drain:
    """One drain: events, seconds and CPU seconds used by each kind of process."""

    events: int
    seconds: float
    cpu: dict[str, float]

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    def us_per_event(self, kind: str) -> float:
        return self.cpu.get(kind, 0.0) / self.events * 1e6

    def cores(self, kind: str) -> float:
        return self.cpu.get(kind, 0.0) / self.seconds


class CpuMeter:
    """CPU seconds of named process groups between `start` and `stop`."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._before: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {k: sum(cpu_seconds(p) for p in pids) for k, pids in self.groups.items()}

    def start(self) -> None:
        self._before = self._now()

    def stop(self) -> dict[str, float]:
        after = self._now()
        return {k: after[k] - self._before[k] for k in after}


def ingest_drain(
    processes: int, tasks: list[list[dict[str, Any]]], stack: BenchStack, buffer: EventBuffer
) -> Drain:
    """The standard interface's tasks drained by `processes` solo ingest workers."""
    client = buffer.redis
    client.flushdb()
    n = sum(len(events) for events in tasks)
    markers = [
        buffer.keyspace.shard(0).batch(i) for i in fill(stack.settings.effective_broker_url, tasks)
    ]
    queue = buffer.keyspace.shard(0).queue
    layout = [["-P", "solo"]] * processes
    with ingest_children(f"scale{processes}-", layout, stack.env, stack.logs) as workers:
        redis_pid = stack.redis_pid
        meter = CpuMeter(
            {"ingest": [w.pid for w in workers], "redis": [redis_pid] if redis_pid else []}
        )
        wait_until(lambda: int(client.llen(queue)) > 0, 60, "the first row")
        started = time.perf_counter()
        meter.start()
        wait_applied(client, markers, workers, f"{processes} ingest processes", interval=0.005)
        seconds = time.perf_counter() - started
        return Drain(n, seconds, meter.stop())


def rotated(counts: tuple[int, ...], number: int) -> tuple[int, ...]:
    """Round `number`'s order of `counts`: each starts a round in turn."""
    shift = number % len(counts)
    return counts[shift:] + counts[:shift]


def ingest_rate(processes: int, events: int, rounds: int) -> list[Drain]:
    """`rounds` drains of `events` standard-interface events by `processes` ingest workers.

    With 2 processes: the standard interface's rate (the README's ingest layout),
    which the end-to-end benchmark's `--e2e-fraction` refers to.
    """
    return ingest_scale(events, rounds, (processes,))[processes]


def ingest_scale(
    events: int, rounds: int, counts: tuple[int, ...] = INGEST_PROCESSES
) -> dict[int, list[Drain]]:
    dicts, _ = traffic(events, seed=13)
    tasks = [dicts[i : i + TASK_EVENTS] for i in range(0, events, TASK_EVENTS)]
    drains: dict[int, list[Drain]] = {k: [] for k in counts}
    with bench_stack("scale") as stack:
        buffer = EventBuffer(stack.server.client(0), stack.settings)
        try:
            for number in range(rounds):
                for k in rotated(counts, number):
                    drain = ingest_drain(k, tasks, stack, buffer)
                    drains[k].append(drain)
                    log(
                        f"[scale] ingest x{k}: {drain.rate:,.0f} ev/s, ingest "
                        f"{drain.cores('ingest'):.2f} cores, Redis {drain.cores('redis'):.2f}"
                    )
        finally:
            buffer.redis.close()
    return drains


def producer_cost(events: int) -> Drain:
    """EventProducer sending `events` into the broker: this process's and Redis's CPU."""
    dicts, _ = traffic(events, seed=11)
    with private_redis("scale-producer") as server:
        settings = Settings.from_env(redis_values(server))
        app = create_app(settings)
        redis_pid = server.process.pid if server.process is not None else None
        meter = CpuMeter({"redis": [redis_pid] if redis_pid else []})
        try:
            producer = EventProducer(app, batch_size=1000, batch_ms=3_600_000, settings=settings)
            meter.start()
            cpu = time.process_time()
            started = time.perf_counter()
            for event in dicts:
                producer.send(event)
            producer.close(timeout=60)
            seconds = time.perf_counter() - started
            used = {"producer": time.process_time() - cpu, **meter.stop()}
        finally:
            app.close()
    return Drain(events, seconds, used)


def flush_drain(
    shards: int, dicts: list[dict[str, Any]], server: ChdbServer, stack: BenchStack
) -> Drain:
    """`shards` shards filled in this process, drained by as many solo flush workers."""
    stack = stack.with_values(
        CLICKHOUSE_URL=server.url,
        EVENT_BUFFER_SHARDS=str(shards),
        EVENT_BUFFER_REORDER_WINDOW_MS="0",
        EVENT_BUFFER_MAX_BATCHES_PER_FLUSH="1000",
    )
    settings = stack.settings
    client = stack.server.client(0)
    client.flushdb()
    stack.server.client(1).flushdb()
    sink = open_sink(server.url)
    try:
        sink.query("DROP TABLE IF EXISTS events")
        sink.query(create_table("events"))
    finally:
        sink.close()
    buffer = EventBuffer(client, settings)
    for start in range(0, len(dicts), 1000):
        ingest(buffer, dicts[start : start + 1000], str(uuid.uuid4()))
    queues = [shard.queue for shard in buffer.keyspace.all()]
    rows = sum(int(client.llen(q)) for q in queues)
    with flush_children(f"flush{shards}-", shards, stack.env, stack.logs) as workers:
        redis_pid = stack.redis_pid
        assert server.process is not None
        meter = CpuMeter(
            {
                "flush": [w.pid for w in workers],
                "redis": [redis_pid] if redis_pid else [],
                "clickhouse": [server.process.pid],
            }
        )
        app = create_app(settings)
        broker = stack.server.client(1)

        def landed() -> int:
            sink = open_sink(server.url)
            try:
                return int(sink.query("SELECT count() FROM events")[0][0])
            finally:
                sink.close()

        def drained() -> bool:
            if int(broker.llen(FLUSH_QUEUE)) == 0:  # keep every worker busy until it is empty
                for _ in range(shards):
                    app.send_task(TASK_PROCESS_BUFFER, queue=FLUSH_QUEUE)
            return sum(int(client.llen(q)) for q in queues) == 0 and landed() == rows

        try:
            meter.start()
            started = time.perf_counter()
            wait_until(
                drained,
                300,
                f"{shards} flush workers to drain {rows} rows",
                interval=0.02,
                alive=lambda: all(w.alive() for w in workers),
            )
            seconds = time.perf_counter() - started
            return Drain(rows, seconds, meter.stop())
        finally:
            app.close()
            broker.close()
            client.close()


def flush_scale(
    events: int, rounds: int, counts: tuple[int, ...] = FLUSH_SHARDS
) -> dict[int, list[Drain]]:
    dicts, _ = traffic(events, seed=19)
    drains: dict[int, list[Drain]] = {k: [] for k in counts}
    with bench_stack("scale-flush") as stack:
        server = ChdbServer(stack.tmp / "server")
        server.start()
        try:
            for number in range(rounds):
                for k in rotated(counts, number):
                    drain = flush_drain(k, dicts, server, stack)
                    drains[k].append(drain)
                    log(
                        f"[scale] flush x{k}: {drain.rate:,.0f} rows/s, flush "
                        f"{drain.cores('flush'):.2f} cores, Redis {drain.cores('redis'):.2f}, "
                        f"ClickHouse {drain.cores('clickhouse'):.2f}"
                    )
        finally:
            server.stop()
    return drains


def costs(producer: Drain, ingest_: Drain, flush: Drain) -> dict[str, float]:
    """CPU µs per event of each stage (Redis's share split by the stage that caused it)."""
    return {
        "producer": producer.us_per_event("producer"),
        "ingest": ingest_.us_per_event("ingest"),
        "flush": flush.us_per_event("flush"),
        "redis": sum(d.us_per_event("redis") for d in (producer, ingest_, flush)),
        "clickhouse": flush.us_per_event("clickhouse"),
    }


def sizing(us: dict[str, float], rates: tuple[int, ...] = RATES) -> list[dict[str, Any]]:
    """Cores, Redis nodes and ClickHouse shards for each rate, from CPU µs per event.

    Every process planned at `UTILISATION` of what it can do: eventbuffer's
    ingest and flush processes (one core each), Redis (single-threaded: one
    core per node, the buffer sharded across nodes), ClickHouse (servers of
    `CLICKHOUSE_CORES` cores, inserts on `UTILISATION` of them). The
    producer runs in the sending applications and is listed apart.
    """
    table = []
    for rate in rates:
        ingest_cores = rate * us["ingest"] / 1e6 / UTILISATION
        flush_cores = rate * us["flush"] / 1e6 / UTILISATION
        redis_cores = rate * us["redis"] / 1e6 / UTILISATION
        clickhouse_cores = rate * us["clickhouse"] / 1e6 / UTILISATION
        table.append(
            {
                "rate": rate,
                "producer_cores": round(rate * us["producer"] / 1e6, 2),
                "ingest_processes": max(1, math.ceil(ingest_cores)),
                "flush_processes": max(1, math.ceil(flush_cores)),
                "redis_nodes": max(1, math.ceil(redis_cores)),
                "clickhouse_shards": max(1, math.ceil(clickhouse_cores / CLICKHOUSE_CORES)),
                "eventbuffer_cores": math.ceil(ingest_cores + flush_cores),
            }
        )
    return table


def _best(drains: list[Drain]) -> Drain:
    """The median drain by rate."""
    ordered = sorted(drains, key=lambda d: d.rate)
    return ordered[len(ordered) // 2]


def _summary(kind: str, drains: dict[int, list[Drain]], kinds: tuple[str, ...]) -> list[str]:
    lines = []
    for k, runs in drains.items():
        d = _best(runs)
        busy = ", ".join(f"{x} {d.cores(x):.2f} cores {d.us_per_event(x):.1f} µs/ev" for x in kinds)
        lines.append(f"[scale] {kind} x{k}: {d.rate:,.0f} ev/s (median of {len(runs)}); {busy}")
    return lines


def run(args: argparse.Namespace) -> list[Result]:
    rounds = min(args.rounds, 2) if args.quick else args.rounds
    events = args.standard_events
    log(f"[scale] producer: {events:,} events")
    producer = producer_cost(events)
    log(
        f"[scale] producer: {producer.rate:,.0f} ev/s, "
        f"{producer.us_per_event('producer'):.1f} µs/ev, "
        f"Redis {producer.us_per_event('redis'):.1f} µs/ev"
    )
    log(f"[scale] ingest processes {INGEST_PROCESSES}: {events:,} events, {rounds} rounds")
    ingests = ingest_scale(events, rounds)
    flush_events = args.flush_rows
    log(f"[scale] shards = flush workers {FLUSH_SHARDS}: {flush_events:,} events, {rounds} rounds")
    flushes = flush_scale(flush_events, rounds)
    for line in _summary("ingest", ingests, ("ingest", "redis")):
        log(line)
    for line in _summary("flush", flushes, ("flush", "redis", "clickhouse")):
        log(line)
    standard = _best(ingests[2]) if 2 in ingests else _best(next(iter(ingests.values())))
    us = costs(producer, standard, _best(flushes[min(flushes)]))
    log("[scale] CPU µs per event: " + ", ".join(f"{k} {v:.1f}" for k, v in us.items()))
    table = sizing(us)
    for row in table:
        log(f"[scale] sizing {row}")

    def rows(kind: str, drains: dict[int, list[Drain]], unit: str, what: str) -> list[Result]:
        base = _best(drains[min(drains)])
        out = []
        for k, runs in drains.items():
            d = _best(runs)
            out.append(
                Result(
                    f"scale: {kind} x{k} vs x{min(drains)}",
                    unit,
                    d.rate,
                    base.rate,
                    f"{what} x{min(drains)}",
                    len(runs),
                    note=", ".join(
                        f"{x} {d.cores(x):.2f} cores ({d.us_per_event(x):.1f} µs/ev)" for x in d.cpu
                    ),
                    extra={"cpu_s": d.cpu, "seconds": d.seconds, "events": d.events},
                )
            )
        return out

    results = rows("ingest processes", ingests, "events/s", "ingest processes")
    results += rows("shards = flush workers (server)", flushes, "rows/s", "shards")
    results.append(
        Result(
            "scale: CPU µs per event by stage",
            "µs",
            sum(v for k, v in us.items() if k != "producer"),
            None,
            "-",
            rounds,
            better="lower",
            note=", ".join(f"{k} {v:.1f}" for k, v in us.items()),
            extra={"us_per_event": us, "sizing": table, "producer_rate": producer.rate},
        )
    )
    return results
