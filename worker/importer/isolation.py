"""The insert pass of an import in short-lived child processes (embedded ClickHouse).

chDB keeps memory for every session a process opens and closes (a few MB
each: the README's "Running in production"), and an import opens it once per chunk (to
check the chunk's ids and insert it), so that a flush worker can get in
between chunks. With `isolate`, the insert pass runs in forked children that each
insert up to `CHUNKS_PER_CHILD` chunks and exit: the importer never opens
chDB itself, and what chDB keeps is given back with each child. (A process
that has loaded chDB must not fork: the child hangs. The importer never
loads it.) A child dies with the importer (PR_SET_PDEATHSIG), so a killed
import leaves no writer behind; it works on the state with a SQLite
connection of its own, and reports progress and its result over a pipe.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from worker.errors import EventBufferError

_PR_SET_PDEATHSIG = 1

Progress = Callable[[str, int, int, str], None]


class ChildFailed(EventBufferError):
    """The child process failed (its error, one line) or died."""


def die_with_parent() -> None:
    with contextlib.suppress(Exception):  # not Linux: the child may outlive a killed parent
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def in_child(work: Callable[[Progress], Any], report: Progress) -> Any:
    """`work(progress)` in a forked child, its progress passed on to `report` here;
    its JSON-able result, or ChildFailed with its error."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(read_end)
            die_with_parent()
            out = os.fdopen(write_end, "w", buffering=1)

            def progress(phase: str, done: int, total: int, name: str) -> None:
                out.write(json.dumps(["progress", phase, done, total, name]) + "\n")

            try:
                answer: list[Any] = ["ok", work(progress)]
            except BaseException as exc:
                answer = ["error", f"{type(exc).__name__}: {exc}"]
            out.write(json.dumps(answer) + "\n")
            out.close()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    result: list[Any] | None = None
    with os.fdopen(read_end, "r") as messages:
        for line in messages:
            message = json.loads(line)
            if message[0] == "progress":
                report(*message[1:])
            else:
                result = message
    _, status = os.waitpid(pid, 0)
    if result is None:
        raise ChildFailed(f"the ClickHouse writer process ended without an answer ({status})")
    if result[0] == "ok":
        return result[1]
    raise ChildFailed(result[1])
