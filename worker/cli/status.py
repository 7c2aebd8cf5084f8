"""`eventbuffer status`: queues, claims, dead letters, locks, last flushes, active visitors."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from worker import runtime
from worker.cli.common import mask, waiting_views
from worker.lock import lock_holder
from worker.metrics import head_age_seconds
from worker.settings import Settings


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
        pipe.lindex(shard.queue, 0)
        queued, raw_claim, dead, raw_stats, head = pipe.execute()
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
                # now - created_at of the queue's head row (event time), 0 when empty.
                "oldest_event_age_s": round(head_age_seconds(head, now), 3),
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
    if getattr(args, "watch", False):
        from worker.cli.watch import watch

        return watch(args, settings, console, status_data)
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
