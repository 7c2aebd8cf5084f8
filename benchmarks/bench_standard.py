"""standard: events/s through the standard Celery interface, drained from a full queue.

A plain Celery app that does not import eventbuffer fills the Redis broker's
`ingest` queue with `send_task("eventbuffer.ingest_events", args=[[...]])`
tasks of `TASK_EVENTS` event dicts (the realistic mix: ~60% screen_views
over thousands of interleaved sessions). Then the workers start, and the
clock runs from the first row in the buffer until every row is there
(their start-up is not counted). Layouts, in the same run, alternating:

- `eventbuffer`: the layout `eventbuffer run` and compose.yaml use
  (`worker.cli.run.INGEST_LAYOUT`);
- `prefork`: `celery -A worker worker -Q ingest` with Celery's defaults;
- `eventbuffer w0`: the first layout without a reorder window
  (`EVENT_BUFFER_REORDER_WINDOW_MS=0`): what holding views costs. With the
  window, the round also times releasing what is still held at its end.

against two baselines on the same events: the worker's own function in
this process (`worker.ingestion.ingest`, no Celery), and raw pipelined RPUSH of
the events' rows (the ceiling of getting these bytes into Redis).

Beside the rates, the CPU per event: the workers' (from /proc, while they
drain) and, in this process on the same bodies, its split by stage (`split`):
body decode (the worker's decoder, twice per message as Celery runs it: the
strategy's check, then the trace), validation (`parse_events`), planning
(the apply's plan of the writes) and Redis (the rest of `EventBuffer.apply`:
packing, sending, reading the replies; client side). The split runs with
the garbage collector tuned as the workers tune it (`worker/celery.py`:
young threshold GC_YOUNG_THRESHOLD, start-up objects frozen): with
Python's default threshold the same code shows ~1.3 µs more validation per
event, which no worker pays.

The producer client's path (`EventProducer`, JSON-text batches) is the
`ingest` benchmark.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery

from benchmarks.support import (
    Result,
    alternate,
    bench_stack,
    cpu_seconds,
    ingest_children,
    log,
    median,
    wait_applied,
)
from tests.support.polling import wait_until
from tests.support.traffic import mix, traffic
from worker import bodies
from worker.apply_plan import plan_shard
from worker.buffer import EventBuffer
from worker.celery import GC_YOUNG_THRESHOLD
from worker.cli.run import INGEST_LAYOUT
from worker.clock import SYSTEM_CLOCK
from worker.events import Limits, encode_event, parse_event, parse_events
from worker.ingestion import derived_ids, ingest
from worker.reorder import release_due

TASK_EVENTS = 500


class FixedClock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def now_ms(self) -> int:
        return self.ms


TARGET_EVENTS_PER_S = 50_000
# The standard interface against raw pipelined RPUSH of the same rows (issue 22).
TARGET_RAW_RATIO = 0.3


def fill(broker_url: str, tasks: list[list[dict[str, Any]]]) -> list[str]:
    """The queue as a foreign app fills it: stock kombu, JSON, no eventbuffer import.

    Returns the task ids (each task's batch id).
    """
    ids = [str(uuid.uuid4()) for _ in tasks]
    app = Celery("foreign-sender", broker=broker_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)
    try:
        with app.producer_or_acquire() as producer:
            for task_id, events in zip(ids, tasks, strict=True):
                app.send_task(
                    "eventbuffer.ingest_events",
                    args=[events],
                    queue="ingest",
                    task_id=task_id,
                    producer=producer,
                )
    finally:
        app.close()
    return ids


def split(
    buffer: EventBuffer, tasks: list[list[dict[str, Any]]], rounds: int = 3
) -> dict[str, float]:
    """CPU µs per event of each stage of the worker's path, in this process (median),
    with the garbage collector tuned as in the workers."""
    thresholds = gc.get_threshold()
    gc.set_threshold(max(GC_YOUNG_THRESHOLD, thresholds[0]), *thresholds[1:])
    gc.freeze()
    try:
        return _split(buffer, tasks, rounds)
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def _split(buffer: EventBuffer, tasks: list[list[dict[str, Any]]], rounds: int) -> dict[str, float]:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    messages = [json.dumps([[events], {}, embed]).encode() for events in tasks]
    n = sum(len(events) for events in tasks)
    settings = buffer.settings
    limits = Limits.from_settings(settings, buffer.clock)
    clock = time.thread_time
    stages: dict[str, list[float]] = {}
    for _ in range(rounds):
        buffer.redis.flushdb()
        spent = dict.fromkeys(("decode", "validation", "planning", "redis"), 0.0)
        for body in messages:
            started = clock()
            bodies.decode(body)  # the strategy's check (message.payload)
            args, _, _ = bodies.decode(body)  # the trace's
            decoded = clock()
            batch_id = str(uuid.uuid4())
            array = bodies.event_array(args[0])
            assert array is not None
            results = parse_events(array, limits, derived_ids(batch_id))
            assert results is not None
            events = [event for event in results if not isinstance(event, Exception)]
            validated = clock()
            keys = buffer.keyspace.shard(0)
            now = buffer.clock.now_ms()
            hold = now + settings.reorder_window_ms if settings.reorder_window_ms else 0
            rows = [encode_event(event) for event in events]
            plan_shard(keys, keys.batch(batch_id), events, rows, hold)
            planned = clock()
            buffer.apply(events, batch_id=batch_id)  # plans again, then writes
            applied = clock()
            spent["decode"] += decoded - started
            spent["validation"] += validated - decoded
            spent["planning"] += planned - validated
            spent["redis"] += max(0.0, (applied - planned) - (planned - validated))
        for stage, seconds in spent.items():
            stages.setdefault(stage, []).append(seconds / n * 1e6)
    return {stage: median(values) for stage, values in stages.items()}


def run(args: argparse.Namespace) -> list[Result]:
    n = args.standard_events
    rounds = args.rounds
    dicts, _ = traffic(n, seed=13)
    tasks = [dicts[i : i + TASK_EVENTS] for i in range(0, n, TASK_EVENTS)]
    rows = [encode_event(parse_event(event)) for event in dicts]
    log(f"[standard] {mix(dicts)}; {len(tasks)} tasks of {TASK_EVENTS}; {rounds} rounds")
    cpu: dict[str, list[float]] = {}
    per_event: dict[str, list[float]] = {}  # workers' CPU µs per event

    with bench_stack("standard") as stack:
        settings = stack.settings
        broker_url = settings.effective_broker_url
        client = stack.server.client(0)
        broker = stack.server.client(1)
        buffer = EventBuffer(client, settings)
        queue = buffer.keyspace.shard(0).queue

        def drained_by(
            layout: Sequence[Sequence[str]], name: str, label: str, window: bool = True
        ) -> Callable[[], float]:
            env = stack.env if window else {**stack.env, "EVENT_BUFFER_REORDER_WINDOW_MS": "0"}

            def round_() -> float:
                client.flushdb()
                markers = [buffer.keyspace.shard(0).batch(i) for i in fill(broker_url, tasks)]
                with ingest_children(name, layout, env, stack.logs) as workers:
                    wait_until(lambda: int(client.llen(queue)) > 0, 60, "the first row")
                    started = time.perf_counter()
                    before = sum(cpu_seconds(w.pid) for w in workers)
                    wait_applied(client, markers, workers, name, interval=0.002)
                    used = sum(cpu_seconds(w.pid) for w in workers) - before
                    if window:  # what the workers left held, released as a flush would
                        later = FixedClock(SYSTEM_CLOCK.now_ms() + settings.reorder_window_ms)
                        release_due(buffer.scripts, buffer.keyspace.shard(0), settings, later)
                    seconds = time.perf_counter() - started
                    cpu.setdefault(label, []).append(used / seconds)
                    per_event.setdefault(label, []).append(used / n * 1e6)
                    if int(broker.llen("ingest")):
                        log(f"[standard] WARNING: {name} left tasks in the queue")
                    return seconds

            return round_

        def in_process() -> float:
            client.flushdb()
            started = time.perf_counter()
            for events in tasks:
                ingest(buffer, events, str(uuid.uuid4()))
            later = FixedClock(SYSTEM_CLOCK.now_ms() + settings.reorder_window_ms)
            release_due(buffer.scripts, buffer.keyspace.shard(0), settings, later)
            return time.perf_counter() - started

        def raw_rpush() -> float:
            client.flushdb()
            started = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            for start in range(0, len(rows), TASK_EVENTS):
                pipe.rpush(queue, *rows[start : start + TASK_EVENTS])
                if len(pipe) >= 20:
                    pipe.execute()
            pipe.execute()
            return time.perf_counter() - started

        runs = {
            "eventbuffer": drained_by(INGEST_LAYOUT, "eb", "eventbuffer"),
            "prefork": drained_by([[]], "prefork", "prefork"),
            "eventbuffer w0": drained_by(INGEST_LAYOUT, "eb0", "eventbuffer w0", window=False),
            "in-process": in_process,
            "raw RPUSH": raw_rpush,
        }
        try:
            timings = alternate(rounds, runs)
            stages = split(buffer, tasks)
        finally:
            client.close()
            broker.close()

    rate = {name: median([n / s for s in seconds]) for name, seconds in timings.items()}
    for name, value in rate.items():
        busy = (
            f", workers' CPU {median(cpu[name]):.2f} cores, {median(per_event[name]):.1f} µs/event"
            if name in cpu
            else ""
        )
        log(f"[standard] {name:<12} {value:>10,.0f} events/s{busy}")
    shown = ", ".join(f"{stage} {us:.2f}" for stage, us in stages.items())
    log(f"[standard] CPU µs per event in-process: {shown} (total {sum(stages.values()):.2f})")
    args.standard_rate = rate["eventbuffer"]  # for the ingest benchmark's comparison
    raw_ratio = rate["eventbuffer"] / rate["raw RPUSH"]
    layout = " + ".join(" ".join(argv) for argv in INGEST_LAYOUT)
    return [
        Result(
            "standard interface: send_task of 500 dicts, drained",
            "events/s",
            rate["eventbuffer"],
            rate["prefork"],
            "celery -A worker worker -Q ingest (defaults)",
            rounds,
            target=f">= {TARGET_EVENTS_PER_S:,}/s",
            passed=rate["eventbuffer"] >= TARGET_EVENTS_PER_S,
            note=f"layout: {layout}; in-process {rate['in-process']:,.0f}/s, "
            f"raw RPUSH {rate['raw RPUSH']:,.0f}/s",
            extra={
                "events": n,
                "task_events": TASK_EVENTS,
                "rates": rate,
                "worker_cpu_us_per_event": {k: median(v) for k, v in per_event.items()},
                "cpu_split_us_per_event": stages,
            },
        ),
        Result(
            "standard interface with the reorder window vs without",
            "events/s",
            rate["eventbuffer"],
            rate["eventbuffer w0"],
            "same layout, EVENT_BUFFER_REORDER_WINDOW_MS=0",
            rounds,
            note=f"window {settings.reorder_window_ms} ms (what holding views costs)",
        ),
        Result(
            "standard interface vs in-process ingest",
            "events/s",
            rate["eventbuffer"],
            rate["in-process"],
            "worker.ingestion.ingest in this process, same tasks",
            rounds,
            note="what Celery and the broker cost",
        ),
        Result(
            "standard interface vs raw RPUSH",
            "events/s",
            rate["eventbuffer"],
            rate["raw RPUSH"],
            "pipelined RPUSH of the same rows",
            rounds,
            target=f">= {TARGET_RAW_RATIO}x",
            passed=raw_ratio >= TARGET_RAW_RATIO,
            note=f"the ceiling: no validation, no semantics; CPU µs/event in-process: {shown}",
        ),
    ]
