"""The fault suite's single processes: a flusher stopped at a phase, a chDB holder,
pool children, and reading their output line by line."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.celery_procs import CeleryProcess
from tests.support.fault_stack import (
    Stack,
)

FAULTS_DIR = Path(__file__).resolve().parents[1] / "faults"


PHASE_FLUSHER = FAULTS_DIR / "phase_flusher.py"


def pool_children(proc: CeleryProcess) -> list[int]:
    assert proc.process is not None
    out = subprocess.run(
        ["pgrep", "-P", str(proc.process.pid)], capture_output=True, text=True, timeout=10
    ).stdout
    return [int(pid) for pid in out.split()]


class LineReader:
    """Reads a child's stdout lines (JSON where possible) in a thread, for bounded waits."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[Any] = queue.Queue()
        self.seen: list[Any] = []
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: Any) -> None:
        for line in stream:
            try:
                item = json.loads(line)
            except ValueError:
                item = {"text": line.rstrip()}
            self.lines.put(item)

    def next_matching(self, key: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key!r} line within {timeout}s; saw {self.seen}")
            try:
                item = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(item)
            if key in item:
                return item  # type: ignore[no-any-return]

    def drain(self, timeout: float = 5) -> list[Any]:
        self._thread.join(timeout)
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return self.seen


def phase_flusher_args(phase: str, *extra: str) -> list[str]:
    return [sys.executable, str(PHASE_FLUSHER), "--phase", phase, *extra]


CHDB_HOLDER = """
import sys, time
from chdb import session
path, hold = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + 30
while True:
    try:
        s = session.Session(path)
        break
    except Exception as exc:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
s.query("SELECT count() FROM events")
print('{"held": 1}', flush=True)
time.sleep(hold)
s.close()
print('{"released": 1}', flush=True)
"""


def chdb_holder(stack: Stack, seconds: float) -> subprocess.Popen[str]:
    """A helper process that opens the ClickHouse directory and keeps it for `seconds`."""
    from worker.sinks.chdb import path_from_url

    return stack.popen(
        [sys.executable, "-c", CHDB_HOLDER, path_from_url(stack.chdb_url), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def logs(stack: Stack, prefix: str) -> str:
    """Every log file of the stack whose name starts with `prefix`, concatenated."""
    return "".join(p.read_text(errors="replace") for p in sorted(stack.tmp.glob(f"{prefix}*.log")))


class LogTail:
    """Counts a needle in what a log file gains, reading only the new bytes."""

    def __init__(self, path: Path, needle: str) -> None:
        self.path = path
        self.needle = needle.encode()
        self.offset = path.stat().st_size if path.exists() else 0
        self.count = 0
        self._rest = b""

    def poll(self) -> int:
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
            self.offset += len(data)
            text = self._rest + data
            cut = text.rfind(b"\n") + 1
            self.count += text[:cut].count(self.needle)
            self._rest = text[cut:]
        return self.count
