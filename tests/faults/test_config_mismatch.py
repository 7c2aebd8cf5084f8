"""A re-drive by a flusher with another EVENT_BUFFER_CHUNK_SIZE (found by this suite).

The dedup token of a chunk is `<claim id>:<chunk index>`. Before the fix, a
flusher that died after its first INSERT left the claim open, and a flusher
re-driving it with another chunk size (a rolling deploy that changes the
setting, two flush workers configured differently) cut a different, larger
chunk 0 under the same token: ClickHouse dropped it as a duplicate, the claim
was acknowledged, and those rows were lost without an error. Now the claim
records its chunk size (claim.lua) and every re-drive cuts the same chunks.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.support.dates import BASE_MS
from tests.support.fault_load import wait
from tests.support.fault_processes import phase_flusher_args
from tests.support.fault_stack import Stack, Tally
from worker.buffer import EventBuffer
from worker.events import parse_event
from worker.flusher import Flusher
from worker.settings import Settings
from worker.sinks import open_sink

pytestmark = pytest.mark.faults


def test_redrive_with_another_chunk_size_loses_nothing(stacks) -> None:
    stack: Stack = stacks(EVENT_BUFFER_BATCH_SIZE="400", EVENT_BUFFER_CHUNK_SIZE="100")
    events = [
        parse_event({"project_id": "p", "name": "click", "created_at": BASE_MS + n * 1000})
        for n in range(400)
    ]
    EventBuffer(stack.redis, stack.settings).apply(events)
    # First flusher: chunks of 100, killed after the INSERT of chunk 0 (token <claim>:0).
    done = subprocess.run(
        phase_flusher_args("between", "--kill-after-chunk", "0"),
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    killed_at = time.monotonic()
    wait(lambda: stack.lock_token() is None, 10, "the dead flusher's lock to expire")
    # Second flusher, configured with chunks of 1000: it must still cut the claim's chunks of 100.
    other = Settings.from_env({**stack.env, "EVENT_BUFFER_CHUNK_SIZE": "1000"})
    sink = open_sink(stack.chdb_url)
    try:
        result = Flusher(stack.redis, other, lambda: sink).flush_shard(0)
    finally:
        sink.close()
    assert result.redriven == 1 and result.rows == 400
    [(landed,)] = stack.clickhouse("SELECT count() FROM events")
    stack.record(
        "re-drive with another CHUNK_SIZE",
        Tally(
            sent=400,
            landed=int(landed),
            missing=400 - int(landed),
            duplicated=0,
            unexpected=0,
            wrong_durations=0,
        ),
        time.monotonic() - killed_at,
        "1 SIGKILL, re-drive with chunk 1000",
        asserted="missing=0 dup=0",
        note=f"the re-drive acknowledged 400 rows; ClickHouse kept {landed} "
        "(its 400-row chunk 0 dropped as a duplicate of the first flusher's 100-row chunk 0)",
    )
    assert stack.claim_open() is None and stack.queued() == 0  # acknowledged and trimmed
    assert int(landed) == 400, f"{400 - int(landed)} rows lost"
