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
The first child is forked as soon as the files are read (`Child` with
`warm`): it loads chDB (a second or so) while the importer sorts the state
and walks the durations, then waits to be told to insert; an import that
stops before then closes its pipe and it exits, unstarted.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

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
    return Child(work).result(report)


class Child:
    """A forked child that runs `warm()` at once (loading chDB, say, while this process
    still has other work), then `work(progress)` when `result` tells it to go."""

    def __init__(
        self, work: Callable[[Progress], Any], warm: Callable[[], Any] | None = None
    ) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        go_read, go_write = os.pipe()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(go_write)
            os.close(read_end)
            _child(work, warm, go_read, write_end)
        os.close(go_read)
        os.close(write_end)
        self.pid = pid
        self._go: int | None = go_write
        self._messages: int | None = read_end

    def result(self, report: Progress) -> Any:
        """Let the child work; its result (progress passed on to `report`), or ChildFailed."""
        assert self._go is not None and self._messages is not None
        os.write(self._go, b"g")
        os.close(self._go)
        self._go = None
        result: list[Any] | None = None
        with os.fdopen(self._messages, "r") as messages:
            self._messages = None
            for line in messages:
                message = json.loads(line)
                if message[0] == "progress":
                    report(*message[1:])
                else:
                    result = message
        _, status = os.waitpid(self.pid, 0)
        if result is None:
            raise ChildFailed(f"the ClickHouse writer process ended without an answer ({status})")
        if result[0] == "ok":
            return result[1]
        raise ChildFailed(result[1])

    def cancel(self) -> None:
        """The child is not needed (its work was never asked for): it ends, unstarted."""
        if self._go is None:
            return
        os.close(self._go)  # the child reads the end of the pipe, and exits
        self._go = None
        if self._messages is not None:
            os.close(self._messages)
            self._messages = None
        os.waitpid(self.pid, 0)


def _child(
    work: Callable[[Progress], Any], warm: Callable[[], Any] | None, go: int, write_end: int
) -> NoReturn:
    code = 0
    try:
        die_with_parent()
        if warm is not None:
            with contextlib.suppress(Exception):  # the work meets any failure again
                warm()
        if os.read(go, 1) != b"g":  # cancelled
            os._exit(0)
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
