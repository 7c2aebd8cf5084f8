"""`eventbuffer status`: queues, claims, dead letters, locks, back-off, flushes, visitors,
and how full each Redis is.

Everything shown comes from `worker.state.read_state` (the one reader of the
buffer's state, which the metrics collector shows too), for the broker from
`worker.queues` and `worker.broker.holdings` (tasks held by live and dead
workers, parked messages), and for each Redis' memory (used, `maxmemory`,
policy) from `worker.redis_memory`. The table fits an 80-column terminal.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from worker import runtime
from worker.broker.holdings import broker_holdings
from worker.cli.common import mask, one_line
from worker.names import DEFAULT_QUEUE
from worker.queues import queue_depths
from worker.redis_memory import CRITICAL_RATIO, WARN_RATIO, human_bytes, memory_report
from worker.settings import Settings
from worker.state import read_state


def ago(ms: int, now_ms: int) -> str:
    seconds = max(0.0, (now_ms - ms) / 1000)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def broker_data(settings: Settings) -> dict[str, Any]:
    """The broker's queue depths, or why they could not be read (never raises)."""
    try:
        depths = queue_depths(settings.effective_broker_url)
    except Exception as exc:  # the broker is not the buffer: status still shows the buffer
        return {"url": mask(settings.effective_broker_url), "error": one_line(exc, 200)}
    return {
        "url": mask(settings.effective_broker_url),
        "queues": {d.name: {"waiting": d.waiting, "consumers": d.consumers} for d in depths},
        **held_data(settings),
    }


def held_data(settings: Settings) -> dict[str, Any]:
    """What the reliable transport's consumers hold ({"held": ...}), or {} (not a Redis
    broker, or it did not answer: the queues' line says so)."""
    try:
        holdings = broker_holdings(settings.effective_broker_url, settings.consumer_timeout_s)
    except Exception:
        return {}
    return {} if holdings is None else {"held": holdings.as_dict()}


def status_data(settings: Settings) -> dict[str, Any]:
    buffer = runtime.buffer()
    state = read_state(
        runtime.redis_client(),
        buffer.keyspace,
        buffer.clock.now_ms(),
        settings.active_visitor_window_s,
        settings.effective_min_replicas,
    )
    return {
        "redis": mask(settings.redis_url),
        "key_prefix": settings.key_prefix,
        **state.as_dict(),
        "active_visitor_window_s": settings.active_visitor_window_s,
        "broker": broker_data(settings),
        "memory": [m.as_dict() for m in memory_report(settings, runtime.redis_client())],
    }


def lock_text(lock: dict[str, Any] | None) -> str:
    """A shard's lock in a table cell: busy (a fresh heartbeat) or STALE, and the heartbeat's age.

    `lock_lines` says who holds it.
    """
    if lock is None:
        return "free"
    age_ms = lock["heartbeat_age_ms"]
    if lock["holder"] is None or age_ms is None:  # a holder that does not say: its TTL left
        return f"{lock['token'][:6]}… {lock['ttl_ms'] / 1000:.0f}s"
    return f"{'STALE' if lock['stale'] else 'busy'} {age_ms / 1000:.0f}s"


def lock_lines(shards: list[dict[str, Any]]) -> list[str]:
    """Who holds each held lock, and whether it is at work (fresh) or looks dead (stale)."""
    lines = []
    for s in shards:
        lock = s["lock"]
        if lock is None:
            continue
        head = f"Shard {s['shard']} lock:"
        age_ms = lock["heartbeat_age_ms"]
        if lock["holder"] is None or age_ms is None:
            left = f"{lock['ttl_ms'] / 1000:.0f} s left"
            lines.append(f"{head} token {lock['token']}, {left} (the holder does not say who)")
            continue
        holder = f"{lock['holder']['host']}:{lock['holder']['pid']}"
        beat = f"heartbeat {age_ms / 1000:.0f} s ago"
        if lock["stale"]:
            lines.append(f"! {head} {holder}, {beat}, STALE: looks dead, the next flush takes over")
        else:
            lines.append(f"{head} {holder}, {beat}, fresh: a flush is at work")
    return lines


def master_lines(data: dict[str, Any]) -> list[str]:
    """Where the shards live and whether their masters have the replicas ingest waits for."""
    masters = data["masters"]
    if not masters:
        return []
    lines = []
    for m in masters:
        shards = ", ".join(str(n) for n in m["shards"])
        replicas = f"{m['replicas']} replica{'s' if m['replicas'] != 1 else ''} in sync"
        lines.append(f"Master {m['node']}: shard(s) {shards}; {replicas}")
    for m in masters:
        if m["short"]:
            lines.append(
                f"! Master {m['node']} has {m['replicas']} of the {m['wanted']} replica(s) "
                f"EVENT_BUFFER_MIN_REPLICAS wants (promoted by a failover?): ingest of shard(s) "
                f"{', '.join(str(n) for n in m['shards'])} waits (its tasks retry, the batches "
                "stay in the broker) and so do their flushes, until a replica is in sync"
            )
    available = data["cluster_masters"]
    if available > 1 and len(masters) < min(available, len(data["shards"])):
        lines.append(
            f"! The {len(data['shards'])} shard(s) sit on {len(masters)} of the cluster's "
            f"{available} masters: move their slots (README: Scaling out) to spread the load"
        )
    return lines


def backoff_text(shard: dict[str, Any]) -> str:
    if shard["backoff_s"] <= 0:
        return "-"
    return f"{shard['backoff_s']:.0f}s ({shard['failures']}x)"


def broker_lines(broker: dict[str, Any]) -> list[str]:
    """The broker's queues on one line, and a warning for tasks nobody may consume."""
    if "error" in broker:
        return [f"Broker {broker['url']}: cannot read its queues ({broker['error']})"]
    queues = broker.get("queues", {})
    if not queues:
        return []
    parts = []
    for name, depth in queues.items():
        consumers = depth["consumers"]
        part = f"{name} {depth['waiting']:,}"
        if consumers is not None:
            part += f" ({consumers} consumer{'s' if consumers != 1 else ''})"
        parts.append(part)
    lines = ["Broker queues (tasks waiting): " + ", ".join(parts)]
    default = queues.get(DEFAULT_QUEUE)
    if default and default["waiting"] and default["consumers"] in (None, 0):
        who = "nobody consumes it" if default["consumers"] == 0 else "is a worker consuming it?"
        lines.append(
            f"! {default['waiting']:,} task(s) wait in Celery's default queue "
            f"`{DEFAULT_QUEUE}` ({who}): run ingest workers with -Q ingest,{DEFAULT_QUEUE}, "
            "or send with queue='ingest'"
        )
    return lines


def _servers(memory: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any] | None, str]]:
    """(node, roles, its reading or None, the error) per server, buffer and broker merged."""
    servers: dict[str, list[dict[str, Any]]] = {}
    for m in memory:
        servers.setdefault(m["node"], []).append(m)
    out = []
    for node, found in servers.items():
        roles = ", ".join(dict.fromkeys(m["redis"] for m in found))
        readings = [m for m in found if "error" not in m]
        out.append((node, roles, readings[0] if readings else None, found[0].get("error", "")))
    return out


def memory_table(memory: list[dict[str, Any]]) -> Table | None:
    """Each Redis (the buffer's masters, the broker): used memory, maxmemory, share, policy."""
    rows = [(n, r, m) for n, r, m, _ in _servers(memory) if m is not None]
    if not rows:
        return None
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    table.add_column("redis", no_wrap=True)
    table.add_column("for", no_wrap=True)
    for column in ("used", "maxmemory", "%"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("policy", no_wrap=True)
    for node, roles, m in rows:
        limited = m["maxmemory_bytes"] > 0
        table.add_row(
            node,
            roles,
            human_bytes(m["used_bytes"]),
            human_bytes(m["maxmemory_bytes"]) if limited else "no limit",
            f"{100 * m['used_ratio']:.0f}" if limited else "-",
            m["policy"],
        )
    return table


def memory_lines(memory: list[dict[str, Any]], short: bool = False) -> list[str]:
    """What needs an operator: a Redis whose memory could not be read, a policy that evicts
    keys, a server past 80 % or 95 % of its maxmemory (`short`: without the advice, for
    `--watch`'s 80 columns)."""
    lines = []
    for node, roles, m, error in _servers(memory):
        head = f"Redis {node} ({roles})"
        if m is None:
            lines.append(f"! {head}: cannot read its memory ({error})")
            continue
        if m["evicts"] and short:
            lines.append(f"! {head} evicts keys ({m['policy']})")
        elif m["evicts"]:
            lines.append(
                f"! {head} evicts keys at maxmemory ({m['policy']}): events lost; "
                "`CONFIG SET maxmemory-policy noeviction` (and in redis.conf)"
            )
        ratio = m["used_ratio"]
        if ratio is not None and ratio >= WARN_RATIO:
            level = "critical" if ratio >= CRITICAL_RATIO else "warning"
            advice = (
                ": at 100 % it refuses writes and ingest waits until flushes free memory; "
                "is ClickHouse up? raise maxmemory (README: How big Redis must be)"
            )
            lines.append(
                f"! {head} is at {100 * ratio:.0f} % of maxmemory ({level})"
                + ("" if short else advice)
            )
    return lines


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def held_lines(broker: dict[str, Any]) -> list[str]:
    """Tasks workers fetched and have not acknowledged (in no queue), by live and by dead
    workers, when a dead worker's come back, and the messages parked as undeliverable."""
    held = broker.get("held")
    if not held:
        return []
    lines = []
    live, dead = held["held_by_live"], held["held_by_dead"]
    if live or dead:
        lines.append(
            f"Broker tasks held by workers (fetched, not acknowledged): {live:,} by live "
            f"workers, {dead:,} by dead ones"
        )
    beat = held["beat_s"]
    for c in held["consumers"]:
        if not c["held"]:
            continue
        tasks, due = plural(c["held"], "task"), c["due_in_s"]
        if c["alive"] and c["silent"]:
            lines.append(
                f"! Worker {c['consumer']} holds {tasks} and has sent no heartbeat for "
                f"{c['silent_s']:.0f} s (one every {beat:g} s): if it is dead, they go back "
                f"to their queues within {max(0.0, due):.0f} s"
            )
        elif not c["alive"] and held["live_consumers"] == 0:
            lines.append(
                f"! Worker {c['consumer']} is dead (no heartbeat for {c['silent_s']:.0f} s) "
                f"and holds {tasks}: they go back to their queues when a worker starts on "
                "this broker (none is alive)"
            )
        elif not c["alive"] and due >= 0:
            lines.append(
                f"! Worker {c['consumer']} is dead (no heartbeat for {c['silent_s']:.0f} s) "
                f"and holds {tasks}: a live worker puts them back in their queues within "
                f"{due:.0f} s"
            )
        elif not c["alive"]:
            lines.append(
                f"! Worker {c['consumer']} is dead (no heartbeat for {c['silent_s']:.0f} s) "
                f"and holds {tasks}, overdue by {-due:.0f} s: can the live workers write "
                "to the broker (see their logs)?"
            )
    if held["parked"]:
        lines.append(
            f"! {plural(held['parked'], 'message')} kombu cannot deliver parked in "
            "_eventbuffer.broker.unparsable (README: Troubleshooting, `Cannot deliver "
            "this message`)"
        )
    return lines


def cmd_status(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    """`eventbuffer status` (and `--json`); `--watch` is `worker.cli.watch.cmd_watch`."""
    data = status_data(settings)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    now = data["now_ms"]
    table = Table(
        title=f"Buffer at {data['redis']} (prefix {data['key_prefix']!r})",
        box=box.SIMPLE_HEAD,
        padding=(0, 0),
        pad_edge=False,
    )
    for column in ("shard", "queued", "claimed", "dead", "views", "held"):
        table.add_column(column, justify="right", no_wrap=True)
    for column in ("lock", "back-off", "last flush"):
        table.add_column(column, no_wrap=True)
    for s in data["shards"]:
        claim, last = s["claimed"], s["last_flush"]
        table.add_row(
            str(s["shard"]),
            f"{s['queued']:,}",
            "-" if claim is None else f"{claim['count']:,} {claim['age_s']:.0f}s",
            f"{s['dead_letters']:,}",
            f"{s['waiting_views']:,}",
            f"{s['held_sessions']:,}",
            lock_text(s["lock"]),
            backoff_text(s),
            "never" if last is None else f"{ago(last['at_ms'], now)}: {last['rows']:,}",
        )
    console.print(table)
    # Prose wraps at the terminal's width (the CLI's console does not wrap by default).
    say = partial(console.print, soft_wrap=False)
    say("views: screen_views waiting for their session's next view")
    say("held: sessions whose events the reorder window holds, not yet given to them")
    for line in lock_lines(data["shards"]):
        say(line)
    for line in master_lines(data):
        say(line)
    backing_off = [s for s in data["shards"] if s["backoff_s"] > 0]
    if backing_off:
        shards = ", ".join(str(s["shard"]) for s in backing_off)
        say(
            f"Shard(s) {shards} back off after ClickHouse failures; Beat's flushes skip "
            "them until the back-off ends (`eventbuffer flush` does not wait)."
        )
    if data["flush_pending"]:
        say("An early flush has been requested (queue past the high-water mark).")
    for line in broker_lines(data["broker"]) + held_lines(data["broker"]):
        say(line)
    memory = memory_table(data["memory"])
    if memory is not None:
        console.print(memory)
    for line in memory_lines(data["memory"]):
        say(line)
    window = data["active_visitor_window_s"]
    if data["active_visitors"]:
        visitors = Table(title=f"Active visitors (last {window} s)", box=box.SIMPLE_HEAD)
        visitors.add_column("project")
        visitors.add_column("visitors", justify="right")
        for project, count in data["active_visitors"].items():
            visitors.add_row(project, f"{count:,}")
        console.print(visitors)
    else:
        say(f"No active visitors in the last {window} s.")
    return 0
