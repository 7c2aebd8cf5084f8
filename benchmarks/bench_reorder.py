"""reorder: how late a session's events reach the buffer in the README's ingest layout.

The measurement behind `EVENT_BUFFER_REORDER_WINDOW_MS`'s default. The
workers run with a window far longer than the run (nothing is released), so
every session event stays held with its arrival time (its deadline minus the
window). A plain Celery app (no eventbuffer import) sends one stream of
interleaved sessions, each session's events in created_at order, as
`send_task("eventbuffer.ingest_events")` micro-batches:

- `live`: paced at `RATE` events/s while the workers run (a producer's
  micro-batches, `TASK_EVENTS` each);
- `backlog`: the whole stream queued first, then the workers start (each
  process prefetches tasks, so neighbouring tasks are applied furthest apart);
- `swapped`: live, with neighbouring tasks swapped and each task's events
  split between two producers (several API servers behind a load balancer);
- `dense`: swapped, with only 10 sessions open at once, so a session's
  consecutive events sit in neighbouring tasks;
- `loaded`: dense, with two CPU-bound processes competing for the two
  cores (a busy host: the workers are descheduled for whole time slices).

For each held event x, its lateness is how long after the earliest arrival
of any event of its session created after it x arrived (0 when none
arrived before it). With a window W, x takes its place exactly when its
lateness is below W. Reported: the share of events that arrived out of
order at all, the largest lateness, and how many would be late per window.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery

from benchmarks.support import CeleryChild, Result, bench_stack, log
from tests.support.polling import wait_until
from tests.support.traffic import RealisticTraffic
from worker.cli.run import INGEST_LAYOUT
from worker.keys import Keyspace
from worker.reorder import held_packs, held_times

TASK_EVENTS = 20
RATE = 5_000  # events/s offered in the live scenarios (about a quarter of one process' rate)
HUGE_WINDOW_MS = 3_600_000
WINDOWS = (0, 25, 50, 100, 250, 500, 1000, 2000)


def lateness(held: Sequence[tuple[str, int, int]]) -> list[int]:
    """Each event's lateness (ms) from (session, created ms, arrival ms) of every event."""
    by_session: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for session, created, arrival in held:
        by_session[session].append((created, arrival))
    out: list[int] = []
    for events in by_session.values():
        events.sort()
        earliest_later = None  # earliest arrival among events created later than this one
        for _created, arrival in reversed(events):
            out.append(max(0, arrival - earliest_later) if earliest_later is not None else 0)
            earliest_later = arrival if earliest_later is None else min(earliest_later, arrival)
    return out


def read_held(client: Any, keyspace: Keyspace) -> list[tuple[str, int, int]]:
    """(session, created ms, arrival ms) of every held event."""
    found = []
    for shard in keyspace.all():
        for session, pack in held_packs(client, shard).items():
            for created, deadline in held_times(pack):
                found.append((session, created, deadline - HUGE_WINDOW_MS))
    return found


def stream(events: int, seed: int, concurrent: int = 200) -> list[list[dict[str, Any]]]:
    traffic = RealisticTraffic(seed, concurrent=concurrent)
    dicts = traffic.events(events) + [e for e, _ in traffic.end_all()]
    dicts = [{**d, "id": str(uuid.uuid4())} for d in dicts]
    return [dicts[n : n + TASK_EVENTS] for n in range(0, len(dicts), TASK_EVENTS)]


def swapped_two_producers(tasks: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    tasks = list(tasks)
    for n in range(0, len(tasks) - 1, 2):
        tasks[n], tasks[n + 1] = tasks[n + 1], tasks[n]
    return [half for task in tasks for half in (task[0::2], task[1::2])]


def send(app: Celery, tasks: list[list[dict[str, Any]]], rate: float | None) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in tasks]
    started = time.perf_counter()
    sent = 0
    with app.producer_or_acquire() as producer:
        for task_id, events in zip(ids, tasks, strict=True):
            if rate is not None:
                ahead = started + sent / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            app.send_task(
                "eventbuffer.ingest_events",
                args=[events],
                queue="ingest",
                task_id=task_id,
                producer=producer,
            )
            sent += len(events)
    return ids


def run(args: argparse.Namespace) -> list[Result]:
    events = 10_000 if args.quick else 30_000
    results = []
    # No flush worker here (bench_stack keeps back-pressure off).
    with bench_stack("reorder", EVENT_BUFFER_REORDER_WINDOW_MS=str(HUGE_WINDOW_MS)) as stack:
        server, settings = stack.server, stack.settings
        keyspace = Keyspace(settings.key_prefix, settings.shards)
        env = stack.env
        client = server.client(0)
        logs = stack.logs
        app = Celery("foreign-sender", broker=settings.effective_broker_url, set_as_current=False)
        app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)

        def workers() -> list[CeleryChild]:
            started = []
            for n, argv in enumerate(INGEST_LAYOUT):
                args_ = ["worker", "-Q", "ingest", *argv, "-n", f"reorder{n}@%h"]
                args_ += ["--without-mingle", "--without-gossip", "--loglevel=INFO"]
                child = CeleryChild(f"reorder{n}", args_, env, logs)
                child.wait_ready(" ready.")
                started.append(child)
            return started

        scenarios: dict[str, Callable[[list[list[dict[str, Any]]]], list[str]]] = {
            "live": lambda tasks: send(app, tasks, RATE),
            "swapped": lambda tasks: send(app, swapped_two_producers(tasks), RATE),
            "dense": lambda tasks: send(app, swapped_two_producers(tasks), RATE),
            "loaded": lambda tasks: send(app, swapped_two_producers(tasks), RATE),
        }
        burners: list[subprocess.Popen[bytes]] = []
        try:
            for seed, name in enumerate(["live", "backlog", "swapped", "dense", "loaded"]):
                client.flushall()
                tasks = stream(events, seed, 10 if name in ("dense", "loaded") else 200)
                if name == "loaded":
                    burners = [
                        subprocess.Popen([sys.executable, "-c", "while True: pass"])
                        for _ in range(2)
                    ]
                if name == "backlog":
                    ids = send(app, tasks, None)
                    running = workers()
                else:
                    running = workers()
                    ids = scenarios[name](tasks)
                markers = [keyspace.shard(0).batch(i) for i in ids]

                def applied(markers: list[str] = markers) -> bool:
                    return int(client.exists(*markers)) == len(markers)

                try:
                    wait_until(
                        applied,
                        300,
                        f"[reorder] {name}: every task applied",
                        interval=0.05,
                    )
                finally:
                    for child in running:
                        child.stop()
                    for burner in burners:
                        burner.kill()
                        burner.wait()
                    burners = []
                late = lateness(read_held(client, keyspace))
                late.sort()
                out_of_order = sum(1 for x in late if x > 0)
                per_window = {w: sum(1 for x in late if x >= max(w, 1)) for w in WINDOWS}
                log(
                    f"[reorder] {name}: {len(late):,} session events, "
                    f"{out_of_order:,} out of order; lateness p99 "
                    f"{late[int(len(late) * 0.99)]} ms, p99.9 {late[int(len(late) * 0.999)]} ms, "
                    f"max {late[-1]} ms; late at "
                    + ", ".join(f"{w} ms: {n}" for w, n in per_window.items())
                )
                results.append(
                    Result(
                        f"reorder {name}: largest lateness",
                        "ms",
                        float(late[-1]),
                        None,
                        "",
                        1,
                        better="lower",
                        note=(
                            f"{out_of_order:,} of {len(late):,} session events out of order; "
                            "late per window: "
                            + ", ".join(f"{w} ms {n}" for w, n in per_window.items())
                        ),
                        extra={"late_per_window": per_window, "events": len(late)},
                    )
                )
        finally:
            app.close()
            client.close()
    return results
