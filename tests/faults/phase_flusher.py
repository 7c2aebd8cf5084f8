"""One production flush of shard 0 that dies, or stalls, at a chosen phase.

    python tests/faults/phase_flusher.py --phase PHASE [--lock-ttl S] [--batch N]
        [--kill-after-chunk K] [--stall-s S] [--stall-before-insert]

Settings come from the environment (REDIS_URL, CLICKHOUSE_URL,
EVENT_BUFFER_BATCH_SIZE, EVENT_BUFFER_CHUNK_SIZE ...), as in a worker: the
flushers that re-drive its claims must use the same chunk size (see
test_config_mismatch.py); --lock-ttl and --batch override theirs. It runs the real
`Flusher.flush_shard(0)` for one batch, with hooks around the real claim
script, the real ChdbSink and the real ack script:

- `claim`: SIGKILL right after claim.lua returned rows (before any INSERT);
- `between`: SIGKILL right after the INSERT of chunk K (default 0) of a claim
  that has more chunks to go;
- `before-ack`: SIGKILL after the last INSERT, just before ack.lua;
- `stall`: a slow INSERT of chunk K: the call holds the GIL for --stall-s
  seconds (as a C driver that does not release it would), so the lock's
  watchdog thread cannot run and the lock expires while the INSERT is in
  progress. The chunk's rows are written before the stall, or after it with
  --stall-before-insert. The chDB directory is released after every INSERT,
  so a second flusher in another process can write meanwhile (embedded chDB
  is one process at a time; a ClickHouse server would not need this);
- `none`: no fault.

stdout: one JSON object per line: {"claimed": id, "rows": n, "redriven": b},
{"write": token}, {"stall": token, "seconds": s}, {"stall_done": token},
{"dying": phase, "claim": id} just before the SIGKILL, {"acked": result},
{"result": FlushResult}, {"lock_lost": message} (exit 3) or
{"sink_busy": message} (exit 4).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import redis as redis_lib

from tests.support.sinks import DelegatingSink
from worker.flusher import Flusher
from worker.lock import LockLostError
from worker.settings import Settings
from worker.sinks.base import RetryableSinkError
from worker.sinks.chdb import ChdbSink, path_from_url

EXIT_LOCK_LOST = 3
EXIT_SINK_BUSY = 4


def emit(**item: Any) -> None:
    print(json.dumps(item), flush=True)


def die(phase: str, claim: str) -> None:
    emit(dying=phase, claim=claim)
    os.kill(os.getpid(), signal.SIGKILL)


def hold_gil(seconds: float) -> None:
    """Sleep in C without releasing the GIL: no other thread of this process runs."""
    libc = ctypes.PyDLL(None)  # PyDLL: the GIL stays held during the call
    libc.usleep(ctypes.c_uint(int(seconds * 1_000_000)))


class State:
    claim = ""
    chunks = 0


class HookedSink(DelegatingSink):
    def __init__(self, path: str, table: str, args: argparse.Namespace) -> None:
        super().__init__(ChdbSink(path, table))
        self.args = args

    def write(self, rows: Sequence[bytes], token: str) -> None:
        index = int(token.split(":")[1].split(".")[0])
        stall = self.args.phase == "stall" and index == self.args.kill_after_chunk
        if stall and self.args.stall_before_insert:
            self._stall(token)
        self.inner.write(rows, token)
        self.inner.close()  # release the directory between INSERTs (see the module doc)
        emit(write=token)
        if stall and not self.args.stall_before_insert:
            self._stall(token)
        if (
            self.args.phase == "between"
            and index == self.args.kill_after_chunk
            and index < State.chunks - 1
        ):
            die("between", State.claim)

    def _stall(self, token: str) -> None:
        emit(stall=token, seconds=self.args.stall_s)
        hold_gil(self.args.stall_s)
        emit(stall_done=token)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", required=True,
                        choices=["none", "claim", "between", "before-ack", "stall"])  # fmt: skip
    parser.add_argument("--lock-ttl", type=int, default=1)
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--kill-after-chunk", type=int, default=0)
    parser.add_argument("--stall-s", type=float, default=5.0)
    parser.add_argument("--stall-before-insert", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    env = dict(os.environ)
    env.update(EVENT_BUFFER_LOCK_TTL_S=str(args.lock_ttl), EVENT_BUFFER_MAX_BATCHES_PER_FLUSH="1")
    if args.batch:
        env["EVENT_BUFFER_BATCH_SIZE"] = str(args.batch)
    settings = Settings.from_env(env)
    client = redis_lib.Redis.from_url(settings.redis_url)
    path = path_from_url(settings.clickhouse_url)
    flusher = Flusher(client, settings, lambda: HookedSink(path, settings.clickhouse_table, args))

    real_claim, real_ack = flusher.claims.claim_rows, flusher.claims.ack

    def claim(*a: Any, **kw: Any) -> Any:
        result = real_claim(*a, **kw)
        if result is not None:
            State.claim = result.id
            State.chunks = math.ceil(len(result.rows) / result.chunk_size)
            emit(claimed=result.id, rows=len(result.rows), redriven=result.redriven)
            if args.phase == "claim":
                die("claim", result.id)
        return result

    def ack(*a: Any, **kw: Any) -> Any:
        if args.phase == "before-ack":
            die("before-ack", State.claim)
        outcome = real_ack(*a, **kw)
        emit(acked=outcome, claim=kw.get("claim_id"))
        return outcome

    flusher.claims.claim_rows = claim  # type: ignore[method-assign]
    flusher.claims.ack = ack  # type: ignore[method-assign]
    try:
        result = flusher.flush_shard(0, max_batches=1, respect_backoff=False)
    except LockLostError as exc:
        emit(lock_lost=str(exc))
        return EXIT_LOCK_LOST
    except RetryableSinkError as exc:
        emit(sink_busy=str(exc))
        return EXIT_SINK_BUSY
    emit(result=result.as_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
