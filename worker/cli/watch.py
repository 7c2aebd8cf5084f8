"""`eventbuffer status --watch`: a live view of the buffer, refreshed every second.

Each refresh reads the same data as `eventbuffer status` (`status_data`)
and shows, per shard, the queue depth with a sparkline of recent refreshes,
the open claim, the oldest queued event's age, dead letters, the lock
(busy or STALE, and its holder below the table), the back-off after
ClickHouse failures and the last flush; then the ingest and flush rates,
who holds each held lock, the broker's queues (with the tasks live and
dead workers hold, and parked messages), each Redis' used memory,
`maxmemory` and policy, and the active visitors per project. It fits an
80-column terminal.

Rates come from running totals the ack script keeps per shard (rows
inserted, rows taken off the queue), over the last `RATE_WINDOW_S` seconds
(or since the first refresh, if that is shorter), so a flush every 10 s
reads as a steady rate instead of flickering between 0 and a burst:

- flushed: rows inserted into ClickHouse;
- ingested: queue growth plus the rows taken off the queue (rows entering
  the queue: a screen_view counts when its session's next view queues it).

Ctrl-C stops it (exit 0); `--iterations N` stops after N refreshes.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from worker.cli.common import one_line
from worker.cli.status import (
    backoff_text,
    broker_lines,
    held_lines,
    lock_lines,
    lock_text,
    memory_lines,
    memory_table,
    status_data,
)
from worker.redis_errors import REDIS_FAILURES
from worker.settings import Settings

SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 40  # refreshes kept for the sparklines
SPARK_WIDTH = 8  # characters of depth history shown per shard
RATE_WINDOW_S = 30.0  # the rates are averages over this long
TOP_PROJECTS = 10  # projects shown in the visitors table


def sparkline(values: list[int] | deque[int], width: int = HISTORY) -> str:
    """One character per value, scaled from 0 to the largest value shown."""
    shown = list(values)[-width:]
    if not shown:
        return ""
    top = max(shown)
    if top <= 0:
        return SPARK[0] * len(shown)
    return "".join(SPARK[min(len(SPARK) - 1, v * (len(SPARK) - 1) // top)] for v in shown)


def duration(seconds: float) -> str:
    if seconds < 1:
        return "0s" if seconds <= 0 else "<1s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


@dataclass
class Rates:
    ingested_per_s: float | None = None
    flushed_per_s: float | None = None


@dataclass(frozen=True)
class _Totals:
    at: float  # monotonic seconds
    queued: int
    inserted: int  # rows inserted, summed over the shards' running totals
    removed: int  # rows taken off the queues, likewise


def _totals(data: dict[str, Any], at: float) -> _Totals:
    shards = data["shards"]
    return _Totals(
        at,
        data["totals"]["queued"],
        sum(s.get("rows_total", 0) for s in shards),
        sum(s.get("removed_total", 0) for s in shards),
    )


@dataclass
class WatchState:
    """What the view remembers between refreshes: depth history and the totals for the rates."""

    depth: dict[int, deque[int]] = field(default_factory=dict)
    rates: Rates = field(default_factory=Rates)
    totals: deque[_Totals] = field(default_factory=deque)
    refreshes: int = 0
    error: str | None = None
    window_s: float = RATE_WINDOW_S

    def update(self, data: dict[str, Any], at: float) -> None:
        """Take a new snapshot taken at monotonic time `at`."""
        for shard in data["shards"]:
            self.depth.setdefault(shard["shard"], deque(maxlen=HISTORY)).append(shard["queued"])
        now = _totals(data, at)
        self.totals.append(now)
        # Keep one sample at or before the window's start, as the rates' base.
        while len(self.totals) > 2 and self.totals[1].at <= at - self.window_s:
            self.totals.popleft()
        base = self.totals[0]
        if now.at > base.at:
            elapsed = now.at - base.at
            removed = max(0, now.removed - base.removed)
            self.rates = Rates(
                ingested_per_s=max(0, now.queued - base.queued + removed) / elapsed,
                flushed_per_s=max(0, now.inserted - base.inserted) / elapsed,
            )
        self.refreshes += 1
        self.error = None


def render(data: dict[str, Any], state: WatchState, high_water: int) -> RenderableType:
    """The whole view for one snapshot (a pure function of its inputs: tests render it)."""
    now = data["now_ms"]
    shards = Table(box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False, title_justify="left")
    for column in ("shard", "queued", "history", "claimed", "oldest", "dead"):
        shards.add_column(column, justify="left" if column == "history" else "right", no_wrap=True)
    for column in ("lock", "back-off", "flushed"):
        shards.add_column(column, no_wrap=True)
    for s in data["shards"]:
        claim, last = s["claimed"], s["last_flush"]
        history = state.depth.get(s["shard"], deque())
        over = s["queued"] > high_water
        shards.add_row(
            str(s["shard"]),
            Text(f"{s['queued']:,}", style="bold yellow" if over else ""),
            Text(sparkline(history, SPARK_WIDTH), style="cyan"),
            "-" if claim is None else f"{claim['count']:,} {duration(claim['age_s'])}",
            duration(s.get("oldest_event_age_s", 0.0)) if s["queued"] else "-",
            Text(f"{s['dead_letters']:,}", style="red" if s["dead_letters"] else ""),
            lock_text(s["lock"]),
            Text(backoff_text(s), style="red" if s["backoff_s"] > 0 else ""),
            "never" if last is None else f"{duration((now - last['at_ms']) / 1000)} ago",
        )

    def rate(value: float | None) -> str:
        return "…" if value is None else f"{value:,.0f}/s"

    totals = data["totals"]
    summary = Table.grid(padding=(0, 2))
    averaged = f"{state.window_s:.0f} s avg"
    summary.add_row(
        f"ingest {rate(state.rates.ingested_per_s)} ({averaged})",
        f"flush {rate(state.rates.flushed_per_s)} ({averaged})",
        f"queued {totals['queued']:,}",
        f"in flight {totals['claimed']:,}",
        f"dead {totals['dead_letters']:,}",
        f"views {totals['waiting_views']:,}",
        f"held {totals['held_sessions']:,}",
    )
    parts: list[RenderableType] = [shards, summary]
    parts.extend(Text(line) for line in lock_lines(data["shards"]))
    if data["flush_pending"]:
        parts.append(Text("An early flush has been requested (queue past the high-water mark)."))
    parts.extend(Text(line) for line in broker_lines(data.get("broker", {})))
    parts.extend(Text(line) for line in held_lines(data.get("broker", {})))
    memory = memory_table(data.get("memory", []))
    if memory is not None:
        parts.append(memory)
    for line in memory_lines(data.get("memory", []), short=True):
        parts.append(Text(line, style="bold red" if line.startswith("!") else ""))
    visitors = sorted(data["active_visitors"].items(), key=lambda item: (-item[1], item[0]))
    window = data["active_visitor_window_s"]
    if visitors:
        table = Table(
            title=f"Active visitors (last {window} s)",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            min_width=40,
        )
        table.add_column("project")
        table.add_column("visitors", justify="right")
        for project, count in visitors[:TOP_PROJECTS]:
            table.add_row(project, f"{count:,}")
        if len(visitors) > TOP_PROJECTS:
            rest = sum(count for _, count in visitors[TOP_PROJECTS:])
            table.add_row(f"{len(visitors) - TOP_PROJECTS} more projects", f"{rest:,}")
        parts.append(table)
    else:
        parts.append(Text(f"No active visitors in the last {window} s."))
    if state.error:
        parts.append(Text(state.error, style="bold red"))
    at = time.strftime("%H:%M:%S", time.localtime(data["now_ms"] / 1000))
    title = f"eventbuffer · {data['redis']} · as of {at} · Ctrl-C stops"
    return Panel(Group(*parts), title=title, title_align="left", expand=False)


def watch(
    args: argparse.Namespace,
    settings: Settings,
    console: Console,
    snapshot: Callable[[Settings], dict[str, Any]],
) -> int:
    """Refresh every `args.interval` seconds until Ctrl-C or `args.iterations` refreshes."""
    state = WatchState()
    data = snapshot(settings)  # a Redis that does not answer now fails as one line
    state.update(data, time.monotonic())
    interval = max(0.0, float(args.interval))
    with Live(
        render(data, state, settings.high_water), console=console, auto_refresh=False
    ) as live:
        refreshes = 1
        try:
            while not args.iterations or refreshes < args.iterations:
                time.sleep(interval)
                refreshes += 1
                try:
                    data = snapshot(settings)
                    state.update(data, time.monotonic())
                except REDIS_FAILURES as exc:  # keep watching: Redis may come back
                    state.error = one_line(f"cannot read Redis: {exc}")
                live.update(render(data, state, settings.high_water), refresh=True)
        except KeyboardInterrupt:
            pass
    if not console.is_terminal:
        console.line()  # a terminal got one from Live; a file or pipe ends the frame here
    return 0


def cmd_watch(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    """`eventbuffer status --watch`."""
    return watch(args, settings, console, status_data)
