"""ClickHouse work of an import in a short-lived child process (embedded ClickHouse).

chDB keeps memory for every session a process opens and closes (about 2 MB
each, measured with chDB 4.4): an import that opens it for every chunk, so a
flush worker can get in between, would grow with the export's size. With
`isolate`, each step that needs ClickHouse (the check of a chunk's ids, its
insert) runs in a forked child that opens chDB, does the step and exits:
the importer's own memory stays flat, and chDB is never open in it. The
child dies with the importer (PR_SET_PDEATHSIG), so a killed import leaves
no writer behind.

The step's result comes back as JSON over a pipe; the sink errors the
runner acts on come back as the same types.
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
from worker.sinks import PermanentSinkError, RetryableSinkError, RowRejectedError, SinkError

_PR_SET_PDEATHSIG = 1
_ERRORS: dict[str, type[SinkError]] = {
    "retryable": RetryableSinkError,
    "rejected": RowRejectedError,
    "permanent": PermanentSinkError,
}


class ChildFailed(EventBufferError):
    """The child process failed otherwise than with a sink error (or died)."""


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):  # not Linux: the child may outlive a killed parent
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _kind(exc: SinkError) -> str:
    if isinstance(exc, RetryableSinkError):
        return "retryable"
    if isinstance(exc, RowRejectedError):
        return "rejected"
    return "permanent"


def in_child(work: Callable[[], Any]) -> Any:
    """`work()` in a forked child; its JSON-able result, or its sink error raised here."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(read_end)
            _die_with_parent()
            try:
                answer: list[Any] = ["ok", work()]
            except SinkError as exc:
                answer = [_kind(exc), str(exc)]
            except BaseException as exc:
                answer = ["error", f"{type(exc).__name__}: {exc}"]
            with os.fdopen(write_end, "wb") as out:
                out.write(json.dumps(answer).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answers:
        data = answers.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise ChildFailed(f"the ClickHouse writer process ended without an answer ({status})")
    kind, value = json.loads(data)
    if kind == "ok":
        return value
    if kind in _ERRORS:
        raise _ERRORS[kind](value)
    raise ChildFailed(value)
