"""`eventbuffer flush`: drain the buffer into ClickHouse now, in this process."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from rich.console import Console

from worker import runtime
from worker.cli.common import CliError, clickhouse, progress_bar, waiting_views
from worker.flush import Flusher, FlushResult
from worker.lock import lock_holder
from worker.settings import Settings

# How long `flush` waits for a shard's lock held by another flusher.
LOCK_WAIT_S = 10.0
# Backlogs from this size up get a progress bar.
PROGRESS_MIN_ROWS = 10_000


def flush_shard(flusher: Flusher, shard: int, lock_wait_s: float) -> FlushResult | None:
    """One batch of one shard under its lock; None if another flusher kept the lock."""
    deadline = time.monotonic() + lock_wait_s
    while True:
        result = flusher.flush_shard(shard, max_batches=1, respect_backoff=False)
        if result.locked:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


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
