"""How late the flush lock's watchdog extends the lock while real flushes run.

    python -m benchmarks.watchdog [--seconds 120] [--burners 2] [--lock-ttl 1]

What `EVENT_BUFFER_LOCK_TTL_S` must cover: a live holder's lock is taken
over once it has gone two watchdog intervals (two thirds of its TTL)
without an extension, so the watchdog may be up to one interval (a third
of the TTL) late before a live flush loses its lock. This measures that
lateness on this machine: the production `Flusher.process_buffer` drains
40,000 realistic events at a time into embedded ClickHouse (chDB) under a
short lock TTL (many extensions per second), while `--burners` processes
spin on the CPU beside it (on top of whatever else the machine runs).

Every extension of the real watchdog is timed (redis-py's `Lock.do_extend`,
wrapped): lateness is the gap since the lock's previous extension (or its
acquisition) minus the watchdog's interval; the round trip is the time of
the extension call itself. Nothing asserts; it prints the percentiles. It
starts its own Redis and chDB directory and removes them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis as redis_lib
from redis.lock import Lock

from benchmarks.support import (
    private_redis,
)
from tests.support.traffic import traffic
from worker.buffer import EventBuffer
from worker.events import parse_event
from worker.flusher import Flusher
from worker.lock import WATCHDOG_INTERVALS
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink

EVENTS = 40_000


class Timings:
    """Extension times of every lock, taken around redis-py's own calls."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last: dict[str, float] = {}
        self.lateness: list[float] = []
        self.round_trips: list[float] = []

    def install(self) -> None:
        acquire, extend = Lock.do_acquire, Lock.do_extend
        timings = self

        def do_acquire(lock: Lock, token: Any) -> bool:
            taken = acquire(lock, token)
            if taken:
                timings.last[str(lock.name)] = time.monotonic()
            return bool(taken)

        def do_extend(lock: Lock, additional_time: Any, replace_ttl: bool) -> Any:
            woke = time.monotonic()
            reply = extend(lock, additional_time, replace_ttl)
            done = time.monotonic()
            name = str(lock.name)
            timings.lateness.append(woke - timings.last[name] - timings.interval_s)
            timings.round_trips.append(done - woke)
            timings.last[name] = done
            return reply

        Lock.do_acquire = do_acquire  # type: ignore[method-assign]
        Lock.do_extend = do_extend  # type: ignore[method-assign]


def _burn() -> None:
    while True:
        pass


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.watchdog", description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to flush")
    parser.add_argument("--burners", type=int, default=2, help="CPU-spinning processes beside it")
    parser.add_argument("--lock-ttl", type=int, default=1, help="lock TTL, s (interval: a third)")
    args = parser.parse_args(argv)

    timings = Timings(args.lock_ttl / WATCHDOG_INTERVALS)
    timings.install()
    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(args.burners)]
    for burner in burners:
        burner.start()
    try:
        with private_redis("watchdog") as server, tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/clickhouse"
            settings = Settings.from_env(
                {
                    "REDIS_URL": server.db_url(0),
                    "CLICKHOUSE_URL": f"chdb://{path}",
                    "EVENT_BUFFER_LOCK_TTL_S": str(args.lock_ttl),
                    "EVENT_BUFFER_MAX_BATCHES_PER_FLUSH": "1000",
                }
            )
            sink = ChdbSink(path, settings.clickhouse_table)
            sink.migrate()
            sink.close()
            client = redis_lib.Redis.from_url(settings.redis_url)
            buffer = EventBuffer(client, settings)
            flusher = Flusher(client, settings, lambda: ChdbSink(path, settings.clickhouse_table))
            events, _ = traffic(EVENTS)
            started = time.monotonic()
            held = 0.0
            rows = 0
            while time.monotonic() - started < args.seconds:
                parsed = [parse_event(event) for event in events]  # fresh ids every round
                for start in range(0, len(parsed), 1000):
                    buffer.apply(parsed[start : start + 1000])
                flushing = time.monotonic()
                rows += flusher.process_buffer().rows
                held += time.monotonic() - flushing
    finally:
        for burner in burners:
            burner.kill()
    late, trips = timings.lateness, timings.round_trips
    if not late:
        print("no extension happened: raise --seconds")
        return 1
    ms = 1000
    print(
        f"{len(late)} extensions (every {timings.interval_s:.3f} s) over {held:.0f} s of "
        f"flushing ({rows:,} rows), {args.burners} burner(s), {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "lateness: "
        + ", ".join(f"p{p * 100:g} {percentile(late, p) * ms:.1f} ms" for p in (0.5, 0.99, 0.999))
        + f", max {max(late) * ms:.1f} ms"
    )
    print(
        f"extension round trip: p50 {percentile(trips, 0.5) * ms:.1f} ms, "
        f"p99 {percentile(trips, 0.99) * ms:.1f} ms, max {max(trips) * ms:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
