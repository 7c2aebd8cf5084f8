"""`eventbuffer status --watch`: a live view of the buffer, refreshed every second.

Each refresh reads the same data as `eventbuffer status` (`status_data`)
and shows, per shard, the queue depth as a bar and a sparkline of recent
refreshes, the open claim, the oldest queued event's age, dead letters, the
lock holder and the last flush; then the ingest and flush rates and the
active visitors per project.

Rates come from the differences between two refreshes:

- flushed: the rows of every new acknowledged claim (a shard's stats hash
  holds its last flush: several flushes of one shard between two refreshes
  count as the last one only, so keep the interval at or below the flush
  interval);
- ingested: queue growth plus the rows those acknowledgements removed
  (rows entering the queue: a screen_view counts when its session's next
  view queues it).

Ctrl-C stops it (exit 0); `--iterations N` stops after N refreshes.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from worker.cli.common import one_line
from worker.settings import Settings

SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 40  # refreshes kept for the sparklines and the rates
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
        return "0 s" if seconds <= 0 else "<1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Rates:
    ingested_per_s: float | None = None
    flushed_per_s: float | None = None


@dataclass
class WatchState:
    """What the view remembers between refreshes: depth history and the last snapshot."""

    depth: dict[int, deque[int]] = field(default_factory=dict)
    rates: Rates = field(default_factory=Rates)
    previous: dict[str, Any] | None = None
    previous_at: float = 0.0
    refreshes: int = 0
    error: str | None = None

    def update(self, data: dict[str, Any], at: float) -> None:
        """Take a new snapshot taken at monotonic time `at`."""
        for shard in data["shards"]:
            self.depth.setdefault(shard["shard"], deque(maxlen=HISTORY)).append(shard["queued"])
        if self.previous is not None and at > self.previous_at:
            elapsed = at - self.previous_at
            flushed, removed = _acknowledged(self.previous, data)
            grown = data["totals"]["queued"] - self.previous["totals"]["queued"]
            self.rates = Rates(
                ingested_per_s=max(0, grown + removed) / elapsed,
                flushed_per_s=flushed / elapsed,
            )
        self.previous, self.previous_at = data, at
        self.refreshes += 1
        self.error = None


def _acknowledged(before: dict[str, Any], after: dict[str, Any]) -> tuple[int, int]:
    """(rows inserted, rows removed from the queue) by flushes between two snapshots."""
    old = {s["shard"]: s["last_flush"] for s in before["shards"]}
    inserted = removed = 0
    for shard in after["shards"]:
        last = shard["last_flush"]
        if last is None:
            continue
        seen = old.get(shard["shard"])
        if seen is not None and (seen["claim"], seen["at_ms"]) == (last["claim"], last["at_ms"]):
            continue
        inserted += last["rows"]
        removed += last["claimed"] or last["rows"] + last["dead"]
    return inserted, removed


def render(data: dict[str, Any], state: WatchState, high_water: int) -> RenderableType:
    """The whole view for one snapshot (a pure function of its inputs: tests render it)."""
    now = data["now_ms"]
    shards = Table(expand=False, title_justify="left")
    scale = max([high_water, *(s["queued"] for s in data["shards"])])
    fill = "of high water" if scale == high_water else "of the longest"
    for column in ("shard", "queued", fill, "depth history", "claimed", "oldest", "dead"):
        shards.add_column(column, justify="right" if column in ("queued", "dead") else "left")
    shards.add_column("lock")
    shards.add_column("last flush")
    for s in data["shards"]:
        claim, lock, last = s["claimed"], s["lock"], s["last_flush"]
        history = state.depth.get(s["shard"], deque())
        shards.add_row(
            str(s["shard"]),
            f"{s['queued']:,}",
            ProgressBar(total=scale, completed=s["queued"], width=20),
            Text(sparkline(history), style="cyan"),
            "-" if claim is None else f"{claim['count']:,} ({duration(claim['age_s'])})",
            duration(s.get("oldest_event_age_s", 0.0)) if s["queued"] else "-",
            Text(f"{s['dead_letters']:,}", style="red" if s["dead_letters"] else ""),
            "free" if lock is None else f"{lock['token'][:8]}… ({lock['ttl_ms'] / 1000:.0f} s)",
            "never"
            if last is None
            else f"{duration((now - last['at_ms']) / 1000)} ago: {last['rows']:,} rows",
        )

    def rate(value: float | None, unit: str) -> str:
        return "…" if value is None else f"{value:,.1f} {unit}/s"

    totals = data["totals"]
    summary = Table.grid(padding=(0, 3))
    summary.add_row(
        f"ingest {rate(state.rates.ingested_per_s, 'rows')}",
        f"flush {rate(state.rates.flushed_per_s, 'rows')}",
        f"queued {totals['queued']:,}",
        f"in flight {totals['claimed']:,}",
        f"dead letters {totals['dead_letters']:,}",
        f"waiting views {totals['waiting_views']:,}",
    )
    parts: list[RenderableType] = [shards, summary]
    if data["flush_pending"]:
        parts.append(Text("An early flush has been requested (queue past the high-water mark)."))
    visitors = sorted(data["active_visitors"].items(), key=lambda item: (-item[1], item[0]))
    window = data["active_visitor_window_s"]
    if visitors:
        table = Table(
            title=f"Active visitors (last {window} s)", title_justify="left", min_width=40
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
    title = (
        f"eventbuffer at {data['redis']} (prefix {data['key_prefix']!r}) · "
        f"refresh {state.refreshes} · Ctrl-C to stop"
    )
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
                except RedisError as exc:  # keep watching: Redis may come back
                    state.error = one_line(f"cannot read Redis: {exc}")
                live.update(render(data, state, settings.high_water), refresh=True)
        except KeyboardInterrupt:
            pass
    if not console.is_terminal:
        console.line()  # a terminal got one from Live; a file or pipe ends the frame here
    return 0
