"""The flush lock expires during a slow INSERT, and a second flusher takes over.

Flusher A (tests/faults/phase_flusher.py, the production `Flusher`, lock TTL
1 s) claims a batch of 4 chunks; its INSERT of chunk 1 is slow on purpose:
the call holds the GIL for 5 s (as a C driver that does not release it
would), so A's lock watchdog cannot extend the lock and it expires in Redis
while A is still inside the INSERT. Then a second flusher starts: the Celery
flush worker gets `process_buffer`, takes the lock, re-drives A's open claim
and acknowledges it, all while A is still stalled. Then A's INSERT returns
and A carries on with a stale claim and a lost lock.

Two variants: the slow chunk's rows reach ClickHouse before the stall (the
server applied the INSERT, its answer is late) or after it (the INSERT
arrives after the takeover: ClickHouse must drop it by its dedup token).
Either way nothing may be duplicated, and A must not acknowledge anything.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.support.fault_load import wait
from tests.support.fault_processes import LineReader, LogTail, phase_flusher_args
from tests.support.fault_stack import Stack, assert_exactly_once

pytestmark = pytest.mark.faults

BATCH = 400
CHUNK = 100
STALL_S = 5.0


def test_lock_expires_during_slow_insert_while_a_second_flusher_starts(stacks) -> None:
    # One batch per process_buffer run: the second flusher re-drives A's claim
    # and releases the chDB directory before A's INSERT returns.
    # Both flushers cut claims into chunks of the same size (test_config_mismatch.py).
    stack: Stack = stacks(
        EVENT_BUFFER_MAX_BATCHES_PER_FLUSH="1", EVENT_BUFFER_CHUNK_SIZE=str(CHUNK)
    )
    ingest = stack.ingest_worker("-c", "1")
    second = stack.flush_worker("second-flusher")
    load = stack.load(200, sessions_per_batch=None, width=20)
    ingest.wait_for("ready.")
    second.wait_for("ready.")
    load.start()

    takeovers = []
    late_writes = 0
    fault_end = time.monotonic()
    for variant in ("rows written, answer slow", "rows written after the stall"):
        wait(lambda: stack.lock_token() is None, 10, "the flush lock to be free")
        wait(lambda: stack.queued() >= BATCH, 30, "a full batch in the buffer")
        args = ["--lock-ttl", "1", "--batch", str(BATCH), "--kill-after-chunk", "1"]
        args += ["--stall-s", str(STALL_S)]
        if "after" in variant:
            args.append("--stall-before-insert")
        with (stack.tmp / "stalled-flusher.err").open("a") as err:
            child = stack.popen(
                phase_flusher_args("stall", *args),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        out = LineReader(child.stdout)
        claim: str = out.next_matching("claimed", 30)["claimed"]
        token = stack.lock_token()
        assert token is not None
        out.next_matching("stall", 30)
        stalled_at = time.monotonic()
        # The watchdog cannot run: the lock expires by its TTL while A is in its INSERT.
        wait(
            lambda token=token: stack.lock_token() != token,  # type: ignore[misc]
            5,
            "A's lock to expire during its INSERT",
        )
        assert child.poll() is None
        redrive = LogTail(second.log, f"re-driving unacknowledged claim {claim}")
        stack.app.send_task("eventbuffer.process_buffer", queue="flush")
        wait(redrive.poll, STALL_S, "the second flusher to re-drive A's claim")
        wait(
            lambda claim=claim: stack.claim_open() != claim,  # type: ignore[misc]
            STALL_S,
            "the second flusher's ack",
        )
        took_over_at = time.monotonic() - stalled_at
        assert child.poll() is None, "A must still be inside its slow INSERT"
        assert took_over_at < STALL_S

        code = child.wait(60)
        fault_end = time.monotonic()
        lines = out.drain()
        after_stall = lines[next(i for i, x in enumerate(lines) if "stall_done" in x) :]
        late = [x["write"] for x in after_stall if "write" in x]
        late_writes += len(late)
        # A never acknowledges: its ack finds the claim gone (0) or it stops on the lost lock
        # (3), or its next INSERT meets the directory held by the second flusher (4).
        assert code in (0, 3, 4), (code, lines)
        assert not any(x.get("acked") == 1 for x in lines), lines
        assert all(w.startswith(f"{claim}:") for w in late), late
        takeovers.append(f"{variant}: A exit {code}, {len(late)} late INSERTs")
        assert stack.duplicates_now() == 0, f"duplicates after the takeover ({variant})"

    stack.beat()
    load.finish()
    drained = stack.wait_drained(load.count, timeout=90)
    tally = stack.finish(load)
    stack.record(
        "lock expires during slow INSERT, 2nd flusher",
        tally,
        drained - fault_end,
        f"{len(takeovers)} takeovers during a {STALL_S:.0f} s INSERT",
        note="; ".join(takeovers) + f"; {late_writes} INSERTs of the stale flusher after the "
        "takeover, all dropped by their dedup tokens",
    )
    assert_exactly_once(stack, tally)
