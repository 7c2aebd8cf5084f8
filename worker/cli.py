"""The `eventbuffer` command: a local stack in one command, and tools to look inside.

    eventbuffer run        Redis (found or started), schema, ingest + flush workers and Beat
    eventbuffer migrate    create the ClickHouse database and table (idempotent)
    eventbuffer flush      drain the buffer into ClickHouse now, in this process
    eventbuffer status     queues, claims, dead letters, locks, last flushes, active visitors
    eventbuffer query SQL  run a (read-only unless --write) query against ClickHouse
    eventbuffer demo       send realistic traffic and wait until it has landed

Expected failures (bad settings, Redis or ClickHouse unreachable, embedded
ClickHouse busy) end with ONE line on stderr: exit code 2 for bad settings
and refused usage, 1 for runtime failures. Passwords in URLs are never shown.

Embedded ClickHouse (chDB) can be open in only one process at a time: every
command opens it as late as possible, closes it right after use, and retries
for a while when another process (a flush worker) holds it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import unquote, urlsplit

from kombu.exceptions import OperationalError as BrokerError
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from worker import runtime
from worker.flush import Flusher, FlushResult
from worker.keys import ShardKeys
from worker.lock import LockLostError, lock_holder
from worker.settings import Settings, SettingsError
from worker.sinks import RetryableSinkError, Sink, SinkError, open_sink
from worker.sinks.schema import identifier

# How long a command waits for embedded ClickHouse held by another process.
BUSY_WAIT_S = 10.0
# How long `flush` waits for a shard's lock held by another flusher.
LOCK_WAIT_S = 10.0
# Backlogs from this size up get a progress bar.
PROGRESS_MIN_ROWS = 10_000
# `run`: bounded waits.
REDIS_START_S = 10.0
CHILD_STOP_S = 10.0
REDIS_STOP_S = 10.0
READY_WAIT_S = 60.0

READ_ONLY_STATEMENTS = ("SELECT", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "WITH", "EXISTS")


class CliError(Exception):
    """An expected failure: printed as one line, exits with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class ClickHouseBusy(CliError):
    """Embedded ClickHouse is held by another process."""


# -- small shared helpers ---------------------------------------------------------

_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*:)[^@\s]*@")
_QUERY_PASSWORD = re.compile(r"((?:password|passwd|pwd)=)[^&\s]*", re.IGNORECASE)


def mask(text: str) -> str:
    """`text` with the passwords of any URLs in it replaced by ***."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


def one_line(text: object, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return mask(line if len(line) <= limit else line[: limit - 1] + "…")


@cache
def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("eventbuffer")
    except PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        with suppress(OSError, tomllib.TOMLDecodeError, KeyError), pyproject.open("rb") as f:
            return f"{tomllib.load(f)['project']['version']} (source checkout)"
        return "unknown"


def is_embedded(settings: Settings) -> bool:
    return settings.clickhouse_url.startswith("chdb://")


def check_settings(settings: Settings) -> None:
    """What `Settings.from_env` cannot check alone, as `SettingsError`s naming the variable."""
    try:
        identifier(settings.clickhouse_table)
    except ValueError as exc:
        raise SettingsError(f"EVENT_BUFFER_TABLE: {exc}") from None
    if is_embedded(settings) and not settings.clickhouse_url.split("://", 1)[1].strip("/"):
        raise SettingsError(
            "CLICKHOUSE_URL: a chdb:// URL needs a path, e.g. chdb://data/clickhouse"
        )


def ago(ms: int, now_ms: int) -> str:
    seconds = max(0.0, (now_ms - ms) / 1000)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def decode_hash(raw: dict[Any, Any]) -> dict[str, str]:
    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    return {text(k): text(v) for k, v in raw.items()}


@contextmanager
def stderr_silenced() -> Iterator[None]:
    """Silence file descriptor 2: chDB's C++ side prints lock errors there itself."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def clickhouse(settings: Settings, wait_s: float | None = None) -> Iterator[Sink]:
    """A sink for the block; closed right after it.

    Embedded ClickHouse is opened at once (every sink of this process on the
    same directory shares the session), retrying for `wait_s` while another
    process holds the directory (default BUSY_WAIT_S); then `ClickHouseBusy`.
    """
    embedded = is_embedded(settings)
    deadline = time.monotonic() + (BUSY_WAIT_S if wait_s is None else wait_s)
    delay = 0.1
    while True:
        sink = open_sink(settings.clickhouse_url, settings.clickhouse_table)
        if not embedded:
            break
        try:
            with stderr_silenced():
                sink.query("SELECT 1")
            break
        except RetryableSinkError:
            sink.close()
            if time.monotonic() + delay > deadline:
                where = settings.clickhouse_url.split("://", 1)[1]
                raise ClickHouseBusy(
                    f"embedded ClickHouse at {where} is in use by another process "
                    "(a flush worker writing?); try again in a moment"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        except BaseException:
            sink.close()
            raise
    try:
        yield sink
    finally:
        sink.close()


def query_with_columns(sink: Sink, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    method: Callable[[str], tuple[list[str], list[tuple[Any, ...]]]] | None
    method = getattr(sink, "query_with_columns", None)
    if method is not None:
        columns, rows = method(sql)
        return columns, rows
    rows = sink.query(sql)
    return [f"c{n + 1}" for n in range(len(rows[0]) if rows else 0)], rows


def param(settings: Settings, name: str, ch_type: str) -> str:
    """A bound-parameter placeholder: server-side for chDB, client-side for clickhouse-driver."""
    return f"{{{name}:{ch_type}}}" if is_embedded(settings) else f"%({name})s"


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} {task.fields.get('unit', 'rows')}/s")


def progress_bar(console: Console, *, disable: bool = False) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    return Progress(*columns, RateColumn(), TimeElapsedColumn(), console=console, disable=disable)


def flush_shard(flusher: Flusher, shard: int, lock_wait_s: float) -> FlushResult | None:
    """One batch of one shard under its lock; None if another flusher kept the lock."""
    deadline = time.monotonic() + lock_wait_s
    while True:
        result = flusher.flush_shard(shard, max_batches=1)
        if result.locked:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def waiting_views(redis: Redis, shard: ShardKeys) -> int:
    """screen_views held as their session's last view (not in the queue yet)."""
    tag = re.sub(r"([*?\[\]\\])", r"\\\1", shard.tag)
    return sum(1 for _ in redis.scan_iter(match=f"{tag}:session:*", count=1000))


# -- eventbuffer migrate ----------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    table = settings.clickhouse_table
    with clickhouse(settings) as sink:
        try:
            existed = bool(int(sink.query(f"EXISTS TABLE {identifier(table)}")[0][0]))
        except SinkError:
            existed = False  # e.g. the database does not exist yet
        sink.migrate()
    where = mask(settings.clickhouse_url)
    if existed:
        console.print(f"ClickHouse {where}: table `{table}` already exists; nothing to do.")
    else:
        console.print(f"ClickHouse {where}: created table `{table}`.")
    return 0


# -- eventbuffer flush ------------------------------------------------------------


def drain_shard(
    flusher: Flusher, shard: int, total: FlushResult, advance: Callable[[], None]
) -> bool:
    """Flush `shard` batch by batch until its queue is empty, adding up into `total`.

    False if another flusher kept the shard's lock for longer than LOCK_WAIT_S.
    """
    while (result := flush_shard(flusher, shard, LOCK_WAIT_S)) is not None:
        if not result.batches:
            return True
        for name in ("rows", "dead", "batches", "redriven"):
            setattr(total, name, getattr(total, name) + getattr(result, name))
        advance()
    return False


def cmd_flush(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    buffer = runtime.buffer()
    redis = runtime.redis_client()
    backlog = {shard: n for shard, n in buffer.queue_lengths().items() if n}
    if not backlog:
        console.print("The buffer's queues are empty: nothing to flush.")
    total = FlushResult(shard=-1)
    skipped: list[str] = []
    started = time.perf_counter()
    if backlog:
        size = sum(backlog.values())
        with clickhouse(settings), progress_bar(console, disable=size < PROGRESS_MIN_ROWS) as bar:
            task = bar.add_task("flushing", total=size)

            def advance() -> None:
                done = total.rows + total.dead
                bar.update(task, completed=done, total=max(size, done))

            for shard in backlog:
                if not drain_shard(runtime.flusher(), shard, total, advance):
                    holder = lock_holder(redis, buffer.keyspace.shard(shard).lock)
                    held = f" by {holder[0]} for {holder[1] / 1000:.0f} s more" if holder else ""
                    skipped.append(f"shard {shard}: its flush lock is held{held}")
        seconds = time.perf_counter() - started
        console.print(
            f"Flushed {total.rows:,} rows to ClickHouse in {seconds:.1f} s "
            f"({total.rows / max(seconds, 1e-9):,.0f} rows/s): {total.batches} batches, "
            f"{total.redriven} re-driven, {total.dead} dead letters."
        )
    views = sum(waiting_views(redis, shard) for shard in buffer.keyspace.all())
    if views:
        console.print(
            f"{views} screen_view(s) wait as their session's last view; they are written "
            "when the session's next view or session_end arrives."
        )
    if skipped:
        raise CliError("another flush is running; skipped " + "; ".join(skipped))
    return 0


# -- eventbuffer status -----------------------------------------------------------


def status_data(settings: Settings) -> dict[str, Any]:
    buffer = runtime.buffer()
    redis = runtime.redis_client()
    now = buffer.clock.now_ms()
    shards: list[dict[str, Any]] = []
    for shard in buffer.keyspace.all():
        pipe = redis.pipeline(transaction=False)
        pipe.llen(shard.queue)
        pipe.hgetall(shard.claim)
        pipe.llen(shard.dead)
        pipe.hgetall(shard.stats)
        queued, raw_claim, dead, raw_stats = pipe.execute()
        claim, stats = decode_hash(raw_claim), decode_hash(raw_stats)
        holder = lock_holder(redis, shard.lock)
        shards.append(
            {
                "shard": shard.shard,
                "queued": int(queued),
                "claimed": None
                if "id" not in claim
                else {
                    "id": claim["id"],
                    "count": int(claim["count"]),
                    "at_ms": int(claim["at"]),
                    "age_s": round((now - int(claim["at"])) / 1000, 3),
                },
                "dead_letters": int(dead),
                "waiting_views": waiting_views(redis, shard),
                "lock": None if holder is None else {"token": holder[0], "ttl_ms": holder[1]},
                "last_flush": None
                if "at" not in stats
                else {
                    "at_ms": int(stats["at"]),
                    "at": iso(int(stats["at"])),
                    "rows": int(stats.get("rows", 0)),
                    "dead": int(stats.get("dead", 0)),
                    "claimed": int(stats.get("claimed", 0)),
                    "claim": stats.get("claim", ""),
                },
            }
        )
    visitors = {p: buffer.get_active_visitor_count(p) for p in buffer.active_projects()}
    return {
        "redis": mask(settings.redis_url),
        "key_prefix": settings.key_prefix,
        "now_ms": now,
        "flush_pending": bool(redis.exists(buffer.keyspace.flush_pending)),
        "totals": {
            "queued": sum(s["queued"] for s in shards),
            "claimed": sum(s["claimed"]["count"] for s in shards if s["claimed"]),
            "dead_letters": sum(s["dead_letters"] for s in shards),
            "waiting_views": sum(s["waiting_views"] for s in shards),
        },
        "shards": shards,
        "active_visitor_window_s": settings.active_visitor_window_s,
        "active_visitors": visitors,
    }


def cmd_status(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    data = status_data(settings)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    now = data["now_ms"]
    table = Table(title=f"Buffer at {data['redis']} (prefix {data['key_prefix']!r})")
    for column in ("shard", "queued", "claimed", "dead letters", "waiting views", "lock"):
        table.add_column(column, justify="left" if column == "lock" else "right")
    table.add_column("last flush")
    for s in data["shards"]:
        claim, lock, last = s["claimed"], s["lock"], s["last_flush"]
        table.add_row(
            str(s["shard"]),
            f"{s['queued']:,}",
            "-" if claim is None else f"{claim['count']:,} ({claim['age_s']:.0f} s old)",
            f"{s['dead_letters']:,}",
            f"{s['waiting_views']:,}",
            "free" if lock is None else f"{lock['token'][:8]}… ({lock['ttl_ms'] / 1000:.0f} s)",
            "never" if last is None else f"{ago(last['at_ms'], now)}: {last['rows']:,} rows",
        )
    console.print(table)
    if data["flush_pending"]:
        console.print("An early flush has been requested (queue past the high-water mark).")
    window = data["active_visitor_window_s"]
    if data["active_visitors"]:
        visitors = Table(title=f"Active visitors (last {window} s)")
        visitors.add_column("project")
        visitors.add_column("visitors", justify="right")
        for project, count in data["active_visitors"].items():
            visitors.add_row(project, f"{count:,}")
        console.print(visitors)
    else:
        console.print(f"No active visitors in the last {window} s.")
    return 0


# -- eventbuffer query ------------------------------------------------------------

_LEADING = re.compile(r"(?:\s+|--[^\n]*|#[^\n]*|/\*.*?(?:\*/|\Z)|\()*", re.DOTALL)


def _first_semicolon(sql: str) -> int:
    """Index of the first `;` outside quotes and comments, or -1."""
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            i += 1
            while i < n and sql[i] != c:
                i += 2 if sql[i] == "\\" else 1
            i += 1
        elif sql.startswith("--", i) or c == "#":
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c == ";":
            return i
        else:
            i += 1
    return -1


def split_statement(sql: str) -> tuple[str, bool]:
    """(the first statement without a trailing `;`, whether more statements follow)."""
    end = _first_semicolon(sql)
    if end < 0:
        return sql, False
    rest = sql[end + 1 :]
    rest = rest[_LEADING.match(rest.replace(";", " ")).end() :]  # type: ignore[union-attr]
    return sql[:end], bool(rest.strip())


def statement_keyword(sql: str) -> str:
    rest = sql[_LEADING.match(sql).end() :]  # type: ignore[union-attr]
    match = re.match(r"[A-Za-z]+", rest)
    return match.group(0).upper() if match else ""


def check_read_only(sql: str) -> None:
    statement, more = split_statement(sql)
    if more:
        raise CliError("refusing several statements at once without --write", 2)
    keyword = statement_keyword(statement)
    if keyword not in READ_ONLY_STATEMENTS:
        shown = keyword or "an empty statement"
        raise CliError(
            f"refusing {shown}: read-only by default (SELECT, SHOW, DESCRIBE, EXPLAIN, WITH, "
            "EXISTS); pass --write to run it",
            2,
        )
    if re.search(r"\bINTO\s+OUTFILE\b", statement, re.IGNORECASE):
        raise CliError("refusing INTO OUTFILE: it writes a file; pass --write to run it", 2)


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _tsv(value: Any) -> str:
    if value is None:
        return "\\N"
    return _cell(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def cmd_query(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    sql = sys.stdin.read() if args.sql == "-" else args.sql
    if not args.write:
        check_read_only(sql)
    statement, more = split_statement(sql)
    started = time.perf_counter()
    with clickhouse(settings) as sink:
        columns, rows = query_with_columns(sink, sql if more else statement)
    seconds = time.perf_counter() - started
    if args.format == "json":
        print(json.dumps({"columns": columns, "rows": rows}, ensure_ascii=False, default=str))
    elif args.format == "tsv":
        if columns:
            print("\t".join(_tsv(c) for c in columns))
        for row in rows:
            print("\t".join(_tsv(v) for v in row))
    elif not columns:
        console.print(f"OK ({seconds:.3f} s)")
    else:
        table = Table()
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(_cell(v) for v in row))
        console.print(table)
        console.print(f"{len(rows):,} row{'s' if len(rows) != 1 else ''} in {seconds:.3f} s")
    return 0


# -- eventbuffer demo -------------------------------------------------------------

DEMO_PROJECTS = {
    "demo-shop": ["/", "/products", "/products/espresso-grinder", "/cart", "/checkout"],
    "demo-blog": ["/", "/posts/buffering-events", "/posts/clickhouse-tips", "/about"],
    "demo-docs": ["/docs", "/docs/install", "/docs/api", "/docs/faq", "/changelog"],
}
DEMO_DEVICE_FIELDS = ("device", "os", "os_version", "browser", "browser_version", "brand", "model")
DEMO_DEVICES = [
    ("desktop", "Mac OS", "14.4", "Chrome", "123.0", "Apple", "Macintosh"),
    ("desktop", "Windows", "11", "Edge", "122.0", "", ""),
    ("desktop", "Linux", "", "Firefox", "124.0", "", ""),
    ("mobile", "iOS", "17.4", "Mobile Safari", "17.4", "Apple", "iPhone"),
    ("mobile", "Android", "14", "Chrome", "123.0", "Samsung", "Galaxy S23"),
    ("tablet", "iPadOS", "17.3", "Safari", "17.3", "Apple", "iPad"),
]
# (referrer, referrer_name, referrer_type)
DEMO_REFERRERS = [
    ("", "", ""),
    ("https://www.google.com/", "Google", "search"),
    ("https://duckduckgo.com/", "DuckDuckGo", "search"),
    ("https://news.ycombinator.com/", "Hacker News", "social"),
    ("https://www.linkedin.com/", "LinkedIn", "social"),
]
# (country, city, region)
DEMO_PLACES = [
    ("US", "New York", "New York"),
    ("US", "San Francisco", "California"),
    ("DE", "Berlin", "Berlin"),
    ("SE", "Stockholm", "Stockholm County"),
    ("GB", "London", "England"),
    ("FR", "Paris", "Île-de-France"),
    ("JP", "Tokyo", "Tokyo"),
    ("BR", "São Paulo", "São Paulo"),
    ("IN", "Bengaluru", "Karnataka"),
]
DEMO_BUTTONS = ["add_to_cart", "subscribe", "search", "share", "copy_code"]
DEMO_PLANS = ["free", "pro", "team"]


def demo_session(
    rng: random.Random, run_id: str, now_ms: int, profiles: int
) -> list[dict[str, Any]]:
    """One visit: screen_views seconds apart, maybe clicks and a signup, then a session_end."""
    project = rng.choice(list(DEMO_PROJECTS))
    profile = f"visitor-{rng.randrange(profiles):04d}"
    device = rng.choice(DEMO_DEVICES)
    base = {
        "project_id": project,
        "session_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "profile_id": profile,
        "device_id": f"{profile}-{device[0]}",
        "origin": f"https://{project.removeprefix('demo-')}.example.com",
        **dict(zip(DEMO_DEVICE_FIELDS, device, strict=True)),
        **dict(
            zip(
                ("referrer", "referrer_name", "referrer_type"),
                rng.choice(DEMO_REFERRERS),
                strict=True,
            )
        ),
        **dict(zip(("country", "city", "region"), rng.choice(DEMO_PLACES), strict=True)),
        "sdk_name": "eventbuffer-demo",
        "sdk_version": version().split()[0],
    }

    def event(name: str, at: int, path: str, **properties: str) -> dict[str, Any]:
        tags = {"demo_run": run_id, **properties}
        return {**base, "name": name, "path": path, "created_at": at, "properties": tags}

    events: list[dict[str, Any]] = []
    at = now_ms - rng.randrange(60_000, 30 * 60_000)
    path = "/"
    for _view in range(rng.randint(2, 6)):
        path = rng.choice(DEMO_PROJECTS[project])
        events.append(event("screen_view", at, path, title=path.strip("/") or "home"))
        gap = rng.randint(3_000, 45_000)
        if rng.random() < 0.4:
            click_at = at + rng.randint(500, gap - 500)
            events.append(event("button_click", click_at, path, button=rng.choice(DEMO_BUTTONS)))
        at += gap
    if rng.random() < 0.2:
        events.append(
            event("signup", at - 1_000, path, plan=rng.choice(DEMO_PLANS), method="email")
        )
    events.append(event("session_end", at, path))
    return events


def demo_events(
    rng: random.Random, sessions: int, run_id: str, now_ms: int
) -> list[dict[str, Any]]:
    profiles = max(2, sessions * 2 // 3)  # some visitors come back
    return [e for _ in range(sessions) for e in demo_session(rng, run_id, now_ms, profiles)]


def demo_count(sink: Sink, settings: Settings, run_id: str) -> int:
    table = identifier(settings.clickhouse_table)
    where = f"properties['demo_run'] = {param(settings, 'run', 'String')}"
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
                    while (done := flush_shard(flusher, shard.shard, 0)) and done.batches:
                        pass  # until the shard is empty, or another flusher has it
                landed = demo_count(sink, settings, run_id)
        except ClickHouseBusy:
            pass  # a flush worker is writing: look again in a moment
        bar.update(task, completed=min(landed, expected))
        if landed >= expected or time.monotonic() >= deadline:
            return landed
        time.sleep(0.5)


def demo_timeout_message(settings: Settings, landed: int, expected: int, timeout: float) -> str:
    from worker.celery_app import INGEST_QUEUE

    waiting = ""
    broker = settings.effective_broker_url
    if broker.startswith(("redis://", "rediss://", "unix://")):
        with suppress(RedisError):
            client = Redis.from_url(broker, socket_connect_timeout=2, socket_timeout=2)
            waiting = f" ({client.llen(INGEST_QUEUE)} ingest task(s) waiting in the broker)"
            client.close()
    return (
        f"timed out after {timeout:.0f} s: {landed} of {expected} demo events are in "
        f"ClickHouse. No worker seems to be consuming the `{INGEST_QUEUE}` queue{waiting}; "
        "start the local stack with `eventbuffer run` (in this directory) and try again."
    )


def cmd_demo(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    from worker.celery_app import create_app
    from worker.producer import EventProducer, ProducerError

    if args.sessions < 1:
        raise CliError("--sessions must be at least 1", 2)
    runtime.redis_client().ping()  # fail fast with a clear message
    with clickhouse(settings) as sink:
        sink.migrate()
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
    finally:
        app.close()
    if landed < len(events):
        raise CliError(demo_timeout_message(settings, landed, len(events), args.timeout))

    seconds = time.monotonic() - started
    table_name = identifier(settings.clickhouse_table)
    where = f"properties['demo_run'] = {param(settings, 'run', 'String')}"
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


# -- eventbuffer run --------------------------------------------------------------


class Stopped(Exception):
    """SIGINT or SIGTERM arrived while `run` was starting."""


class Signals:
    """SIGINT/SIGTERM set a flag instead of interrupting; a second one forces the stop."""

    def __init__(self) -> None:
        self.received = threading.Event()
        self.count = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.received.set()

    def check(self) -> None:
        if self.received.is_set():
            raise Stopped


@dataclass
class Child:
    name: str
    what: str
    process: subprocess.Popen[bytes]
    log: Path
    log_offset: int
    ready_marker: bytes | None = None
    ready: bool = False


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _redis_answers(url: str) -> bool:
    """True if Redis answers PING; False if nothing listens; CliError for other failures."""
    client = Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except (RedisConnectionError, RedisTimeoutError):
        return False
    except RedisError as exc:
        raise CliError(f"Redis at {mask(url)} answered with an error: {one_line(exc)}") from None
    finally:
        client.close()


def _last_line(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def start_private_redis(
    settings: Settings, data: Path, signals: Signals
) -> tuple[str, subprocess.Popen[bytes]]:
    """Start redis-server (AOF on) for an unreachable local REDIS_URL; returns (url, process)."""
    url = settings.redis_url
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if parts.scheme != "redis" or host not in ("127.0.0.1", "localhost", "::1"):
        raise CliError(
            f"Redis at {mask(url)} is unreachable; start it, or point REDIS_URL at a local "
            "address (e.g. unset it) so that `eventbuffer run` starts a private redis-server"
        )
    binary = shutil.which("redis-server")
    if binary is None:
        raise CliError(
            f"no Redis at {mask(url)} and no redis-server on PATH: install redis-server "
            "(e.g. `apt-get install redis-server`, `brew install redis`) or set REDIS_URL "
            "to a running Redis"
        )
    bind = "::1" if host == "::1" else "127.0.0.1"
    port = parts.port or 6379
    if not _port_free(bind, port):
        port = _free_port(bind)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + (f"[{host}]" if ":" in host else host)
    url = parts._replace(netloc=f"{netloc}:{port}").geturl()

    directory = (data / "redis").resolve()
    directory.mkdir(parents=True, exist_ok=True)
    log = (data / "logs" / "redis.log").resolve()
    # The password (if the URL has one) goes through stdin, not the command line.
    password = unquote(parts.password or "")
    command = [binary, "-"] if password else [binary]
    command += ["--port", str(port), "--bind", bind, "--dir", str(directory)]
    command += ["--appendonly", "yes", "--appendfsync", "everysec", "--logfile", str(log)]
    with log.open("ab") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if password else subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only: we stop Redis last
        )
    if password and process.stdin is not None:
        quoted = password.replace("\\", "\\\\").replace('"', '\\"')
        process.stdin.write(f'requirepass "{quoted}"\n'.encode())
        process.stdin.close()
    deadline = time.monotonic() + REDIS_START_S
    while not _redis_answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process, 1.0)
            raise CliError(f"redis-server did not start: {_last_line(log)} (log: {log})")
        if signals.received.is_set():
            stop_process(process, REDIS_STOP_S)
            raise Stopped
        time.sleep(0.05)
    return url, process


def stop_process(
    process: subprocess.Popen[bytes], timeout: float, force: Signals | None = None
) -> None:
    """SIGTERM, wait up to `timeout` (less after a second signal), then SIGKILL its group."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            process.terminate()
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if force is not None and force.count >= 2:
            break
        time.sleep(0.05)
    # The whole session: pool processes a killed worker leaves behind go too.
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _child_env(redis_url: str) -> dict[str, str]:
    env = dict(os.environ, REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").exists():  # a source checkout: children import this same code
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def spawn(name: str, what: str, celery_args: list[str], env: dict[str, str], logs: Path) -> Child:
    log = (logs / f"{name}.log").resolve()
    with log.open("ab") as out:
        offset = out.tell()
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", *celery_args, "--loglevel", "INFO"],
            cwd=os.getcwd(),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # we stop it (warm shutdown) before Redis
        )
    marker = b" ready." if celery_args[0] == "worker" else b"beat: Starting"
    return Child(name, what, process, log, offset, ready_marker=marker)


def _became_ready(child: Child) -> bool:
    if child.ready or child.ready_marker is None:
        return False
    with suppress(OSError), child.log.open("rb") as f:
        f.seek(child.log_offset)
        child.ready = child.ready_marker in f.read()
    return child.ready


def supervise(
    children: list[Child], redis: subprocess.Popen[bytes] | None, signals: Signals, console: Console
) -> str | None:
    """Wait for a signal (None) or for a process to die (its message)."""
    started = time.monotonic()
    announced = False
    while not signals.received.wait(0.25):
        for child in children:
            code = child.process.poll()
            if code is not None:
                return (
                    f"the {child.what} exited unexpectedly (exit code {code}); "
                    f"last log line: {_last_line(child.log) or '(none)'} (log: {child.log})"
                )
            if _became_ready(child):
                console.print(f"✓ {child.what} ready (pid {child.process.pid})", style="green")
        if redis is not None and redis.poll() is not None:
            return f"the private redis-server exited unexpectedly (exit code {redis.returncode})"
        if not announced and all(c.ready for c in children):
            announced = True
            console.print("Everything is up. Ctrl-C stops it all.", style="bold green")
        elif not announced and time.monotonic() - started > READY_WAIT_S:
            announced = True
            late = ", ".join(f"{c.what} (log: {c.log})" for c in children if not c.ready)
            console.print(f"Still not ready after {READY_WAIT_S:.0f} s: {late}", style="yellow")
    return None


def print_banner(
    console: Console,
    settings: Settings,
    redis: subprocess.Popen[bytes] | None,
    children: list[Child],
    default_url: str,
) -> None:
    console.print(f"eventbuffer {version()}: local stack in {os.getcwd()}", style="bold")
    how = f"private redis-server, pid {redis.pid}, AOF in data/redis" if redis else "existing"
    console.print(f"  Redis       {mask(settings.redis_url)} ({how})")
    kind = "embedded chDB" if is_embedded(settings) else "server"
    console.print(
        f"  ClickHouse  {mask(settings.clickhouse_url)} ({kind}, table "
        f"`{settings.clickhouse_table}` ready)"
    )
    for child in children:
        console.print(f"  {child.name:<10}  {child.what}, pid {child.process.pid}, log {child.log}")
    console.print(f"  Beat runs process_buffer every {settings.flush_interval_s} s.")
    console.print("Send events:")
    console.print("  eventbuffer demo                    # realistic traffic, then a summary")
    console.print("  python: from worker.producer import EventProducer")
    console.print(
        '          with EventProducer() as p: p.send({"project_id": "p1", '
        '"name": "signup", "created_at": "2026-01-01T12:00:00Z"})'
    )
    console.print("Look inside (from this directory):")
    console.print("  eventbuffer status")
    console.print(
        f'  eventbuffer query "SELECT name, count() FROM {settings.clickhouse_table} GROUP BY name"'
    )
    if settings.redis_url != default_url:
        console.print(f"In other shells first: export REDIS_URL={mask(settings.redis_url)}")


def cmd_run(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    data = Path("data")
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    signals = Signals()
    signals.install()
    redis: subprocess.Popen[bytes] | None = None
    children: list[Child] = []
    failure: str | None = None
    try:
        url = settings.redis_url
        if not _redis_answers(url):
            url, redis = start_private_redis(settings, data, signals)
        original_url = settings.redis_url
        settings = replace(settings, redis_url=url)
        runtime.configure(settings)
        signals.check()
        # Migrate, and release embedded ClickHouse before the flush worker needs it.
        with clickhouse(settings) as sink:
            sink.migrate()
        signals.check()
        env = _child_env(url)
        fast = ["--without-mingle", "--without-gossip"]
        children = [
            spawn(
                "ingest",
                "ingest worker",
                ["worker", "-Q", "ingest", "-c", "2", "-n", "ingest@%h", *fast],
                env,
                logs,
            ),
            spawn(
                "flush",
                "flush worker",
                ["worker", "-Q", "flush", "-P", "solo", "-n", "flush@%h", *fast],
                env,
                logs,
            ),
            spawn(
                "beat", "beat", ["beat", "--schedule", str(data / "celerybeat-schedule")], env, logs
            ),
        ]
        print_banner(console, settings, redis, children, original_url)
        failure = supervise(children, redis, signals, console)
    except Stopped:
        pass
    finally:
        if children or redis is not None:
            console.print("Stopping…")
        for child in children:
            if child.process.poll() is None:
                with suppress(ProcessLookupError):
                    child.process.terminate()
        for child in children:  # warm shutdown: running tasks finish first
            stop_process(child.process, CHILD_STOP_S, force=signals)
        if redis is not None:
            stop_process(redis, REDIS_STOP_S)  # SIGTERM: Redis syncs the AOF (not forced)
        signals.restore()
    if failure:
        raise CliError(failure)
    console.print("Stopped.")
    return 0


# -- the command line -------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventbuffer",
        description="Analytics events buffered in Redis, flushed into ClickHouse by Celery.",
    )
    parser.add_argument("--version", action="version", version=f"eventbuffer {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run Redis, ingest + flush workers and Beat locally")
    run.set_defaults(handler=cmd_run)

    migrate = commands.add_parser("migrate", help="create the ClickHouse table (idempotent)")
    migrate.set_defaults(handler=cmd_migrate)

    flush = commands.add_parser("flush", help="drain the buffer into ClickHouse now")
    flush.set_defaults(handler=cmd_flush)

    status = commands.add_parser("status", help="show the buffer's state")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=cmd_status)

    query = commands.add_parser("query", help="run SQL against ClickHouse")
    query.add_argument("sql", help="the statement; - reads it from stdin")
    query.add_argument("--write", action="store_true", help="allow statements that change data")
    query.add_argument(
        "--format", choices=("table", "json", "tsv"), default="table", help="output format"
    )
    query.set_defaults(handler=cmd_query)

    demo = commands.add_parser("demo", help="send demo traffic and wait until it has landed")
    demo.add_argument("--sessions", type=int, default=50, help="sessions to simulate (50)")
    demo.add_argument("--seed", type=int, default=None, help="random seed for repeatable traffic")
    demo.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the events to land (60)"
    )
    demo.set_defaults(handler=cmd_demo)
    return parser


def fail(message: str, code: int) -> int:
    print(f"eventbuffer: error: {one_line(message)}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # No markup or emoji codes: project ids, paths and query results are shown verbatim.
    console = Console(markup=False, emoji=False, highlight=False, soft_wrap=True)
    settings: Settings | None = None
    try:
        settings = Settings.from_env()
        check_settings(settings)
        runtime.configure(settings)
        return int(args.handler(args, settings, console))
    except SettingsError as exc:
        return fail(f"bad setting: {exc}", 2)
    except CliError as exc:
        return fail(str(exc), exc.code)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        where = mask(runtime.settings().redis_url) if settings else "REDIS_URL"
        return fail(f"cannot reach Redis at {where}: {exc}", 1)
    except RedisError as exc:
        return fail(f"Redis error: {exc}", 1)
    except BrokerError as exc:
        where = mask(settings.effective_broker_url) if settings else "the broker"
        return fail(f"cannot reach the Celery broker at {where}: {exc}", 1)
    except SinkError as exc:
        return fail(f"ClickHouse: {exc}", 1)
    except LockLostError as exc:
        return fail(f"flush stopped: {exc}", 1)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except OSError as exc:  # e.g. a data directory that cannot be created
        return fail(str(exc), 1)
    finally:
        runtime.reset()


if __name__ == "__main__":
    sys.exit(main())
