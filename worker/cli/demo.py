"""`eventbuffer demo`: send realistic traffic through Celery and wait until it has landed."""

from __future__ import annotations

import argparse
import random
import secrets
import time
from contextlib import suppress

from celery import Celery
from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from worker import runtime
from worker.cli.common import (
    ClickHouseBusy,
    CliError,
    clickhouse,
    is_embedded,
    mask,
    migrate_schema,
    progress_bar,
    require_embedded_data,
)
from worker.cli.traffic import demo_events
from worker.queues import queue_depths
from worker.settings import Settings
from worker.sinks import Sink
from worker.sinks.schema import identifier
from worker.state import read_state


def param(settings: Settings, name: str, ch_type: str) -> str:
    """A bound-parameter placeholder: server-side for chDB, client-side for clickhouse-driver."""
    return f"{{{name}:{ch_type}}}" if is_embedded(settings) else f"%({name})s"


def demo_rows(settings: Settings) -> tuple[str, str]:
    """(the quoted table, a WHERE condition on the run id bound as parameter `run`)."""
    table = identifier(settings.clickhouse_table)
    return table, f"properties['demo_run'] = {param(settings, 'run', 'String')}"


def demo_count(sink: Sink, settings: Settings, run_id: str) -> int:
    table, where = demo_rows(settings)
    rows = sink.query(f"SELECT count() FROM {table} WHERE {where}", {"run": run_id})
    return int(rows[0][0])


def demo_wait(
    settings: Settings, run_id: str, expected: int, deadline: float, bar: Progress
) -> int:
    """Poll ClickHouse until the run's rows are there, flushing in-process meanwhile."""
    task = bar.add_task("landing in ClickHouse", total=expected)
    flusher = runtime.flusher()
    landed = 0
    while True:
        try:
            with clickhouse(settings, wait_s=0) as sink:
                for shard in flusher.keyspace.all():
                    # Until the shard is empty, or another flusher has its lock.
                    while flusher.flush_shard(
                        shard.shard, max_batches=1, respect_backoff=False
                    ).batches:
                        pass
                landed = demo_count(sink, settings, run_id)
        except ClickHouseBusy:
            pass  # a flush worker is writing: look again in a moment
        bar.update(task, completed=min(landed, expected))
        if landed >= expected or time.monotonic() >= deadline:
            return landed
        time.sleep(0.5)


def demo_timeout_message(
    settings: Settings, app: Celery, landed: int, expected: int, timeout: float
) -> str:
    """Why the demo's events are not all in ClickHouse: whether any worker answers (only
    then are absent workers blamed), and where the missing ones are."""
    from worker.names import INGEST_QUEUE

    where: list[str] = []
    waiting_tasks = 0
    with suppress(Exception):  # the broker is not the buffer: say what can be read
        [depth] = queue_depths(settings.effective_broker_url, [INGEST_QUEUE])
        waiting_tasks = depth.waiting
        where.append(f"{waiting_tasks:,} ingest task(s) wait in the broker")
    state = None
    with suppress(RedisError):
        buffer = runtime.buffer()
        state = read_state(
            buffer.redis, buffer.keyspace, buffer.clock.now_ms(), settings.active_visitor_window_s
        )
        where.append(
            f"Redis has {state.queued:,} row(s) queued, {state.waiting_views:,} last view(s), "
            f"{state.held_sessions:,} session(s) held by the reorder window, "
            f"{state.dead_letters:,} dead letter(s)"
        )
    answered = 0
    with suppress(Exception):
        answered = len(app.control.ping(timeout=1.0) or [])
    head = f"timed out after {timeout:.0f} s: {landed} of {expected} demo events are in ClickHouse"
    if not answered:
        why = (
            f"No worker seems to be consuming the `{INGEST_QUEUE}` queue (none answered a "
            "ping): start the local stack with `eventbuffer run` (in this directory) and "
            "try again"
        )
    elif waiting_tasks:
        why = f"{answered} worker(s) answered a ping: they are still applying; wait longer"
    else:
        if state is not None and state.held_sessions:
            hint = (
                "views wait for the reorder window (EVENT_BUFFER_REORDER_WINDOW_MS), "
                "then the next flush"
            )
        elif state is not None and state.waiting_views:
            hint = "views wait as last views for their session's next view, end or the idle sweep"
        elif state is not None and state.dead_letters:
            hint = "see `eventbuffer dlq list`"
        else:
            hint = "see `eventbuffer status`"
        why = f"{answered} worker(s) answered a ping; {hint}"
    return f"{head}. {why}. " + "; ".join(where) + "."


def cmd_demo(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    from worker.celery import create_app
    from worker.producer import EventProducer, ProducerError

    if args.sessions < 1:
        raise CliError("--sessions must be at least 1", 2)
    runtime.redis_client().ping()  # fail fast with a clear message
    require_embedded_data(settings)  # never a stray database where the demo happens to run
    migrate_schema(settings)
    run_id = secrets.token_hex(6)
    events = demo_events(random.Random(args.seed), args.sessions, run_id, int(time.time() * 1000))
    started = time.monotonic()
    app = create_app(settings)
    try:
        with progress_bar(console) as bar:
            task = bar.add_task("sending", total=len(events), unit="events")
            producer = EventProducer(app, settings=settings)
            try:
                for event in events:
                    producer.send(event)
                    bar.advance(task)
                producer.flush(timeout=min(args.timeout, 30.0))
            except ProducerError as exc:
                where = mask(settings.effective_broker_url)
                raise CliError(
                    f"could not send the demo events to the broker at {where}: {exc}"
                ) from None
            finally:
                with suppress(ProducerError):
                    producer.close(timeout=1.0)
            landed = demo_wait(settings, run_id, len(events), started + args.timeout, bar)
            if landed < len(events):
                message = demo_timeout_message(settings, app, landed, len(events), args.timeout)
                raise CliError(message)
    finally:
        app.close()

    seconds = time.monotonic() - started
    table_name, where = demo_rows(settings)
    with clickhouse(settings) as sink:
        by_name = sink.query(
            f"SELECT name, count() AS rows FROM {table_name} WHERE {where} "
            "GROUP BY name ORDER BY rows DESC, name",
            {"run": run_id},
        )
        [(avg_ms, views)] = sink.query(
            f"SELECT avgIf(duration, duration > 0), countIf(duration > 0) FROM {table_name} "
            f"WHERE {where} AND name = 'screen_view'",
            {"run": run_id},
        )
    console.print(
        f"Demo run {run_id}: {len(events):,} events in {args.sessions} sessions "
        f"landed in ClickHouse after {seconds:.1f} s."
    )
    table = Table(title="Rows per event name")
    table.add_column("event")
    table.add_column("rows", justify="right")
    for name, count in by_name:
        table.add_row(str(name), f"{int(count):,}")
    console.print(table)
    if int(views):
        console.print(
            f"Average screen_view duration: {float(avg_ms) / 1000:.1f} s over {int(views)} "
            "views (the last view of a session has no duration)."
        )
    console.print(
        f'Explore: eventbuffer query "SELECT path, count() FROM {settings.clickhouse_table} '
        f"WHERE properties['demo_run'] = '{run_id}' GROUP BY path ORDER BY 2 DESC\""
    )
    return 0
