"""end to end: producers -> Celery -> Redis buffer -> ClickHouse, sustained.

The whole system runs as it would in production, twice: on embedded
ClickHouse (chDB), then on a ClickHouse 26.x server (chDB's engine serving
the native protocol, tests/support/native_server.py), where the flush worker
is one solo process with nothing to recycle. Each run:
the ingest workers `eventbuffer run` starts (`INGEST_LAYOUT`: two `-P solo`
processes), one flush worker (on chDB one prefork process, replaced every
10 tasks, as `eventbuffer run` starts it), Celery Beat
with EVENT_BUFFER_FLUSH_INTERVAL_S=1 (plus back-pressure past the high-water
mark), and EventProducer (batches up to 1000, the default 10 ms timer) in
this process, offering events at a fixed rate: `--rate`, else
`--e2e-fraction` of the standard interface's rate measured in the same run
(the `standard` benchmark's, else a few drains of its layout here,
`bench_scale.ingest_rate`), else 50% of the
pipeline's capacity on this machine as this run's producer, ingest and
flush benchmarks measured it (`capacity`), else 10,000/s. After a warm-up,
the measurement window lasts `--duration` seconds; then every session is
ended and the pipeline drained, and every event handed over must be in
ClickHouse (or, applied after its session_end by the other ingest process,
still wait in Redis as a last view; counted apart). A rate the pipeline
cannot sustain is given up once the backlog (broker and buffer) holds more
than `GIVE_UP_BACKLOG_S` seconds of offered events: the window ends there,
and the rows that became visible per second are what it sustained.

Latency, from hand-over to visibility in ClickHouse:

- hand-over: the wall-clock time at which `send()` returned for the event,
  recorded here per event id. A screen_view cannot be written before its
  session's next view (its duration) or session_end arrives: that is the
  buffer's rule, not a delay. Its hand-over is therefore the send time of
  the event that releases it; views still waiting at the end are excluded.
- visibility: the table gets one extra column, `_inserted DateTime64(3)
  DEFAULT now64(3)`, which ClickHouse fills when the flush worker's INSERT
  runs. Nothing polls ClickHouse during the run (embedded ClickHouse admits
  one process at a time: polling would stall the flush worker); after the
  run drains, the ids and `_inserted` times are read once.

Throughput: rows that became visible during the window, per second, against
the rate offered. Worker RSS (process and pool children, psutil, else /proc VmRSS) is taken at the
start and the end of the window (after the warm-up: the flush worker loads
chDB's library on its first flush), and every 5 s in between (every 1 s for the
peaks); the target compares the peak of the window's second half with its first half's (a
leak raises it; the ingest processes' heap settles over ~30 s, and the
chDB flush process is replaced every 10 flushes), start to end is shown too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.support import (
    Result,
    celery_beat,
    celery_worker,
    cpu_seconds,
    log,
    private_redis,
    project_env,
    rss_kb,
    skipped,
)
from tests.support.native_server import ChdbServer
from tests.support.polling import wait_until
from tests.support.traffic import RealisticTraffic
from worker.buffer import stored_view_row
from worker.celery import create_app
from worker.cli.run import INGEST_LAYOUT
from worker.keys import Keyspace
from worker.names import INGEST_QUEUE
from worker.producer import EventProducer
from worker.settings import Settings
from worker.sinks import open_sink
from worker.sinks.chdb import close_all
from worker.sinks.schema import create_table

FLUSH_INTERVAL_S = 1
DEFAULT_RATE = 10_000.0
PRODUCER_BATCH = 1000
RSS_GROWTH_LIMIT = 0.10
SAMPLE_S = 5.0
RSS_SAMPLE_S = 1.0  # the peaks of the chDB flush process's sawtooth need finer samples
# Past this many seconds of offered events waiting, the p99 bound is long lost and the
# rest of the window would only fill Redis: the run stops offering.
GIVE_UP_BACKLOG_S = 30.0
# Kinds the reorder window holds before they are queued (worker/reorder.py).
HELD_KINDS = ("screen_view", "session_end")
# The end-to-end target against the standard interface's rate (issue 22).
TARGET_STANDARD_FRACTION = 0.5


@dataclass
class Tracker:
    """Hand-over time of every event, by id, on the producer side."""

    handover: dict[str, float] = field(default_factory=dict)
    waiting_view: dict[str, str] = field(default_factory=dict)  # session -> view id
    held: set[str] = field(default_factory=set)  # ids of the kinds the reorder window holds
    sent: int = 0

    def record(self, event_id: str, event: dict[str, Any], session: str, at: float) -> None:
        self.sent += 1
        name = event["name"]
        if name in HELD_KINDS:
            self.held.add(event_id)
            previous = self.waiting_view.pop(session, None)
            if previous is not None:
                self.handover[previous] = at  # this event releases the session's last view
            if name == "screen_view":
                self.waiting_view[session] = event_id
                return
        self.handover[event_id] = at


def offer(
    producer: EventProducer,
    stream: RealisticTraffic,
    tracker: Tracker,
    rate: float,
    seconds: float,
    on_tick: Callable[[], bool | None] | None = None,
) -> tuple[int, float]:
    """Send at `rate` events/s for `seconds`; returns (events sent, worst backlog in s).

    Stops early when `on_tick` returns True.
    """
    started = time.monotonic()
    sent: int = 0
    worst = 0.0
    while True:
        elapsed = time.monotonic() - started
        if elapsed >= seconds:
            return sent, worst
        due = int(elapsed * rate)
        worst = max(worst, (due - sent) / rate)
        while sent < due:
            event, session, _ = stream.next_event()
            event_id = producer.send(event)
            tracker.record(event_id, event, session, time.time())
            sent += 1
        if on_tick is not None and on_tick():
            return sent, worst
        time.sleep(0.002)


class Timeline:
    """Every few seconds: per-process CPU share and worker RSS, broker and buffer backlog."""

    def __init__(
        self,
        pids: dict[str, int],
        workers: list[str],
        broker_tasks: Callable[[], int],
        buffer_rows: Callable[[], int],
    ) -> None:
        self.pids = pids
        self.broker_tasks = broker_tasks
        self.buffer_rows = buffer_rows
        self.rows: list[dict[str, Any]] = []
        self.rss: dict[str, list[int | None]] = {name: [] for name in workers}
        # RSS every RSS_SAMPLE_S, for the peaks of each half of the window.
        self.fine_rss: dict[str, list[int]] = {name: [] for name in workers}
        self._next_fine = 0.0
        self._last: tuple[float, dict[str, float]] | None = None
        self._next = 0.0
        self._started = time.monotonic()

    def maybe_sample(self) -> None:
        now = time.monotonic()
        if now >= self._next_fine:
            self._next_fine = now + RSS_SAMPLE_S
            for name, samples in self.fine_rss.items():
                value = rss_kb(self.pids[name])
                if value:
                    samples.append(value)
        if now >= self._next:
            self.sample()

    def sample(self) -> None:
        now = time.monotonic()
        self._next = now + SAMPLE_S
        # This process's own threads only: the workers, Redis and the server are its children.
        cpu = {
            name: time.process_time() if pid == os.getpid() else cpu_seconds(pid)
            for name, pid in self.pids.items()
        }
        row: dict[str, Any] = {
            "t": round(now - self._started, 1),
            "broker_tasks": self.broker_tasks(),
            "buffer_rows": self.buffer_rows(),
        }
        for name in self.rss:
            value = rss_kb(self.pids[name])
            self.rss[name].append(value)
            row[f"{name}_rss_kb"] = value
        if self._last is not None:
            before, used = self._last
            for name, seconds in cpu.items():
                row[f"{name}_cpu"] = round((seconds - used[name]) / (now - before), 2)
        self._last = (now, cpu)
        self.rows.append(row)

    def as_json(self) -> list[dict[str, Any]]:
        return self.rows

    def print(self) -> None:
        names = list(self.pids)
        log("[e2e] timeline (cpu = cores used since the previous line):")
        log(
            "      t  broker tasks  buffer rows  "
            + "  ".join(f"{n[:8]:>8} RSS" for n in self.rss)
            + "  "
            + "  ".join(f"{n[:8]:>8}" for n in names)
        )
        for row in self.rows:
            cpus = "  ".join(
                f"{row[f'{n}_cpu']:>8.2f}" if f"{n}_cpu" in row else f"{'-':>8}" for n in names
            )
            rss = "  ".join(f"{(row[f'{n}_rss_kb'] or 0) // 1024:>8} MiB" for n in self.rss)
            head = f"  {row['t']:>5.0f}  {row['broker_tasks']:>12,}  {row['buffer_rows']:>11,}"
            log(f"{head}  {rss}  {cpus}")


_FLUSHED = re.compile(r"flushed shard \d+: (\d+) rows, .* in ([\d.]+)s")


def flush_log_summary(text: str) -> dict[str, float]:
    """Runs of process_buffer that moved rows, from the flush worker's log."""
    runs = [(int(m.group(1)), float(m.group(2))) for m in _FLUSHED.finditer(text)]
    if not runs:
        return {"runs": 0}
    rows = [r for r, _ in runs]
    seconds = [s for _, s in runs]
    return {
        "runs": len(runs),
        "rows_median": statistics.median(rows),
        "rows_max": max(rows),
        "seconds_median": round(statistics.median(seconds), 3),
        "seconds_max": round(max(seconds), 3),
        "rows_per_s_while_flushing": round(sum(rows) / sum(seconds)) if sum(seconds) else 0,
    }


def quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def latency_breakdown(
    latency: dict[str, float], held: set[str], landed_at: list[float], window: tuple[float, float]
) -> dict[str, Any]:
    """Where the latency comes from: `latency` (id -> s, events handed over in the window)
    split into the kinds the reorder window holds and the rest; the gaps between the
    distinct instants the window's rows became visible (the flush's INSERTs: a gap past
    the flush interval is a flush that ran long or waited); the worst seconds (p99 of the
    events handed over in each second of the window, by the second's start)."""
    start, end = window
    kinds: dict[str, list[float]] = {"held": [], "other": []}
    for event_id, seconds in latency.items():
        kinds["held" if event_id in held else "other"].append(seconds)
    out: dict[str, Any] = {}
    for kind, values in kinds.items():
        values.sort()
        out[kind] = {
            "events": len(values),
            "p50": round(quantile(values, 0.5), 3),
            "p99": round(quantile(values, 0.99), 3),
        }
    instants = sorted({round(t, 3) for t in landed_at if start <= t <= end})
    gaps = sorted(b - a for a, b in itertools.pairwise(instants))
    out["insert_instants"] = len(instants)
    out["insert_gap_s"] = {
        "p50": round(quantile(gaps, 0.5), 3),
        "p99": round(quantile(gaps, 0.99), 3),
        "max": round(gaps[-1], 3) if gaps else None,
    }
    return out


def worst_seconds(
    latency: dict[str, float], handover: dict[str, float], start: float, count: int = 5
) -> list[tuple[int, float]]:
    """(second of the window, p99 latency of the events handed over in it), worst first."""
    by_second: dict[int, list[float]] = {}
    for event_id, seconds in latency.items():
        by_second.setdefault(int(handover[event_id] - start), []).append(seconds)
    p99s = [(second, quantile(sorted(v), 0.99)) for second, v in by_second.items()]
    return [(second, round(p99, 3)) for second, p99 in sorted(p99s, key=lambda x: -x[1])[:count]]


LANDED_SQL = "SELECT toString(id), toUnixTimestamp64Milli(_inserted) FROM events"
INSERTED_COLUMN = "ALTER TABLE events ADD COLUMN _inserted DateTime64(3, 'UTC') DEFAULT now64(3)"


class Backend:
    """Where the flush worker writes (`url`), how the flusher is deployed there."""

    label = ""
    url = ""
    flush_pool: tuple[str, ...] = ()
    pool_note = ""

    def prepare(self) -> None:
        """The events table, with `_inserted`."""
        self._query(create_table("events"))
        self._query(INSERTED_COLUMN)

    def landed(self) -> list[tuple[str, int]]:
        """(id, `_inserted` ms) of every row."""
        return [(str(i), int(ms)) for i, ms in self._query(LANDED_SQL)]

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        sink = open_sink(self.url)
        try:
            return sink.query(sql)
        finally:
            sink.close()
            self._release()

    def _release(self) -> None:
        """Let the flush worker's process open the data (embedded ClickHouse only)."""


class Embedded(Backend):
    """chDB in the flush worker, deployed as `eventbuffer run` deploys it."""

    label = "chDB"
    # One pool process, replaced every 10 flushes (chDB keeps memory per
    # session it opens and closes); RSS counts the whole tree.
    flush_pool = ("-c", "1", "--max-tasks-per-child", "10")
    pool_note = "flush: one prefork process replaced every 10 tasks, as eventbuffer run"

    def __init__(self, path: Path) -> None:
        self.url = f"chdb://{path}"

    def _release(self) -> None:
        close_all()


class Server(Backend):
    """A ClickHouse 26.x server (chDB's engine serving the native protocol), as in production."""

    label = "ClickHouse server"
    flush_pool = ("-P", "solo")
    pool_note = "flush: one solo process (nothing to recycle: the server holds the data)"

    def __init__(self, url: str, pid: int | None = None) -> None:
        self.url = url
        self.pid = pid

    def insert_log(self) -> dict[str, Any]:
        """The flush's INSERTs as the server's `system.query_log` has them."""
        self._query("SYSTEM FLUSH LOGS")
        rows = self._query(
            "SELECT count(), sum(written_rows), round(avg(query_duration_ms), 1), "
            "quantile(0.99)(query_duration_ms), round(sum(query_duration_ms) / 1000, 1) "
            "FROM system.query_log WHERE type = 'QueryFinish' AND query_kind = 'Insert' "
            "AND has(tables, 'default.events')"
        )
        keys = ("inserts", "rows", "ms_mean", "ms_p99", "seconds_total")
        return dict(zip(keys, (float(v) for v in rows[0]), strict=True)) if rows else {}


def landed_rows(backend: Backend) -> dict[str, float]:
    """id -> `_inserted` (epoch seconds) of every row in the table."""
    landed: dict[str, float] = {}
    duplicates = 0
    for event_id, millis in backend.landed():
        if event_id in landed:
            duplicates += 1
        landed[event_id] = millis / 1000
    if duplicates:
        log(f"[e2e] WARNING: {duplicates} duplicate rows in ClickHouse")
    return landed


def capacity(stage_rates: dict[str, float]) -> float:
    """Events/s the stages sustain together, from each one's rate measured alone.

    Each stage was measured with the whole machine to itself (the ingest
    workers take both cores, chDB's insert threads as well), and running
    together they share it: an event costs the sum of the machine-time
    each stage spends on it.
    """
    return 1 / sum(1 / rate for rate in stage_rates.values())


def cpu_shares(rows: list[dict[str, Any]], names: list[str]) -> dict[str, float]:
    """Cores each process used over the timeline's intervals, weighted by their length."""
    shares = {}
    for name in names:
        pairs = [
            (row[f"{name}_cpu"], row["t"] - previous["t"])
            for previous, row in itertools.pairwise(rows)
            if f"{name}_cpu" in row
        ]
        spent = sum(seconds for _, seconds in pairs)
        if spent > 0:
            shares[name] = sum(cores * seconds for cores, seconds in pairs) / spent
    return shares


def command_stats(
    client: Any, since: dict[str, tuple[int, int]] | None = None
) -> dict[str, tuple[int, int]]:
    """Redis `INFO commandstats`: command -> (calls, µs), minus `since` if given."""
    stats: dict[str, tuple[int, int]] = {}
    for key, value in client.info("commandstats").items():
        name = key.removeprefix("cmdstat_")
        calls, usec = int(value["calls"]), int(value["usec"])
        before = (since or {}).get(name, (0, 0))
        if calls - before[0]:
            stats[name] = (calls - before[0], usec - before[1])
    return stats


def waiting_view_ids(client: Any, keyspace: Keyspace) -> set[str]:
    """Ids of the screen_views the buffer still holds as a session's last view."""
    ids = set()
    for shard in keyspace.all():
        for value in client.hvals(shard.views):
            ids.add(json.loads(stored_view_row(value))["id"])
    return ids


def standard_rate(args: argparse.Namespace) -> tuple[float, str]:
    """The standard interface's rate in this run: the `standard` benchmark's, else measured."""
    measured = getattr(args, "standard_rate", None)
    if measured:
        return float(measured), "the standard benchmark"
    from benchmarks.bench_scale import ingest_rate

    rounds = 3
    drains = ingest_rate(2, args.standard_events, rounds)
    rates = sorted(d.rate for d in drains)
    log("[e2e] standard interface's drains: " + ", ".join(f"{r:,.0f}" for r in rates))
    args.standard_rate = rates[len(rates) // 2]
    return args.standard_rate, f"median of {rounds} drains of its layout, here"


def offered_rate(args: argparse.Namespace) -> tuple[float, str]:
    """Events/s to offer, and why."""
    stages = {k: v for k, v in args.stage_rates.items() if v}
    fraction = getattr(args, "e2e_fraction", None)
    if args.rate:
        return float(args.rate), "--rate"
    if fraction:
        standard, source = standard_rate(args)
        return fraction * standard, (
            f"{fraction:g}x the standard interface's {standard:,.0f} ev/s ({source})"
        )
    if {"ingest", "flush"} <= set(stages):
        figures = ", ".join(f"{name} {value:,.0f}/s" for name, value in stages.items())
        return (
            0.5 * capacity(stages),
            f"50% of the pipeline's capacity, 1 / sum(1 / rate) of {figures} measured alone",
        )
    return DEFAULT_RATE, "default (run with the ingest and flush benchmarks for 50%)"


def run(args: argparse.Namespace) -> list[Result]:
    duration = float(args.duration)
    warmup = 3.0 if args.quick else 5.0
    rate, why = offered_rate(args)
    timer = args.producer_batch_ms
    timer_ms = Settings().micro_batch_ms if timer is None else timer
    log(
        f"[e2e] offering {rate:,.0f} events/s ({why}) for {warmup:.0f} s warm-up + "
        f"{duration:.0f} s; flush interval {FLUSH_INTERVAL_S} s; producer batches up to "
        f"{PRODUCER_BATCH} events or {timer_ms} ms"
    )
    results: list[Result] = []
    backends = {name.strip() for name in args.e2e_backends.split(",")}
    if backends - {"chdb", "server"}:
        raise ValueError(f"--e2e-backends: chdb or server, not {args.e2e_backends!r}")
    if "chdb" in backends:
        with tempfile.TemporaryDirectory(prefix="bench-e2e-chdb-") as tmp:
            results += pipeline(args, rate, why, timer_ms, Embedded(Path(tmp) / "clickhouse"))
    if "server" not in backends:
        return results
    # The same pipeline writing to a server, as production runs it: what
    # embedded ClickHouse's recycled flush process costs shows as the difference.
    try:
        with tempfile.TemporaryDirectory(prefix="bench-e2e-server-") as tmp:
            server = ChdbServer(Path(tmp))
            try:
                server.start()
                pid = server.process.pid if server.process is not None else None
                results += pipeline(args, rate, why, timer_ms, Server(server.url, pid))
            finally:
                server.stop()
    except Exception as exc:  # a server that does not start must not hide the chDB figures
        log(f"[e2e] ClickHouse server run failed: {exc!r}")
        results.append(skipped("e2e (ClickHouse server)", f"failed: {exc!r}"))
    return results


def flush_workers(args: argparse.Namespace, backend: Backend) -> int:
    """Flush workers (and shards) of this run: `--e2e-flush-workers` on a server, else 1."""
    wanted = int(getattr(args, "e2e_flush_workers", None) or 1)
    return wanted if isinstance(backend, Server) else 1


def pipeline(
    args: argparse.Namespace, rate: float, why: str, timer_ms: int, backend: Backend
) -> list[Result]:
    duration = float(args.duration)
    warmup = 3.0 if args.quick else 5.0
    log(f"[e2e] {backend.label}: {backend.pool_note}")
    with private_redis("e2e") as server, tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        backend.prepare()
        values = {
            "REDIS_URL": server.db_url(0),
            "CELERY_BROKER_URL": server.db_url(1),
            "CLICKHOUSE_URL": backend.url,
            "EVENT_BUFFER_FLUSH_INTERVAL_S": str(FLUSH_INTERVAL_S),
            "EVENT_BUFFER_MAX_BATCHES_PER_FLUSH": "1000",
            # One shard per flush worker (a server only: chDB admits one process).
            "EVENT_BUFFER_SHARDS": str(flush_workers(args, backend)),
        }
        if args.e2e_reorder_window is not None:
            values["EVENT_BUFFER_REORDER_WINDOW_MS"] = str(args.e2e_reorder_window)
        settings = Settings.from_env(values)
        log(f"[e2e] reorder window {settings.reorder_window_ms} ms")
        env = project_env(**values)
        logs = Path(tmp) / "logs"
        # The ingest layout `eventbuffer run` and the README use.
        ingest = {
            f"ingest{i}": celery_worker(f"ingest{i}", "ingest", env, logs, *argv)
            for i, argv in enumerate(INGEST_LAYOUT, start=1)
        }
        flush = celery_worker("flush", "flush", env, logs, *backend.flush_pool)
        more_flush = {
            f"flush{i}": celery_worker(f"flush{i}", "flush", env, logs, *backend.flush_pool)
            for i in range(2, settings.shards + 1)
        }
        beat = celery_beat(env, logs)
        workers = {**ingest, "flush": flush, **more_flush}
        buffer_db = server.client(0)
        broker_db = server.client(1)
        shards = Keyspace(settings.key_prefix, settings.shards).all()
        app = create_app(settings)
        producer = EventProducer(
            app, batch_size=PRODUCER_BATCH, batch_ms=args.producer_batch_ms, settings=settings
        )
        stream = RealisticTraffic(seed=17, concurrent=2000)
        tracker = Tracker()
        idle_rss = {name: rss_kb(w.pid) for name, w in workers.items()}
        pids = {**{n: w.pid for n, w in workers.items()}, "beat": beat.pid, "producer": os.getpid()}
        if server.process is not None:
            pids["redis"] = server.process.pid
        if isinstance(backend, Server) and backend.pid:
            pids["clickhouse"] = backend.pid
        timeline = Timeline(
            pids,
            list(workers),
            lambda: int(broker_db.llen(INGEST_QUEUE)),
            lambda: sum(int(buffer_db.llen(shard.queue)) for shard in shards),
        )

        per_task = max(1.0, min(PRODUCER_BATCH, rate * timer_ms / 1000))
        gave_up: list[float] = []

        def tick() -> bool:
            """Sample; True once the backlog is past GIVE_UP_BACKLOG_S of offered events."""
            timeline.maybe_sample()
            if not timeline.rows:
                return False
            last = timeline.rows[-1]
            waiting = last["broker_tasks"] * per_task + last["buffer_rows"]
            if waiting > GIVE_UP_BACKLOG_S * rate:
                gave_up.append(last["t"])
                log(
                    f"[e2e] giving up at t={last['t']:.0f} s: ~{waiting:,.0f} events waiting "
                    f"(> {GIVE_UP_BACKLOG_S:.0f} s of the offered rate)"
                )
                return True
            return False

        redis_before = command_stats(buffer_db)
        try:
            offer(producer, stream, tracker, rate, warmup)
            window_start = time.time()
            timeline.sample()
            sent, backlog = offer(producer, stream, tracker, rate, duration, tick)
            window_end = time.time()
            timeline.sample()
            redis_used = command_stats(buffer_db, redis_before)
            # Close every session, so every view is released: an event that
            # does not land after that is lost, or waits as a last view
            # (applied after its session_end, see waiting_view_ids).
            for event, session in stream.end_all():
                tracker.record(producer.send(event), event, session, time.time())
            producer.flush(timeout=60)

            def drained() -> bool:
                # Held session events too: the reorder window's, released by the flushes.
                return (
                    int(broker_db.llen(INGEST_QUEUE)) == 0
                    and all(int(buffer_db.llen(shard.queue)) == 0 for shard in shards)
                    and all(int(buffer_db.zcard(shard.held_due)) == 0 for shard in shards)
                )

            drain_started = time.monotonic()
            wait_until(
                drained,
                max(180.0, GIVE_UP_BACKLOG_S * 4),
                "the pipeline to drain",
                interval=0.2,
                alive=lambda: all(w.alive() for w in (*workers.values(), beat)),
            )
            drain_s = time.monotonic() - drain_started
            waiting = waiting_view_ids(buffer_db, Keyspace(settings.key_prefix, settings.shards))
        finally:
            producer.close(timeout=5)
            app.close()
            buffer_db.close()
            broker_db.close()
            for child in (beat, flush, *more_flush.values(), *ingest.values()):
                child.stop()

        landed = landed_rows(backend)
        flushes = flush_log_summary("".join(w.text() for w in (flush, *more_flush.values())))
        inserts = backend.insert_log() if isinstance(backend, Server) else {}

    in_window = {i: t for i, t in tracker.handover.items() if window_start <= t <= window_end}
    latency = {i: landed[i] - t for i, t in in_window.items() if i in landed}
    latencies = sorted(latency.values())
    breakdown = latency_breakdown(
        latency, tracker.held, list(landed.values()), (window_start, window_end)
    )
    breakdown["worst_seconds"] = worst_seconds(latency, tracker.handover, window_start)
    not_landed = {i for i in tracker.handover if i not in landed}
    out_of_order = len(not_landed & waiting)
    missing = len(not_landed) - out_of_order
    window_s = window_end - window_start  # shorter than `duration` if the run gave up
    visible_in_window = sum(1 for t in landed.values() if window_start <= t <= window_end)
    throughput = visible_in_window / window_s
    offered = sent / window_s
    p50, p99 = quantile(latencies, 0.50), quantile(latencies, 0.99)
    worst = latencies[-1] if latencies else float("nan")
    bound = FLUSH_INTERVAL_S + 1.0

    growth: dict[str, float] = {}  # start -> end of the window
    peaks: dict[str, float] = {}  # the second half's peak against the first half's
    for name in workers:
        samples = [kb for kb in timeline.rss[name] if kb]
        if len(samples) >= 2:
            growth[name] = samples[-1] / samples[0] - 1
        fine = timeline.fine_rss[name]
        if len(fine) >= 4:
            half = len(fine) // 2
            peaks[name] = max(fine[half:]) / max(fine[:half]) - 1
    rss_text = ", ".join(
        f"{name} {idle_rss[name] or 0:,} (idle) -> {timeline.rss[name][0] or 0:,} -> "
        f"{timeline.rss[name][-1] or 0:,} KiB ({100 * growth.get(name, float('nan')):+.1f}%, "
        f"peaks {100 * peaks.get(name, float('nan')):+.1f}%)"
        for name in workers
    )
    log(f"[e2e] offered {offered:,.0f} events/s (worst producer backlog {backlog:.2f} s)")
    log(f"[e2e] visible in ClickHouse during the window: {throughput:,.0f} rows/s")
    log(
        f"[e2e] latency hand-over -> visible over {len(latencies):,} events: p50 {p50:.3f} s, "
        f"mean {statistics.fmean(latencies) if latencies else float('nan'):.3f} s, "
        f"p99 {p99:.3f} s, max {worst:.3f} s; drain after the window {drain_s:.1f} s"
    )
    log(
        f"[e2e] latency by kind: held by the reorder window {breakdown['held']}, "
        f"the rest {breakdown['other']}; {breakdown['insert_instants']} insert instants, "
        f"gaps between them {breakdown['insert_gap_s']} s; worst seconds (t, p99) "
        f"{breakdown['worst_seconds']}"
    )
    log(
        f"[e2e] after every session ended: {missing} events lost; {out_of_order} views "
        "wait as a last view (applied after their session_end by the other ingest process)"
    )
    log(f"[e2e] worker RSS: {rss_text}")
    log(f"[e2e] flush worker: {flushes}")
    if inserts:
        log(f"[e2e] server's query_log, the flush's INSERTs: {inserts}")
    top = sorted(redis_used.items(), key=lambda kv: -kv[1][1])[:8]
    log(
        "[e2e] Redis commandstats in the window (calls, µs, µs per event offered): "
        + ", ".join(
            f"{name} {calls:,} {usec:,} {usec / max(sent, 1):.2f}" for name, (calls, usec) in top
        )
    )
    timeline.print()
    shares = cpu_shares(timeline.rows, list(pids))
    log(
        "[e2e] CPU in the window, cores (µs per event offered): "
        + ", ".join(f"{n} {c:.2f} ({1e6 * c / max(offered, 1):.1f})" for n, c in shares.items())
    )
    sustained = not gave_up
    standard = getattr(args, "standard_rate", None)

    common = {
        "duration_s": duration,
        "warmup_s": warmup,
        "offered_rate": offered,
        "requested_rate": rate,
        "rate_source": why,
        "backend": backend.label,
        "flush_interval_s": FLUSH_INTERVAL_S,
        "events_sent_in_window": sent,
        "missing": missing,
        "views_applied_after_session_end": out_of_order,
        "stage_rates": {k: v for k, v in args.stage_rates.items() if v},
        "flushes": flushes,
        "producer_batch_ms": timer_ms,
        "window_s": window_s,
        "gave_up_at_s": gave_up[0] if gave_up else None,
        "standard_rate": standard,
        "redis_commandstats": redis_used,
        "insert_log": inserts,
        "cpu_cores": shares,
        "latency_breakdown": breakdown,
    }
    method = (
        "latency from send() (or, for a screen_view, the send of the event that releases it) "
        "to ClickHouse's insert time in an `_inserted DEFAULT now64(3)` column"
    )
    growth_max = max(growth.values()) if growth else None
    peaks_max = max(peaks.values()) if peaks else None
    versus: list[Result] = []
    if standard:
        ratio = throughput / standard
        versus.append(
            Result(
                f"e2e sustained vs the standard interface ({backend.label})",
                "events/s",
                throughput,
                standard,
                "standard interface (README layout, drained alone)",
                1,
                target=f">= {TARGET_STANDARD_FRACTION}x for {duration:.0f} s",
                passed=sustained
                and ratio >= TARGET_STANDARD_FRACTION * 0.98
                and bool(latencies)
                and p99 <= bound
                and missing == 0,
                note=(
                    f"offered {offered:,.0f}/s for {window_s:.0f} s"
                    + (f", gave up at {gave_up[0]:.0f} s (backlog)" if gave_up else "")
                    + f"; p99 {p99:.2f} s; {missing} lost"
                ),
                extra=common,
            )
        )
    return [
        *versus,
        Result(
            f"e2e throughput ({backend.label})",
            "events/s",
            throughput,
            offered,
            "offered rate",
            1,
            note=(
                f"rows visible during the {duration:.0f} s window vs offered; {missing} lost, "
                f"{out_of_order} views applied after their session_end wait"
            ),
            extra=common,
        ),
        Result(
            f"e2e latency p99 ({backend.label})",
            "s",
            p99,
            None,
            "-",
            1,
            target=f"<= {bound:.0f} s",
            passed=bool(latencies) and p99 <= bound and missing == 0,
            better="lower",
            note=f"p50 {p50:.3f} s, max {worst:.3f} s; {method}",
            extra={**common, "p50_s": p50, "p99_s": p99, "max_s": worst, "samples": len(latencies)},
        ),
        Result(
            f"e2e worker RSS growth, 2nd half's peak vs 1st's ({backend.label})",
            "%",
            None if peaks_max is None else 100 * peaks_max,
            None,
            "-",
            1,
            target=f"< {100 * RSS_GROWTH_LIMIT:.0f}%",
            passed=peaks_max is not None and peaks_max < RSS_GROWTH_LIMIT,
            better="lower",
            note=(
                "a leak raises the peaks; warm-up (Python's heap settling in the first "
                f"~30 s) and chDB's recycled flush process do not. Largest of: {rss_text}"
            ),
            extra={**common, "timeline": timeline.as_json(), "idle_rss_kb": idle_rss},
        ),
        Result(
            f"e2e worker RSS growth, start to end of the window ({backend.label})",
            "%",
            None if growth_max is None else 100 * growth_max,
            None,
            "-",
            1,
            better="lower",
            note="largest of the workers; warm-up included",
            extra={"growth": growth, "peaks": peaks},
        ),
    ]
