"""The flush process SIGKILLed at every phase while events keep arriving.

A real ingest worker applies the producer's steady load to the buffer. The
flusher runs as its own process (tests/faults/phase_flusher.py: the
production `Flusher` with hooks around the real claim script, chDB sink and
ack script) and dies by SIGKILL:

- after claim (claim.lua returned rows, nothing inserted yet),
- between chunks (after the INSERT of chunk K of 4),
- after the last INSERT, before ack.lua.

Each cycle kills three flushers, the phases in a rotating order, then lets a
fourth one finish, so every phase is hit on a fresh claim and on a re-driven
one. A killed flusher's lock expires on its own (1 s TTL); the next flusher
must re-drive the open claim with the same chunks and tokens. After every
cycle ClickHouse holds no duplicate; at the end a Celery flush worker driven
by Beat drains the rest, and every handed-over event is in ClickHouse once,
with the model's duration.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from typing import Any

import pytest

from tests.support.fault_load import wait
from tests.support.fault_processes import logs, phase_flusher_args
from tests.support.fault_stack import Stack, assert_exactly_once

pytestmark = pytest.mark.faults

BATCH = 400
CHUNK = 100  # 4 chunks per claim
CYCLES = 4
ORDERS = [
    ["claim", "between", "before-ack"],
    ["between", "before-ack", "claim"],
    ["before-ack", "claim", "between"],
    ["claim", "before-ack", "between"],
]


def run_flusher(stack: Stack, phase: str, kill_after_chunk: int = 0) -> tuple[int, list[Any], str]:
    done = subprocess.run(
        phase_flusher_args(phase, "--lock-ttl", "1", "--kill-after-chunk", str(kill_after_chunk)),
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()], done.stderr


def test_flusher_killed_at_each_phase(stacks) -> None:
    # Every flusher, the final Celery one included, cuts claims the same way.
    stack: Stack = stacks(EVENT_BUFFER_BATCH_SIZE=str(BATCH), EVENT_BUFFER_CHUNK_SIZE=str(CHUNK))
    ingest = stack.ingest_worker("-c", "1")
    load = stack.load(200, sessions_per_batch=None, width=20)
    ingest.wait_for("ready.")
    load.start()

    kills = {"claim": 0, "between": 0, "before-ack": 0}
    redriven_kills = 0
    open_claim: str | None = None
    last_kill = time.monotonic()
    # The last flusher is killed before its ack: the Celery flush worker re-drives it.
    plan = [[*ORDERS[c % len(ORDERS)], "none"] for c in range(CYCLES)] + [["before-ack"]]
    for cycle, phases in enumerate(plan):
        for phase in phases:
            # The previous (killed) flusher's lock expires by its TTL.
            wait(lambda: stack.lock_token() is None, 10, "the dead flusher's lock to expire")
            if open_claim is None:
                wait(lambda: stack.queued() >= BATCH, 30, "a full batch in the buffer")
            chunk = cycle % 3  # between: killed after chunk 0, 1 or 2 of 4
            code, lines, stderr = run_flusher(stack, phase, chunk)
            claimed = next((line for line in lines if "claimed" in line), None)
            assert claimed is not None, (phase, lines, stderr)
            assert claimed["rows"] == BATCH, claimed
            writes = [line["write"] for line in lines if "write" in line]
            if open_claim is not None:
                # It re-drove the claim its predecessor left open, same tokens again.
                assert claimed["redriven"] and claimed["claimed"] == open_claim, (claimed, stderr)
                if phase != "claim":  # that one dies before the flusher logs the re-drive
                    assert f"re-driving unacknowledged claim {open_claim}" in stderr
            assert all(w.startswith(claimed["claimed"] + ":") for w in writes), writes
            if phase == "none":
                assert code == 0, (lines, stderr)
                assert {"acked": 1, "claim": claimed["claimed"]} in lines
                assert stack.claim_open() is None or stack.claim_open() != claimed["claimed"]
                open_claim = None
                continue
            assert code == -signal.SIGKILL, (phase, code, lines, stderr)
            assert lines[-1] == {"dying": phase, "claim": claimed["claimed"]}, lines
            expected_writes = {"claim": 0, "between": chunk + 1, "before-ack": BATCH // CHUNK}
            assert len(writes) == expected_writes[phase], (phase, writes)
            kills[phase] += 1
            redriven_kills += int(claimed["redriven"])
            last_kill = time.monotonic()
            open_claim = stack.claim_open()
            assert open_claim == claimed["claimed"], "a killed flush must leave its claim open"
        assert stack.duplicates_now() == 0, f"duplicates in ClickHouse after cycle {cycle}"

    load.finish()
    flush = stack.flush_worker()
    stack.beat()
    flush.wait_for("ready.")
    drained = stack.wait_drained(load.count, timeout=90)
    tally = stack.finish(load)
    assert f"re-driving unacknowledged claim {open_claim}" in logs(stack, "flush")
    total = sum(kills.values())
    stack.record(
        "flush process killed at each phase",
        tally,
        drained - last_kill,
        f"{total} SIGKILLs: " + ", ".join(f"{n} {phase}" for phase, n in kills.items()),
        note=f"{redriven_kills} of the kills hit a flusher that was re-driving its "
        "predecessor's claim; the Celery flush worker re-drove the last one",
    )
    assert total >= 10 and all(kills.values())
    assert_exactly_once(stack, tally)
