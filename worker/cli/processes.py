"""Child processes for `eventbuffer run`: signals, Celery children, stopping, logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from worker.cli.common import SOURCE_ROOT
from worker.errors import Stopped as Stopped


class Signals:
    """SIGINT/SIGTERM set a flag instead of interrupting; a second one forces the stop.

    The handler only counts: it runs in the main thread between any two
    bytecodes, so it must take no lock the main thread may hold (setting a
    threading.Event there deadlocks when the signal lands inside Event.wait).
    """

    def __init__(self) -> None:
        self.count = 0
        self._previous: dict[int, Any] = {}

    @property
    def received(self) -> bool:
        return self.count > 0

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early for a signal; True once one arrived."""
        deadline = time.monotonic() + seconds
        while not self.received and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
        return self.received

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1

    def check(self) -> None:
        if self.received:
            raise Stopped


@dataclass
class Child:
    name: str
    what: str
    process: subprocess.Popen[bytes]
    log: Path
    log_offset: int
    ready_marker: bytes | None = None
    ready: bool = False


def last_line(path: Path) -> str:
    """The last non-blank line of a log file ("" if there is none)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def describe_exit(code: int) -> str:
    """How a child ended, from its return code: "exit code 1", "killed by SIGKILL"."""
    if code < 0:
        with suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def stop_process(
    process: subprocess.Popen[bytes], timeout: float, force: Signals | None = None
) -> None:
    """SIGTERM, wait up to `timeout` (less after a second signal), then SIGKILL its group."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            process.terminate()
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if force is not None and force.count >= 2:
            break
        time.sleep(0.05)
    # The whole session: pool processes a killed worker leaves behind go too.
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def child_env(redis_url: str) -> dict[str, str]:
    env = dict(os.environ, REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    root = SOURCE_ROOT
    if (root / "pyproject.toml").exists():  # a source checkout: children import this same code
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def spawn(name: str, what: str, celery_args: list[str], env: dict[str, str], logs: Path) -> Child:
    log = (logs / f"{name}.log").resolve()
    with log.open("ab") as out:
        offset = out.tell()
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", *celery_args, "--loglevel", "INFO"],
            cwd=os.getcwd(),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # we stop it (warm shutdown) before Redis
        )
    marker = b" ready." if celery_args[0] == "worker" else b"beat: Starting"
    return Child(name, what, process, log, offset, ready_marker=marker)


def became_ready(child: Child) -> bool:
    """True once, when the child's log first shows its ready marker."""
    if child.ready or child.ready_marker is None:
        return False
    with suppress(OSError), child.log.open("rb") as f:
        f.seek(child.log_offset)
        child.ready = child.ready_marker in f.read()
    return child.ready
