"""memory: bytes of Redis per buffered event, to size `maxmemory` for a ClickHouse outage.

While ClickHouse is down nothing leaves Redis: every accepted event stays
in the buffer (or, before an ingest worker applies it, in the broker). Each
scenario fills a fresh private Redis (noeviction, no maxmemory) with events
of the benchmarks' realistic stream (tests/support/traffic.py: 60 %
screen_view, 35 % custom events with nested properties, 5 % session_end,
400 sessions open at once, ids as a producer assigns them) and reads
`INFO memory`'s `used_memory` before and after; the figure is the
difference divided by the events:

- `buffer`: applied as ingest applies a task (`worker.ingestion.ingest`,
  batches of 200, one batch marker each) with no reorder window: queued rows,
  each open session's last view, the visitors sets, the markers;
- `buffer, window`: the same with the reorder window at its default
  (`EVENT_BUFFER_REORDER_WINDOW_MS`) and a clock that does not move, so
  every screen_view and session_end stays held (the most the window holds);
- `broker, send_task`: the same events as queued, unapplied tasks of 200
  events (`send_task("eventbuffer.ingest_events")` of a plain Celery app,
  kombu's Redis transport): what a backlog in the broker costs;
- `broker, EventProducer`: the producer client's tasks (100 events each).

The baseline column is the events' mean JSON row size (as the buffer stores
it), so the ratio is Redis' overhead over the bare bytes. `baseline_bytes`
in `extra` is a fresh Redis with eventbuffer's scripts loaded.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis as redis_lib
from celery import Celery

from benchmarks.support import Result, log, private_redis
from tests.support.clock import ManualClock
from tests.support.traffic import RealisticTraffic, mix
from worker.buffer import EventBuffer
from worker.events import encode_event, parse_event
from worker.ingestion import ingest
from worker.names import INGEST_QUEUE, TASK_INGEST_EVENTS
from worker.producer import EventProducer
from worker.settings import Settings

TASK_EVENTS = 200  # events per ingest task (the producer; EventProducer sends 100)


def used_memory(client: redis_lib.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def stream(events: int, seed: int = 11) -> list[dict[str, Any]]:
    traffic = RealisticTraffic(seed)
    return [{**event, "id": str(uuid.uuid4())} for event in traffic.events(events)]


def row_bytes(events: list[dict[str, Any]]) -> float:
    return sum(len(encode_event(parse_event(e))) for e in events) / len(events)


def measure(fill: Callable[[str, redis_lib.Redis], None], events: int) -> tuple[float, int]:
    """(bytes per event, the fresh server's used_memory) for `fill(url, client)`."""
    with private_redis("memory") as server:
        client = server.client()
        try:
            client.ping()
            fresh = used_memory(client)
            fill(server.url, client)
            time.sleep(0.2)  # let lazy frees and the clients' buffers settle
            return (used_memory(client) - fresh) / events, fresh
        finally:
            client.close()


def apply_all(events: list[dict[str, Any]], window_ms: int) -> Callable[[str, Any], None]:
    def fill(url: str, client: redis_lib.Redis) -> None:
        settings = Settings.from_env(
            {"REDIS_URL": url, "EVENT_BUFFER_REORDER_WINDOW_MS": str(window_ms)}
        )
        clock = ManualClock()  # stands still: held events stay held
        clock.set(int(time.time() * 1000))
        buffer = EventBuffer(client, settings, clock)
        for n in range(0, len(events), TASK_EVENTS):
            ingest(buffer, events[n : n + TASK_EVENTS], f"memory-{n}")

    return fill


def send_tasks(events: list[dict[str, Any]]) -> Callable[[str, Any], None]:
    def fill(url: str, client: redis_lib.Redis) -> None:
        app = Celery("memory-bench", broker=url, set_as_current=False)
        app.conf.task_serializer = "json"
        try:
            with app.producer_or_acquire() as producer:
                for n in range(0, len(events), TASK_EVENTS):
                    app.send_task(
                        TASK_INGEST_EVENTS,
                        args=[events[n : n + TASK_EVENTS]],
                        queue=INGEST_QUEUE,
                        producer=producer,
                    )
        finally:
            app.close()

    return fill


def produce(events: list[dict[str, Any]]) -> Callable[[str, Any], None]:
    def fill(url: str, client: redis_lib.Redis) -> None:
        settings = Settings.from_env({"REDIS_URL": url})
        with EventProducer(settings=settings) as producer:
            for event in events:
                producer.send(event)
            producer.flush(60)

    return fill


def run(args: argparse.Namespace) -> list[Result]:
    count = 20_000 if args.quick else 100_000
    events = stream(count)
    log(f"memory: {mix(events)}")
    row = row_bytes(events)
    window = Settings().reorder_window_ms
    scenarios: list[tuple[str, Callable[[str, Any], None], str]] = [
        ("buffer", apply_all(events, 0), "applied, no reorder window"),
        (
            "buffer, window",
            apply_all(events, window),
            f"applied, reorder window {window} ms, every session event held",
        ),
        ("broker, send_task", send_tasks(events), f"queued tasks of {TASK_EVENTS} events"),
        ("broker, EventProducer", produce(events), "queued EventProducer tasks (100 events)"),
    ]
    results = []
    for name, fill, what in scenarios:
        per_event, fresh = measure(fill, len(events))
        log(f"  {name}: {per_event:,.0f} bytes/event ({what}); fresh Redis {fresh:,} bytes")
        results.append(
            Result(
                name=f"memory: {name}",
                unit="bytes/event",
                eventbuffer=per_event,
                baseline=row,
                baseline_name="mean JSON row",
                rounds=1,
                better="lower",
                note=f"{what}; {len(events):,} events",
                extra={"events": len(events), "baseline_bytes": fresh, "row_bytes": row},
            )
        )
    return results
