"""One contender for the migrations lock, as its own process (tests/support/migrations.py's
`race_for_a_dead_holders_lock`).

`python -m tests.support.lock_contender URL DATABASE CLUSTER LOG GO`: connects and
prints `ready`; then, for each line read from stdin (a round), waits until the file
GO<round> exists, takes the lock (`migrations_lock`, CLUSTER "" for none), appends
`enter PID` then, after a while inside, `exit PID` to LOG, releases the lock and prints
`done`. Two contenders inside at once show as two `enter` lines in a row; the lock's
wait and break messages go to stderr.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from worker.sinks.migrations_lock import migrations_lock
from worker.sinks.native import NativeSink

INSIDE_S = 0.2  # long enough for a second contender to get in, were the lock broken twice


def _append(log: Path, line: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def main(url: str, database: str, cluster: str, log: str, go: str) -> None:
    sink = NativeSink(url, require_dedup=False)
    try:
        sink.query("SELECT 1")
        print("ready", flush=True)
        for line in sys.stdin:
            released = Path(f"{go}{line.strip()}")
            while not released.exists():
                time.sleep(0.002)
            with migrations_lock(
                sink.query, database, cluster or None, on_wait=lambda m: print(m, file=sys.stderr)
            ):
                _append(Path(log), f"enter {os.getpid()}")
                time.sleep(INSIDE_S)
                _append(Path(log), f"exit {os.getpid()}")
            print("done", flush=True)
    finally:
        sink.close()


if __name__ == "__main__":
    main(*sys.argv[1:6])
