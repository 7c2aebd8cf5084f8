"""forget: how long `eventbuffer forget` takes on a large events table (embedded chDB).

The table is filled by ClickHouse itself (`INSERT ... SELECT FROM numbers(N)`):
`ROWS` events over 10 projects, 100,000 profiles (each with its own device)
and 60 days; each forgotten person has `ROWS / 100,000` rows. The buffer's
Redis is private and holds `QUEUED` rows queued for ClickHouse (other
people's, and some of the person's), so the scan of the queue is in the
figure too.

Reported, each the median of the rounds (a new person each round):

- `forget --profile`: the whole request (tombstone, buffer, count, DELETE,
  audit row); the events table sorts by (project_id, toDate(created_at),
  profile_id, name), so the primary key narrows the profile by day;
- `forget --device`: the same by device id, which the sort key does not
  hold: every row of the project is read (until a data-skipping index on
  device_id narrows it);
- the share of the request spent in ClickHouse;
- what the tombstone read costs ingest: in-process `ingest()` of 500-event
  batches with the read, without it (replaced by a no-op), and with 100
  tombstones of other people in the batch's project, alternating rounds.

`python -m benchmarks.bench_forget [--rows N] [--rounds R]`, or through
`python -m benchmarks --only forget`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.support import Result, log, private_redis
from worker.buffer import EventBuffer
from worker.events import parse_event
from worker.privacy.clickhouse import count_rows
from worker.privacy.forget_request import forget
from worker.privacy.selector import Selector
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink, path_from_url

ROWS = 10_000_000
QUICK_ROWS = 1_000_000
PROFILES = 100_000
PROJECTS = 10
DAYS = 60
QUEUED = 50_000


def fill(sink: ChdbSink, rows: int) -> float:
    """`rows` events made by ClickHouse; returns the seconds it took."""
    started = time.perf_counter()
    step = 1_000_000
    for start in range(0, rows, step):
        count = min(step, rows - start)
        sink.query(
            "INSERT INTO events (id, name, device_id, profile_id, project_id, session_id, "
            "path, created_at, duration) SELECT generateUUIDv4(), "
            "if(number % 3 = 0, 'click', 'screen_view'), "
            f"concat('dev-', toString(number % {PROFILES})), "
            f"concat('user-', toString(number % {PROFILES})), "
            f"concat('proj-', toString(number % {PROFILES} % {PROJECTS})), "
            "concat('s-', toString(intDiv(number, 50))), concat('/page/', toString(number % 97)), "
            f"now64(3) - toIntervalMillisecond(number * {DAYS * 86_400_000 // rows} + 1000), "
            f"number % 5000 FROM numbers({start}, {count})"
        )
    return time.perf_counter() - started


def person(n: int) -> tuple[str, str, str]:
    """(project, profile, device) of the n-th person."""
    return f"proj-{n % PROFILES % PROJECTS}", f"user-{n}", f"dev-{n}"


def queue(buffer: EventBuffer, people: Sequence[int]) -> None:
    """QUEUED rows in the buffer: other people's, and a few of each measured person's."""
    now = buffer.clock.now_ms()
    events = []
    for n in range(QUEUED):
        who = people[n // 100 % len(people)] if n % 100 == 0 else PROFILES + n
        project, profile, device = person(who)
        events.append(
            parse_event(
                {
                    "project_id": project,
                    "name": "click",
                    "profile_id": profile,
                    "device_id": device,
                    "created_at": now - 60_000 + n,
                }
            )
        )
    for start in range(0, len(events), 1000):
        buffer.apply(events[start : start + 1000])


def measure(rows: int, rounds: int) -> dict[str, object]:
    with (
        private_redis("forget") as server,
        tempfile.TemporaryDirectory(prefix="bench-forget-") as tmp,
    ):
        settings = Settings.from_env(
            {
                "REDIS_URL": server.db_url(0),
                "CLICKHOUSE_URL": f"chdb://{tmp}/clickhouse",
                "EVENT_BUFFER_REORDER_WINDOW_MS": "0",
            }
        )
        sink = ChdbSink(path_from_url(settings.clickhouse_url))
        sink.migrate()
        log(f"forget: filling {rows:,} rows")
        fill_s = fill(sink, rows)
        log(f"forget: filled in {fill_s:.1f} s")
        redis = server.client(0)
        buffer = EventBuffer(redis, settings)
        people = [1000 + 7 * n for n in range(2 * rounds)]
        queue(buffer, people)
        timings: dict[str, list[float]] = {"profile": [], "device": []}
        clickhouse_s: dict[str, list[float]] = {"profile": [], "device": []}
        buffer_s: dict[str, list[float]] = {"profile": [], "device": []}
        delete_s: dict[str, list[float]] = {"profile": [], "device": []}
        erased: dict[str, list[int]] = {"profile": [], "device": []}
        for n, who in enumerate(people):
            kind = "profile" if n % 2 == 0 else "device"
            project, profile, device = person(who)
            selector = Selector(project, kind, profile if kind == "profile" else device)
            started = time.perf_counter()
            report = forget(redis, sink, settings, selector, settle_s=0)
            total = time.perf_counter() - started
            probe = time.perf_counter()
            assert count_rows(sink, selector, report.requested_ms) == 0
            counted = time.perf_counter() - probe
            timings[kind].append(total)
            # The request counts twice (before and after its DELETE): about the cost of
            # one count more than the DELETE alone.
            clickhouse_s[kind].append(counted)
            erased[kind].append(report.clickhouse_rows + report.buffer.buffer_rows)
            buffer_s[kind].append(report.seconds["buffer"])
            delete_s[kind].append(report.seconds["clickhouse"])
            log(
                f"forget --{kind}: {total:.2f} s (buffer {report.seconds['buffer']:.2f} s, "
                f"ClickHouse {report.seconds['clickhouse']:.2f} s), {report.clickhouse_rows} "
                f"ClickHouse rows, {report.buffer.buffer_rows} queued rows"
            )
        [(left,)] = sink.query("SELECT count() FROM events")
        sink.close()
    return {
        "rows": rows,
        "fill_s": fill_s,
        "left": int(left),
        "profile_s": statistics.median(timings["profile"]),
        "device_s": statistics.median(timings["device"]),
        "count_profile_s": statistics.median(clickhouse_s["profile"]),
        "count_device_s": statistics.median(clickhouse_s["device"]),
        "buffer_profile_s": statistics.median(buffer_s["profile"]),
        "buffer_device_s": statistics.median(buffer_s["device"]),
        "clickhouse_profile_s": statistics.median(delete_s["profile"]),
        "clickhouse_device_s": statistics.median(delete_s["device"]),
        "erased_profile": statistics.median(erased["profile"]),
        "erased_device": statistics.median(erased["device"]),
    }


def ingest_cost(rounds: int, batches: int = 40, size: int = 500) -> dict[str, float]:
    """Events/s of in-process ingest: with the tombstone read, without it, and with 100
    tombstones in the project (medians of `rounds`, the modes alternating)."""
    import worker.ingestion as ingest_module
    from worker.ingestion import ingest
    from worker.privacy.tombstones import store_tombstone

    real = ingest_module.drop_forgotten_events
    rates: dict[str, list[float]] = {"with": [], "without": [], "tombstoned": []}
    with private_redis("forget-ingest") as server:
        redis = server.client(0)
        settings = Settings.from_env(
            {"REDIS_URL": server.db_url(0), "EVENT_BUFFER_REORDER_WINDOW_MS": "0"}
        )
        buffer = EventBuffer(redis, settings)
        now = buffer.clock.now_ms()
        try:
            modes = list(rates)
            for n in range(rounds):
                for mode in modes[n % 3 :] + modes[: n % 3]:  # each mode first in turn
                    ingest_module.drop_forgotten_events = (  # type: ignore[assignment]
                        real if mode != "without" else (lambda _r, _k, e, p, _c=None: (e, p))
                    )
                    redis.flushall()
                    if mode == "tombstoned":
                        for gone in range(100):
                            selector = Selector("p1", "profile", f"gone-{gone}")
                            store_tombstone(redis, buffer.keyspace, selector, now, 30)
                    work = [
                        [
                            {
                                "project_id": "p1",
                                "name": "click",
                                "profile_id": f"u{b}-{i}",
                                "device_id": f"d{b}-{i}",
                                "session_id": f"s{b}-{i % 50}",
                                "created_at": now - 1000 + i,
                            }
                            for i in range(size)
                        ]
                        for b in range(batches)
                    ]
                    started = time.perf_counter()
                    for b, batch in enumerate(work):
                        ingest(buffer, batch, f"{mode}-{n}-{b}")
                    rates[mode].append(batches * size / (time.perf_counter() - started))
        finally:
            ingest_module.drop_forgotten_events = real
    return {mode: statistics.median(values) for mode, values in rates.items()}


def run(args: argparse.Namespace) -> list[Result]:
    rows = getattr(args, "forget_rows", None) or (QUICK_ROWS if args.quick else ROWS)
    rounds = args.rounds
    m = measure(rows, rounds)
    cost = ingest_cost(max(rounds, 5))
    note = (
        f"{m['rows']:,} rows (filled in {m['fill_s']:.0f} s), {QUEUED:,} queued in Redis; "
        f"a person has ~{m['erased_profile']:.0f} rows"
    )
    return [
        Result(
            "forget --profile",
            "s",
            float(m["profile_s"]),  # type: ignore[arg-type]
            None,
            "-",
            rounds,
            better="lower",
            note=note + f"; buffer {m['buffer_profile_s']:.2f} s, ClickHouse "
            f"{m['clickhouse_profile_s']:.2f} s",
            extra=m,
        ),
        Result(
            "forget --device",
            "s",
            float(m["device_s"]),  # type: ignore[arg-type]
            None,
            "-",
            rounds,
            better="lower",
            note=f"no index on device_id yet; buffer {m['buffer_device_s']:.2f} s, ClickHouse "
            f"{m['clickhouse_device_s']:.2f} s",
            extra=m,
        ),
        Result(
            "ingest with the tombstone read (batches of 500, in process)",
            "ev/s",
            cost["with"],
            cost["without"],
            "without the read",
            max(rounds, 5),
            note=f"100 tombstones in the project: {cost['tombstoned']:,.0f} ev/s",
            extra=cost,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS, help=f"table size ({ROWS:,})")
    parser.add_argument("--rounds", type=int, default=3, help="people forgotten per selector")
    parser.add_argument("--ingest-only", action="store_true", help="only the ingest cost")
    args = parser.parse_args(argv)
    if not args.ingest_only:
        print(measure(args.rows, args.rounds))
    print(ingest_cost(max(args.rounds, 5)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
