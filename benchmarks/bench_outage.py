"""outage: how fast a backlog drains after a ClickHouse outage, against the normal flush rate.

The scenario of tests/faults/test_long_outage.py, with its numbers as
parameters: the README's layout (one Redis for buffer and broker,
`noeviction`; two `-P solo` ingest workers; a solo flush worker; Beat,
EVENT_BUFFER_FLUSH_INTERVAL_S=1, up to 20 batches of 4000 per flush run,
EVENT_BUFFER_RETRY_BACKOFF_MAX_S=4), a ClickHouse 26.x server (chDB's engine
serving the native protocol, tests/support/native_server.py) and
`EventProducer` in this process sending the fault suite's reference sessions
(40 interleaved, micro-batched by the 10 ms timer) at `--outage-rate` events/s
(`Stack` and `Load` of tests/support/fault_stack.py and fault_load.py).

After a warm-up the normal flush rate is measured (rows acknowledged out of
the buffer per second, `events:saved`), then the server is stopped for
`--outage-s` seconds while the stream goes on, and started again. Two ways
(`--outage-redis`):

- `full`: Redis' `maxmemory` is sized, from the bytes per event measured in
  the outage's first seconds, to fill about half-way through it. Ingest then
  pauses, the broker refuses tasks, and the producer holds them: the backlog
  sits in the buffer, in the broker and in the producer, and drains through
  all three (the producer's retry backs off up to 30 s);
- `unlimited`: no `maxmemory`; the backlog is all in the buffer, so its drain
  rate is the flush's own ceiling.

The backlog is what the producer had accepted when ClickHouse answered
again minus the rows acknowledged by then, split into buffer rows (queued),
events the producer held, and the rest (in broker tasks, or held in the
buffer as a session's last view or by the reorder window). It is drained
once the acknowledged rows reach what had been accepted at the restart
(the stream goes on meanwhile). Reported: the time from the restart to
then, the time to the first flush after it (the flush's backoff), and the
drain rate = rows acknowledged during the drain per second, from the first
flush after the restart (new arrivals included: what the flush did), also
as a ratio to the normal flush rate. Events that arrived during the drain
may still be queued behind it (held by the producer, in broker tasks): the
run then waits, up to `CATCH_UP_S`, until the producer holds under a second
of arrivals and the broker under 50 tasks ("caught up"; with a full Redis
that may not happen at all: then it says so). `drain_timeline` in the JSON
samples, once a second from the restart, where the backlog is. Afterwards
the stream stops, the pipeline drains, and ClickHouse is tallied against
every id the producer accepted (missing / duplicated rows).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.support import Result, log, skipped
from tests.support.fault_load import Load, wait
from tests.support.fault_processes import logs
from tests.support.fault_stack import Stack
from tests.support.native_server import ChdbServer, chdb_serves
from worker import producer as producer_module
from worker.errors import ProducerError

VARIANTS = ("full", "unlimited")
FILL_AT = 0.5  # `full`: Redis reaches maxmemory about this far into the outage
FULL = 0.99  # used_memory this close to maxmemory: full (writes are refused at the edge)
WIDTH = 40  # interleaved sessions open at once
SPACING_MS = 2_000  # between sessions' start times (ReferenceTraffic)
CATCH_UP_S = 90.0  # after the drain, how long to wait for the producer and broker to catch up
FINISH_S = 300.0  # once the stream stops, how long the producer may take to send what it holds
BACKOFF_MAX_S = 4  # EVENT_BUFFER_RETRY_BACKOFF_MAX_S: the flush retries at least this often
PAUSE = re.compile(r"ingest paused: .*?(?:\((\d+) brief pause\(s\) before this one\))?\. Tasks")


@dataclass
class Outcome:
    """One run of the scenario, as measured."""

    variant: str
    outage_s: float
    arrival_rate: float  # events/s the producer accepted before the outage
    normal_flush_rate: float  # rows/s acknowledged before the outage
    backlog: int  # accepted, not yet acknowledged, when ClickHouse answered again
    buffer_rows: int
    producer_held: int
    elsewhere: int  # broker tasks, session last views, reorder window
    broker_tasks: int
    restart_s: float  # stopping to answering again: how long the server took to start
    first_flush_s: float  # from the restart to the first rows acknowledged
    drain_s: float  # from the restart until the backlog was acknowledged
    # From the restart until the producer and broker hold no backlog; None: not within
    # CATCH_UP_S after the drain.
    caught_up_s: float | None
    drained_rows: int  # rows acknowledged after the first acknowledgement since the restart
    maxmemory: int  # 0: unlimited
    full_after_s: float | None  # into the outage, when used_memory reached maxmemory
    pauses: int  # ingest pauses (announced ones plus the brief ones they count)
    buffer_full: int  # BufferFull from the producer's send()
    sent: int
    missing: int | None  # None: not tallied (stuck: the producer still held events)
    duplicated: int | None
    wrong_durations: int | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def drain_rate(self) -> float:
        """Rows/s the flush acknowledged while draining (from its first ack after the restart)."""
        window = self.drain_s - self.first_flush_s
        if window < 0.5 or self.drained_rows <= 0:  # drained at once: no window to divide by
            return self.backlog / max(self.drain_s, 0.001)
        return self.drained_rows / window

    @property
    def net_rate(self) -> float:
        """The backlog over the whole time from the restart (the flush's backoff included)."""
        return self.backlog / max(self.drain_s, 0.001)

    @property
    def ratio(self) -> float:
        return self.drain_rate / max(self.normal_flush_rate, 0.001)


def count_pauses(text: str) -> int:
    """Ingest pauses in worker logs: each announced one, plus the brief ones it reports."""
    return sum(1 + int(brief or 0) for brief in PAUSE.findall(text))


def maxmemory_for(used_now: int, growth_per_s: float, seconds_left: float) -> int:
    """A `maxmemory` that Redis, growing as it does now, reaches in `seconds_left` (and
    at least 1 MiB above what it uses now, which would refuse writes at once)."""
    return used_now + max(int(growth_per_s * seconds_left), 1 << 20)


class ProducerLog(logging.Handler):
    """Counts the producer's "not sent" warnings (and their errors) instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.not_sent = 0
        self.errors: Counter[str] = Counter()
        self.retries: list[tuple[float, float]] = []  # (when, the delay announced)

    def emit(self, record: logging.LogRecord) -> None:
        if "not sent" in str(record.msg) and isinstance(record.args, tuple):
            self.not_sent += 1
            self.errors[str(record.args[-1])[:120]] += 1
            self.retries.append((time.monotonic(), float(record.args[-2])))  # type: ignore[arg-type]

    @contextlib.contextmanager
    def installed(self) -> Iterator[ProducerLog]:
        logger = logging.getLogger(producer_module.__name__)
        propagate = logger.propagate
        logger.addHandler(self)
        logger.propagate = False
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.propagate = propagate


TIMELINE = (
    "(s after the restart, backlog left, buffer rows, held by the producer, broker tasks, "
    "used_memory, of which clients' buffers (mem_clients_normal), keys)"
)


def sample(stack: Stack, load: Load, at: float, backlog: int) -> tuple[float, ...]:
    """One line of the drain's timeline (`TIMELINE`)."""
    memory = stack.redis.info("memory")
    return (
        round(at, 1),
        backlog,
        stack.queued(),
        load.producer.stats.pending,
        stack.broker_backlog(),
        int(memory["used_memory"]),
        int(memory.get("mem_clients_normal", 0)),
        int(stack.redis.dbsize()),
    )


def caught_up(stack: Stack, load: Load, arrival: float) -> bool:
    """The producer holds under a second of arrivals and the broker under 50 tasks."""
    return load.producer.stats.pending <= arrival and stack.broker_backlog() < 50


def used_memory(stack: Stack) -> tuple[int, int]:
    info = stack.redis.info("memory")
    return int(info["used_memory"]), int(info["maxmemory"])


def scenario(args: argparse.Namespace, variant: str, tmp: Path) -> Outcome:
    with ProducerLog().installed() as producer_log:
        outcome = measure(args, variant, tmp)
    back_at = outcome.extra["back_at"]
    after = [delay for when, delay in producer_log.retries if when >= back_at]
    # The producer's retry waiting when ClickHouse came back: its next send was due then.
    pending = [when + delay - back_at for when, delay in producer_log.retries if when < back_at]
    outcome.extra.update(
        producer_not_sent=producer_log.not_sent,
        producer_errors=dict(producer_log.errors.most_common(5)),
        producer_refused_after_restart=len(after),
        producer_next_retry_after_restart_s=max(0.0, pending[-1]) if pending else None,
    )
    return outcome


def measure(args: argparse.Namespace, variant: str, tmp: Path) -> Outcome:
    rate, outage_s = float(args.outage_rate), float(args.outage_s)
    normal_s = 8.0 if args.quick else 15.0
    server = ChdbServer(tmp / "clickhouse-server")
    server.start()
    stacks: list[Stack] = []
    try:
        stack = Stack(
            tmp / "stack",
            CLICKHOUSE_URL=server.url,
            EVENT_BUFFER_RETRY_BACKOFF_MAX_S=str(BACKOFF_MAX_S),
        )
        stacks.append(stack)
        stack.readme_layout(ready_s=90)
        # Sessions 2 s apart in time (not the model's 5 min): a long stream's dates
        # stay inside the accepted window (millions of events from 30 days ago).
        load = stack.load(rate, spacing_ms=SPACING_MS, sessions_per_batch=None, width=WIDTH,
                          max_events=10**9)  # fmt: skip
        load.start()
        wait(lambda: stack.saved.rows >= 2_000, 120, "a first flush")
        time.sleep(2)
        rows0, sent0, t0 = stack.saved.rows, load.count, time.monotonic()
        time.sleep(normal_s)
        elapsed = time.monotonic() - t0
        normal_rate = (stack.saved.rows - rows0) / elapsed
        arrival = (load.count - sent0) / elapsed
        log(
            f"[outage] {variant}: before the outage {arrival:,.0f} ev/s accepted, "
            f"{normal_rate:,.0f} rows/s flushed ({elapsed:.0f} s)"
        )

        sent_down = load.count
        server.stop()
        down_at = time.monotonic()
        maxmemory = 0
        full_at: float | None = None
        if variant == "full":
            # Redis' growth rate, past the outage's first second (a failed claim, the
            # reorder window's first releases), extrapolated to FILL_AT of the outage.
            time.sleep(1.0)
            used1, sent1, at1 = used_memory(stack)[0], load.count, time.monotonic()
            time.sleep(max(1.0, outage_s / 4 - 1.0))
            used, _ = used_memory(stack)
            now = time.monotonic()
            growth = (used - used1) / (now - at1)
            per_event = (used - used1) / max(load.count - sent1, 1)
            maxmemory = maxmemory_for(used, growth, down_at + FILL_AT * outage_s - now)
            stack.redis.config_set("maxmemory", maxmemory)
            log(
                f"[outage] {variant}: Redis grows {growth / 1024:,.0f} KiB/s "
                f"({per_event:,.0f} bytes/event); maxmemory {maxmemory:,} (used {used:,})"
            )
        peak_tasks = 0
        while time.monotonic() < down_at + outage_s:
            used, limit = used_memory(stack)
            if full_at is None and limit and used >= FULL * limit:
                full_at = time.monotonic() - down_at
            peak_tasks = max(peak_tasks, stack.broker_backlog())
            time.sleep(0.5)

        stopped_at = time.monotonic()
        server.start()
        back_at = time.monotonic()
        accepted, saved = load.count, stack.saved.rows
        pending = load.producer.stats.pending
        queued, tasks = stack.queued(), stack.broker_backlog()
        backlog = accepted - saved
        log(
            f"[outage] {variant}: ClickHouse back after {back_at - down_at:.0f} s "
            f"(start took {back_at - stopped_at:.1f} s); backlog {backlog:,} events: "
            f"{queued:,} buffer rows, {pending:,} held by the producer, "
            f"{backlog - queued - pending:,} elsewhere ({tasks:,} broker tasks)"
        )
        # The drain rate runs from the first acknowledgement after the restart, without
        # its rows (flushed before it): rows acknowledged after it, per second.
        first_at: float | None = None
        first_rows = saved
        deadline = back_at + 900
        timeline: list[tuple[float, ...]] = []  # where the backlog is, once a second
        while stack.saved.rows < accepted:
            if load.errors:
                raise RuntimeError(f"the load stopped: {load.errors}")
            rows, now = stack.saved.rows, time.monotonic()
            if first_at is None and rows > saved:
                first_at, first_rows = now, rows
            if not timeline or now - back_at >= timeline[-1][0] + 1:
                timeline.append(sample(stack, load, now - back_at, accepted - rows))
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"backlog not drained in 900 s: {stack.saved.rows:,} of {accepted:,} rows"
                )
            time.sleep(0.05)
        drained_at = time.monotonic()
        drained_rows = stack.saved.rows - first_rows
        if first_at is None:
            first_at = drained_at
        log(
            f"[outage] {variant}: drained in {drained_at - back_at:.1f} s (first flush "
            f"after {first_at - back_at:.1f} s), {drained_rows:,} rows"
        )
        # Caught up: the producer holds under a second of arrivals again and the broker
        # no backlog of tasks (arrivals during the drain may have queued behind it).
        # Bounded: a full Redis may never catch up at this rate (the producer would reach
        # max_pending); then the stream stops and what it handed over is still tallied.
        give_up = drained_at + CATCH_UP_S
        caught_up_at: float | None = None
        while caught_up_at is None and time.monotonic() < give_up:
            if load.errors:
                raise RuntimeError(f"the load stopped: {load.errors}")
            now = time.monotonic()
            if caught_up(stack, load, arrival):
                caught_up_at = now
            elif not timeline or now - back_at >= timeline[-1][0] + 1:
                timeline.append(sample(stack, load, now - back_at, accepted - stack.saved.rows))
            time.sleep(0.1)
        held_then = load.producer.stats.pending
        if caught_up_at is None:
            log(
                f"[outage] {variant}: not caught up {CATCH_UP_S:.0f} s after the drain: the "
                f"producer holds {held_then:,} events; the stream stops"
            )
        else:
            log(f"[outage] {variant}: caught up {caught_up_at - back_at:.1f} s after the restart")
        time.sleep(2)  # the stream goes on a little after the drain too
        stuck = ""
        try:
            load.finish(timeout=FINISH_S)
        except ProducerError as exc:  # nothing moves: report it, there is nothing to tally
            stuck = (
                f"the producer could not send in {FINISH_S:.0f} s after the stream stopped: {exc}"
            )
            log(f"[outage] {variant}: STUCK: {stuck}")
        pauses = count_pauses(logs(stack, "ingest"))
        if stuck:
            tally = None
        else:
            stack.wait_drained(load.count, timeout=600)
            tally = stack.finish(load)
        return Outcome(
            variant=variant,
            outage_s=outage_s,
            arrival_rate=arrival,
            normal_flush_rate=normal_rate,
            backlog=backlog,
            buffer_rows=queued,
            producer_held=pending,
            elsewhere=backlog - queued - pending,
            broker_tasks=tasks,
            restart_s=back_at - stopped_at,
            first_flush_s=first_at - back_at,
            drain_s=drained_at - back_at,
            caught_up_s=None if caught_up_at is None else caught_up_at - back_at,
            drained_rows=drained_rows,
            maxmemory=maxmemory,
            full_after_s=full_at,
            pauses=pauses,
            buffer_full=load.buffer_full,
            sent=load.count if tally is None else tally.sent,
            missing=None if tally is None else tally.missing,
            duplicated=None if tally is None else tally.duplicated,
            wrong_durations=None if tally is None else tally.wrong_durations,
            extra={
                "peak_broker_tasks": peak_tasks,
                "landed": None if tally is None else tally.landed,
                "stuck": stuck,
                "back_at": back_at,
                "accepted_during_outage": accepted - sent_down,
                # (s after the restart, backlog left, buffer rows, producer held, broker
                # tasks, used_memory, of which clients' buffers, keys)
                "drain_timeline": timeline,
                "arrival_during_outage": (accepted - sent_down) / (back_at - down_at),
                "producer_held_at_give_up": None if caught_up_at is not None else held_then,
            },
        )
    finally:
        for built in stacks:
            built.close()
        server.stop()


def results(o: Outcome) -> list[Result]:
    full = (
        f"maxmemory {o.maxmemory / 2**20:.1f} MiB, full after {o.full_after_s:.0f} s"
        if o.full_after_s is not None
        else ("maxmemory never reached" if o.maxmemory else "no maxmemory")
    )
    caught = (
        f"caught up {o.caught_up_s:.1f} s after the restart"
        if o.caught_up_s is not None
        else f"NOT caught up {CATCH_UP_S:.0f} s after the drain (the producer holding "
        f"{o.extra.get('producer_held_at_give_up', 0):,} events, growing)"
    )
    tallied = None if o.missing is None or o.duplicated is None else (o.missing, o.duplicated)
    due = o.extra.get("producer_next_retry_after_restart_s")
    retry_s = "-" if due is None else f"{due:.1f} s"
    common = dict(vars(o))
    common.pop("extra")
    common.update(o.extra, drain_rate=o.drain_rate, net_rate=o.net_rate, ratio=o.ratio)
    timeline = common.pop("drain_timeline", [])
    name = f"outage {o.outage_s:.0f} s, Redis {o.variant}"
    return [
        Result(
            name=f"{name}: drain rate",
            unit="rows/s",
            eventbuffer=o.drain_rate,
            baseline=o.normal_flush_rate,
            baseline_name="normal flush rate",
            rounds=1,
            note=(
                f"backlog {o.backlog:,} events ({o.buffer_rows:,} buffer rows, "
                f"{o.producer_held:,} held by the producer, {o.elsewhere:,} in "
                f"{o.broker_tasks:,} broker tasks and held); drained {o.drain_s:.1f} s after "
                f"the restart (first flush after {o.first_flush_s:.1f} s; backlog / that "
                f"{o.net_rate:,.0f} ev/s); accepted {o.arrival_rate:,.0f} ev/s before the "
                f"outage, {o.extra.get('arrival_during_outage', 0):,.0f} during it; {full}; "
                f"{o.pauses} ingest pause(s), "
                f"{o.buffer_full:,} BufferFull, {o.extra.get('producer_not_sent', 0):,} refused "
                f"producer sends ({o.extra.get('producer_refused_after_restart', 0)} after the "
                f"restart; next retry due {retry_s} after it); {caught}"
            ),
            extra=common,
        ),
        Result(
            name=f"{name}: time to drain",
            unit="s",
            eventbuffer=o.drain_s,
            baseline=None,
            baseline_name="-",
            rounds=1,
            better="lower",
            extra={
                "backlog": o.backlog,
                "first_flush_s": o.first_flush_s,
                "timeline": TIMELINE,
                "drain_timeline": timeline,
            },
        ),
        Result(
            name=f"{name}: time to catch up",
            unit="s",
            eventbuffer=o.caught_up_s,
            baseline=None,
            baseline_name="-",
            rounds=1,
            better="lower",
            note=(
                "until the producer holds under a second of arrivals, the broker under 50 tasks"
                + ("" if o.caught_up_s is not None else f": not within {CATCH_UP_S:.0f} s")
            ),
        ),
        Result(
            name=f"{name}: missing / duplicated",
            unit="events",
            eventbuffer=None if tallied is None else float(sum(tallied)),
            baseline=None,
            baseline_name="-",
            rounds=1,
            target="0",
            passed=None if tallied is None else tallied == (0, 0),
            better="lower",
            note=(
                f"{o.sent:,} sent: {o.missing} missing, {o.duplicated} duplicated"
                if tallied is not None
                else f"{o.sent:,} sent, not tallied: STUCK: {o.extra.get('stuck', '')}"
            ),
        ),
    ]


def run(args: argparse.Namespace) -> list[Result]:
    why_not = chdb_serves()
    if why_not is not None:
        return [skipped("outage", why_not)]
    variants = [v.strip() for v in args.outage_redis.split(",") if v.strip()]
    if set(variants) - set(VARIANTS):
        raise ValueError(f"--outage-redis: {', '.join(VARIANTS)}, not {args.outage_redis!r}")
    log(
        f"[outage] {args.outage_rate:,.0f} ev/s offered, ClickHouse down {args.outage_s:.0f} s; "
        f"Redis {', '.join(variants)}"
    )
    out: list[Result] = []
    for variant in variants:
        with tempfile.TemporaryDirectory(prefix=f"bench-outage-{variant}-") as tmp:
            out += results(scenario(args, variant, Path(tmp)))
    return out
