"""One forget request, start to end: tombstone, buffer, ClickHouse, audit.

1. The tombstone (the request's moment): from here on, ingest drops the
   person's events created up to that moment and the flusher drops them
   right before every insert (the fence).
2. One reorder window later (the person's events applied just before the
   tombstone are due by then), each shard under its flush lock: held events
   are released, then the person's queued rows, last views, dead letters and
   active-visitor entry are removed. Taking each lock once also waits out any
   flush that read the tombstones before they existed: after it, every
   insert of that shard is fenced.
3. ClickHouse: the person's rows created up to the moment are deleted.
4. The audit row.

Every step is idempotent and a later request covers an earlier one, so a
request killed anywhere is completed by running it again.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from worker.clock import SYSTEM_CLOCK, Clock
from worker.keys import Keyspace
from worker.privacy.buffer_erasure import erase_shard, hold_flush_lock
from worker.privacy.clickhouse import erase_rows, record_audit
from worker.privacy.forget_scripts import ShardRemoval
from worker.privacy.selector import Selector
from worker.privacy.tombstones import REFRESH_S, store_tombstone
from worker.settings import Settings
from worker.sinks.base import Sink
from worker.topology import Client

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What one request removed, where."""

    selector: Selector
    requested_ms: int
    tombstone_expires_ms: int = 0
    clickhouse_rows: int = 0
    buffer: ShardRemoval = field(default_factory=ShardRemoval)
    user: str = ""
    host: str = ""
    # Seconds spent per step: tombstone (with the settle wait), buffer, clickhouse, audit.
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        b = self.buffer
        return {
            "project_id": self.selector.project_id,
            "selector": self.selector.kind,
            "id": self.selector.value,
            "requested_at": _iso(self.requested_ms),
            "clickhouse_rows": self.clickhouse_rows,
            "buffer_rows": b.buffer_rows,
            "claimed_rows": b.claimed_rows,
            "last_views": b.last_views + b.profile_last_views,
            "dead_letters": b.dead_letters + b.dead_letters_rewritten,
            "visitors": b.visitors,
            "tombstone_expires_at": _iso(self.tombstone_expires_ms),
            "user": self.user,
            "host": self.host,
            "seconds": {step: round(s, 3) for step, s in self.seconds.items()},
        }

    def audit_row(self) -> dict[str, Any]:
        counts = self.as_dict()
        return {
            "requested_at": _seconds(self.requested_ms),
            "requested_ms": self.requested_ms,
            "user": self.user,
            "host": self.host,
            "project_id": self.selector.project_id,
            "selector": self.selector.kind,
            "selector_id": self.selector.value,
            **{
                name: counts[name]
                for name in (
                    "clickhouse_rows",
                    "buffer_rows",
                    "claimed_rows",
                    "last_views",
                    "dead_letters",
                    "visitors",
                )
            },
            "tombstone_expires_at": _seconds(self.tombstone_expires_ms),
        }


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _seconds(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def who() -> tuple[str, str]:
    """The user and host running the request, for the audit."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return user, socket.gethostname()


def forget(
    redis: Client,
    sink: Sink | Callable[[], AbstractContextManager[Sink]],
    settings: Settings,
    selector: Selector,
    *,
    clock: Clock = SYSTEM_CLOCK,
    settle_s: float | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> Report:
    """Erase the person's events created up to now, everywhere; returns what was removed.

    `sink`: ClickHouse, or what opens it for the ClickHouse steps only (an
    embedded ClickHouse is then left to the flush worker meanwhile).
    `settle_s`: the wait between the tombstone and the buffer (default: one
    reorder window, or ingest's tombstone refresh if longer, and a little), so
    that events applied just before the tombstone are due for release and
    every ingest process has seen it.
    """
    keyspace = Keyspace(settings.key_prefix, settings.shards)
    user, host = who()
    report = Report(selector, clock.now_ms(), user=user, host=host)
    step = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal step
        now = time.perf_counter()
        report.seconds[name] = now - step
        step = now

    report.requested_ms, report.tombstone_expires_ms = store_tombstone(
        redis, keyspace, selector, report.requested_ms, settings.forget_tombstone_days, clock
    )
    say(f"Tombstone stored until {_iso(report.tombstone_expires_ms)}.")
    if settle_s is None:
        settle_s = max(settings.reorder_window_ms / 1000, REFRESH_S) + 0.1
    if settle_s:
        time.sleep(settle_s)
    lap("tombstone")
    for shard in keyspace.all():
        lock = hold_flush_lock(redis, shard, settings)
        try:
            removed = erase_shard(redis, shard, selector, report.requested_ms, settings, clock)
        finally:
            lock.release()
        report.buffer.add(removed)
    lap("buffer")
    say(f"Buffer: {report.buffer.buffer_rows} queued row(s) removed.")
    opened = sink if callable(sink) else (lambda: nullcontext(sink))
    with opened() as clickhouse:
        report.clickhouse_rows = erase_rows(clickhouse, selector, report.requested_ms)
        lap("clickhouse")
        say(f"ClickHouse: {report.clickhouse_rows} row(s) deleted.")
        record_audit(clickhouse, report.audit_row())
        lap("audit")
    log.info("forgot %s %s of project %s", selector.kind, selector.value, selector.project_id)
    return report
