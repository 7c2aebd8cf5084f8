"""The insert pass of an import in short-lived child processes (embedded ClickHouse).

chDB keeps memory for every session a process opens and closes (a few MB
each: the README's "Running in production"), and an import opens it once
per chunk (to check the chunk's ids and insert it), so that a flush worker
can get in between chunks. With `isolate`, only forked children ever load
chDB (a process that has loaded chDB must not fork: the child hangs; the
importer never loads it). The importer reads each chunk from its state and
hands it to a child over a duplex channel (its ids to check, then its
rows); the child checks and inserts it and waits for the next one, and
after `CHUNKS_PER_CHILD` chunks (worker/importer/inserting.py) it is let go
and exits, giving back what chDB kept. Only the importer touches the state.
A child is forked ahead of its turn (`Child` with `warm`): it loads chDB (a
second or so) while the importer sorts the state and walks the durations,
or while the child before it inserts. A child dies with the importer
(PR_SET_PDEATHSIG), so a killed import leaves no writer behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NamedTuple, NoReturn

from worker.errors import EventBufferError

_PR_SET_PDEATHSIG = 1


class ChildFailed(EventBufferError):
    """The child process failed (its error, one line) or died."""


class _Failure(NamedTuple):
    """What a child sends instead of an answer when its work failed."""

    text: str


def die_with_parent() -> None:
    with contextlib.suppress(Exception):  # not Linux: the child may outlive a killed parent
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    """A forked child that runs `warm()` at once (loading chDB, say, while this process
    still has other work), then `serve(channel)`: it answers what this process sends
    over the duplex channel, until this process closes it (`close`)."""

    def __init__(
        self, serve: Callable[[Connection], None], warm: Callable[[], Any] | None = None
    ) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        mine, theirs = multiprocessing.Pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            mine.close()
            # This process's ends of the other children's channels: a copy kept open here
            # would hide from a child that this process let it go.
            for other in list(_running):
                other.channel.close()
            _child(serve, warm, theirs)
        theirs.close()
        self.pid = pid
        self.channel: Connection = mine
        self.status: int | None = None
        _running.add(self)

    def send(self, message: Any) -> None:
        try:
            self.channel.send(message)
        except OSError:  # the child is gone (a broken pipe)
            raise self._died() from None

    def receive(self) -> Any:
        """The child's next answer, or ChildFailed with its error."""
        try:
            answer = self.channel.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if isinstance(answer, _Failure):
            self.close()
            raise ChildFailed(answer.text)
        return answer

    def let_go(self) -> None:
        """The child is not needed any more: it reads the end of the channel and exits
        (a process that loaded chDB takes a moment to), while this one goes on."""
        if not self.channel.closed:
            self.channel.close()

    def close(self) -> None:
        """Let the child go and reap it."""
        if self.status is not None:
            return
        self.let_go()
        _, self.status = os.waitpid(self.pid, 0)
        _running.discard(self)

    def _died(self) -> ChildFailed:
        self.close()
        return ChildFailed(f"the ClickHouse writer process ended without an answer ({self.status})")


# The children forked and not reaped yet.
_running: set[Child] = set()


def _child(
    serve: Callable[[Connection], None], warm: Callable[[], Any] | None, channel: Connection
) -> NoReturn:
    code = 0
    try:
        die_with_parent()
        gc.enable()  # forked while the importer had it paused (import_state.gc_paused)
        if warm is not None:
            with contextlib.suppress(Exception):  # the work meets any failure again
                warm()
        try:
            serve(channel)
        except EOFError:  # the importer closed the channel: nothing more to do
            pass
        except BaseException as exc:
            code = 1
            with contextlib.suppress(Exception):
                channel.send(_Failure(f"{type(exc).__name__}: {exc}"))
    except BaseException:
        code = 1
    finally:
        os._exit(code)
