"""`eventbuffer flush`: drain the buffer into ClickHouse now, in this process.

A shard whose lock another flusher holds is waited for as long as that
lock can still live: its remaining TTL (at most `EVENT_BUFFER_LOCK_TTL_S`),
once per holder, looking again every `POLL_S`. A dead holder's lock is
taken over as soon as it is provably dead (`worker.lock`), else it expires
within that time; either way the flush then re-drives the open claim. Only
a live holder that keeps extending its lock past the wait makes the
command skip the shard and exit 1, naming the holder.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from rich.console import Console

from worker import runtime
from worker.cli.common import CliError, clickhouse, progress_bar, waiting_views
from worker.errors import LockHeldError
from worker.flusher import Flusher, FlushResult
from worker.lock import LockState, read_lock
from worker.settings import Settings

# How often `flush` looks again at a shard's lock held by another flusher.
POLL_S = 0.2
# Past a held lock's remaining TTL before `flush` gives up on it: Redis
# expires a key within milliseconds of its TTL, the process may be slower.
EXPIRY_GRACE_S = 1.0
# Backlogs from this size up get a progress bar.
PROGRESS_MIN_ROWS = 10_000


class LockWait:
    """The wait for one shard's lock: as long as each holder's lock can still live."""

    def __init__(self, shard: int, ttl_bound_s: float, say: Callable[[str], None]) -> None:
        self.shard = shard
        self.ttl_bound_s = ttl_bound_s
        self.say = say
        self.holder: LockState | None = None
        self.budget_s = 0.0
        self.bounded = False  # the lock had longer to live than the setting lets us wait
        self.deadline = 0.0

    def keep_waiting(self, state: LockState) -> bool:
        """Whether to look again at the lock held as `state` (a new holder re-arms the wait)."""
        now = time.monotonic()
        if self.holder is None or state.token != self.holder.token:
            self.holder = state
            left_s = state.ttl_ms / 1000 if state.ttl_ms >= 0 else self.ttl_bound_s
            self.budget_s = min(left_s, self.ttl_bound_s)
            self.bounded = left_s > self.ttl_bound_s
            self.deadline = now + self.budget_s + EXPIRY_GRACE_S
            self.say(
                f"Shard {self.shard}: its flush lock is held by {state.describe()}; "
                f"waiting up to {self.budget_s:.0f} s for it."
            )
            return True
        return now < self.deadline

    def error(self, lock: str, state: LockState) -> LockHeldError:
        if self.bounded:
            past = f"past EVENT_BUFFER_LOCK_TTL_S ({self.ttl_bound_s:.0f} s)"
        else:
            past = f"past the {self.budget_s:.0f} s it had left: a live flusher extends it"
        return LockHeldError(
            f"shard {self.shard}: its flush lock is held by {state.describe()}, which kept it "
            f"{past}; run `eventbuffer flush` again once it is done",
            shard=self.shard,
            lock=lock,
            holder=state.who,
        )


def flush_waiting_for_lock(flusher: Flusher, shard: int, say: Callable[[str], None]) -> FlushResult:
    """One batch of one shard under its lock, waiting while another flusher holds it.

    Raises LockHeldError when a live holder keeps the lock past the wait.
    """
    lock = flusher.keyspace.shard(shard).lock
    wait = LockWait(shard, flusher.settings.lock_ttl_s, say)
    while True:
        result = flusher.flush_shard(shard, max_batches=1, respect_backoff=False)
        if result.locked:
            if result.took_over is not None:
                say(f"Shard {shard}: took its flush lock over from {result.took_over}.")
            return result
        state = read_lock(flusher.redis, lock)
        if state is None:
            continue  # released since: try again at once
        if not wait.keep_waiting(state):
            raise wait.error(lock, state)
        time.sleep(POLL_S)


def drain_shard(
    flusher: Flusher,
    shard: int,
    total: FlushResult,
    advance: Callable[[], None],
    say: Callable[[str], None],
) -> None:
    """Flush `shard` batch by batch until its queue is empty, adding up into `total`.

    Raises LockHeldError when a live flusher keeps the shard's lock past the wait.
    """
    while (result := flush_waiting_for_lock(flusher, shard, say)).batches:
        for name in ("rows", "dead", "batches", "redriven"):
            setattr(total, name, getattr(total, name) + getattr(result, name))
        advance()


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
                try:
                    drain_shard(runtime.flusher(), shard, total, advance, console.print)
                except LockHeldError as exc:
                    skipped.append(str(exc))
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
        raise CliError("another flusher is at work; skipped " + "; ".join(skipped))
    return 0
