"""A flusher process for the crash tests, that really dies (or freezes) mid-flush.

    python tests/support/crash_flusher.py REDIS_URL CLICKHOUSE_URL KILL_AFTER_CHUNKS BATCH CHUNK
        [--signal KILL|STOP] [--lock-ttl S] [--release-between-writes]

Runs the production `Flusher` (process_buffer until the buffer is empty) with
a sink that delegates to a real `ChdbSink` (a `chdb://` URL) or `NativeSink`
(a `clickhouse://` URL; old servers allowed, for the 18.16 cluster whose
Replicated tables deduplicate by content) and, right after its
KILL_AFTER_CHUNKS-th successful write, sends itself SIGKILL (the default: the
process dies on the spot, no cleanup, no ack) or SIGSTOP (the whole process
freezes, lock watchdog included, until someone sends SIGCONT). 0 means never.

`--release-between-writes` closes the chDB directory after every write, so a
frozen process does not hold it: embedded chDB can be open in one process
only, and the second flusher of the lock-expiry test must be able to write
(a ClickHouse server would not need this).

stdout gets one JSON line per write ({"write": token}) and per flushed shard
({"flush": FlushResult}); a LockLostError prints {"lock_lost": message} and
exits with status 3. Logging (e.g. "re-driving unacknowledged claim") goes to
stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import redis as redis_lib

from tests.support.sinks import DelegatingSink
from worker.buffer import EventBuffer
from worker.flusher import Flusher
from worker.lock import LockLostError
from worker.settings import Settings
from worker.sinks.base import Sink
from worker.sinks.chdb import ChdbSink, path_from_url
from worker.sinks.native import NativeSink

EXIT_LOCK_LOST = 3


def emit(**item: Any) -> None:
    print(json.dumps(item), flush=True)


class SuicidalSink(DelegatingSink):
    """A real ChdbSink that signals its own process after the n-th successful write."""

    writes = 0  # across every sink the flusher opens in this process

    def __init__(self, url: str, table: str, after: int, signo: int, release: bool) -> None:
        inner: Sink
        if url.startswith("chdb://"):
            inner = ChdbSink(path_from_url(url), table)
        else:
            inner = NativeSink(url, table, require_dedup=False)
        super().__init__(inner)
        self.after = after
        self.signo = signo
        self.release = release

    def write(self, rows: Sequence[bytes], token: str) -> None:
        self.inner.write(rows, token)
        if self.release:
            self.inner.close()
        SuicidalSink.writes += 1
        emit(write=token)
        if SuicidalSink.writes == self.after:
            os.kill(os.getpid(), self.signo)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("chdb_url")
    parser.add_argument("kill_after_chunks", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("chunk", type=int)
    parser.add_argument("--signal", choices=["KILL", "STOP"], default="KILL")
    parser.add_argument("--lock-ttl", type=int, default=60)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--release-between-writes", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    settings = Settings.from_env(
        {
            "REDIS_URL": args.redis_url,
            "CLICKHOUSE_URL": args.chdb_url,
            "EVENT_BUFFER_BATCH_SIZE": str(args.batch),
            "EVENT_BUFFER_CHUNK_SIZE": str(args.chunk),
            "EVENT_BUFFER_LOCK_TTL_S": str(args.lock_ttl),
            "EVENT_BUFFER_SHARDS": str(args.shards),
        }
    )
    signo = signal.SIGKILL if args.signal == "KILL" else signal.SIGSTOP
    client = redis_lib.Redis.from_url(settings.redis_url)
    buffer = EventBuffer(client, settings)
    flusher = Flusher(
        client,
        settings,
        lambda: SuicidalSink(
            settings.clickhouse_url,
            settings.clickhouse_table,
            args.kill_after_chunks,
            signo,
            args.release_between_writes,
        ),
    )
    rounds = 0
    while buffer.get_buffer_size() > 0:
        rounds += 1
        if rounds > 10_000:
            raise RuntimeError("the flush makes no progress")
        results = flusher.process_buffer().shards
        for result in results:
            if isinstance(result.error, LockLostError):
                emit(lock_lost=str(result.error))
                return EXIT_LOCK_LOST
            emit(flush=result.as_dict())
        if not any(result.locked for result in results):
            time.sleep(0.05)  # another flusher holds every shard: wait for it
    return 0


if __name__ == "__main__":
    sys.exit(main())
