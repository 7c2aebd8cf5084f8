"""Embedded ClickHouse unavailable for 8 s while events keep arriving.

Another process (a helper that opens a chDB session on the same data
directory and sleeps) holds the directory: every flush meets
RetryableSinkError. The buffer must grow instead of losing anything, the
flush worker must back off (2 s, 4 s, 8 s ...: `Flusher._back_off`, visible
in its log), and everything must drain once the directory is free again.
"""

from __future__ import annotations

import time

import pytest

from tests.support.fault_load import wait
from tests.support.fault_processes import LineReader, chdb_holder, logs
from tests.support.fault_stack import Stack, assert_exactly_once

pytestmark = pytest.mark.faults

HOLD_S = 8.0


def test_clickhouse_unavailable_then_back(stacks) -> None:
    stack: Stack = stacks()
    ingest = stack.ingest_worker("-c", "1")
    flush = stack.flush_worker()
    stack.beat()
    load = stack.load(200, sessions_per_batch=None, width=20)
    ingest.wait_for("ready.")
    flush.wait_for("ready.")
    load.start()
    wait(lambda: stack.saved.rows > 0, 30, "a first flush before the outage")

    holder = chdb_holder(stack, HOLD_S)
    out = LineReader(holder.stdout)
    out.next_matching("held", 30)
    held_at = time.monotonic()
    queued_at_start = stack.queued()
    saved_at_start = stack.saved.rows
    peak = queued_at_start
    while holder.poll() is None and time.monotonic() < held_at + HOLD_S + 10:
        peak = max(peak, stack.queued())
        time.sleep(0.2)
    assert holder.wait(10) == 0, out.drain()
    released_at = time.monotonic()
    # A flush that was under way when the holder took the directory may still ack.
    acked_during = stack.saved.rows - saved_at_start

    time.sleep(1.0)  # events keep arriving after the outage too
    load.finish()
    drained = stack.wait_drained(load.count, timeout=90)
    tally = stack.finish(load)
    flush_log = logs(stack, "flush")
    backoffs = [f"next try in {s} s" for s in (2, 4, 8, 16) if f"next try in {s} s" in flush_log]
    stack.record(
        "ClickHouse unavailable (dir held 8 s)",
        tally,
        drained - released_at,
        f"directory held {HOLD_S:.0f} s",
        note=f"buffer grew {queued_at_start} -> {peak} rows while held; flush back-off "
        f"logged: {', '.join(backoffs)}; {flush_log.count('flush of shard 0 failed')} "
        "failed flushes",
    )
    assert peak >= queued_at_start + 500, "the buffer should have grown during the outage"
    assert acked_during <= stack.settings.batch_size * stack.settings.max_batches_per_flush
    assert "next try in 2 s" in flush_log and "next try in 4 s" in flush_log, backoffs
    assert_exactly_once(stack, tally)
