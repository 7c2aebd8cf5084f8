"""Helpers every command shares: errors, password masking, the version, embedded
ClickHouse opened late and retried while busy, progress bars and Redis peeks."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import cache
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from worker.errors import EventBufferError
from worker.keys import ShardKeys
from worker.logs import one_line as logs_one_line
from worker.logs import redact
from worker.settings import Settings
from worker.sinks import RetryableSinkError, Sink, sink_for
from worker.sinks.chdb import has_data, path_from_url
from worker.topology import Client

# How long a command waits for embedded ClickHouse held by another process.
BUSY_WAIT_S = 10.0

# The checkout this code runs from (it holds pyproject.toml unless installed).
SOURCE_ROOT = Path(__file__).resolve().parents[2]


# How `main` starts the one line it prints for a failure.
ERROR_PREFIX = "eventbuffer: error: "


class CliError(EventBufferError):
    """An expected failure: printed as one line, exits with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class ClickHouseBusy(CliError):
    """Embedded ClickHouse is held by another process."""


# The CLI masks secrets exactly as the logs do.
mask = redact


def one_line(text: object, limit: int = 400) -> str:
    """`worker.logs.one_line`, with the CLI's longer limit."""
    return logs_one_line(text, limit)


@cache
def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("eventbuffer")
    except PackageNotFoundError:
        import tomllib

        pyproject = SOURCE_ROOT / "pyproject.toml"
        with suppress(OSError, tomllib.TOMLDecodeError, KeyError), pyproject.open("rb") as f:
            return f"{tomllib.load(f)['project']['version']} (source checkout)"
        return "unknown"


def is_embedded(settings: Settings) -> bool:
    return settings.clickhouse_url.startswith("chdb://")


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


def missing_embedded_data(settings: Settings) -> CliError:
    """Where a command looked for embedded ClickHouse, and that nothing is there."""
    url = settings.clickhouse_url
    path = path_from_url(url)
    relative = not url.split("://", 1)[1].startswith("/")
    base = f", relative to the current directory {os.getcwd()}" if relative else ""
    return CliError(
        f"no embedded ClickHouse at {path} (CLICKHOUSE_URL={mask(url)}{base}): run this "
        "command where `eventbuffer run` runs (the directory holding data/), point "
        "CLICKHOUSE_URL at the data, or create it there with `eventbuffer migrate`"
    )


@contextmanager
def clickhouse(
    settings: Settings,
    wait_s: float | None = None,
    *,
    create: bool = False,
    readonly: bool = False,
) -> Iterator[Sink]:
    """A sink for the block; closed right after it.

    Embedded ClickHouse is opened at once (every sink of this process on the
    same directory shares the session), retrying for `wait_s` while another
    process holds the directory (default BUSY_WAIT_S); then `ClickHouseBusy`.
    With `readonly` it is opened read-only at once, so the read-only queries
    that follow need not reopen it (another process could take it between).
    Its data directory is created only with `create` (`migrate`); any other
    command finding none says where it looked.
    """
    embedded = is_embedded(settings)
    if embedded and not create and not has_data(path_from_url(settings.clickhouse_url)):
        raise missing_embedded_data(settings)
    deadline = time.monotonic() + (BUSY_WAIT_S if wait_s is None else wait_s)
    delay = 0.1
    while True:
        sink = sink_for(settings)
        if not embedded:
            break
        try:
            with stderr_silenced():
                sink.query("SELECT 1", readonly=readonly)
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


def require_embedded_data(settings: Settings) -> None:
    """Refuse to write into embedded ClickHouse that does not exist yet: a command run in
    the wrong directory would create a stray database there and flush the shared buffer
    into it. Only `migrate` and `run` create one."""
    if is_embedded(settings) and not has_data(path_from_url(settings.clickhouse_url)):
        raise missing_embedded_data(settings)


def migrate_schema(settings: Settings) -> None:
    """Create the database and table if missing; embedded ClickHouse is released after."""
    with clickhouse(settings, create=True) as sink:
        sink.migrate(retention_days=settings.retention_days)


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} {task.fields.get('unit', 'rows')}/s")


def progress_bar(console: Console, *, disable: bool = False) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    timing = (RateColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, *timing, console=console, disable=disable)


def waiting_views(redis: Client, shard: ShardKeys) -> int:
    """screen_views held as their session's last view (not in the queue yet)."""
    return int(redis.hlen(shard.views))


def stdin_is_interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def confirm(console: Console, question: str, expected: str, action: str) -> None:
    """Ask on the terminal; raise CliError unless the answer is `expected` (or y/yes)."""
    if not stdin_is_interactive():
        raise CliError(f"refusing to {action} without --yes: stdin is not a terminal to ask on", 2)
    try:
        answer = console.input(question).strip().lower()
    except EOFError:
        answer = ""
    if answer not in (expected.lower(), *(("y", "yes") if expected == "y" else ())):
        raise CliError("not confirmed: nothing was changed", 1)
