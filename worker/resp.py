"""Commands on one connection, sent in one write and answered in order (RESP, by hand).

The apply's and the release's transactions (worker/apply.py,
worker/reorder_release.py) run on a connection of their own: every command
of a step is packed by hiredis as it is (bytes, str, int: no encoding of each
in Python first), or comes already framed (`Framed`), is sent in one system
call, and the replies are read after.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hiredis import pack_command
from redis.exceptions import ResponseError


class Framed:
    """A command whose trailing values come already framed as RESP bulk strings (parts to
    join: bytes or memoryviews), so a value built from pieces is copied once, when the
    write is joined (the release's rows: worker/reorder_release.py)."""

    __slots__ = ("parts",)

    def __init__(self, command: tuple[Any, ...], count: int, values: list[Any]) -> None:
        """`command`, then `count` values whose frames (`$<length>\\r\\n<value>\\r\\n`) are
        the concatenation of `values`."""
        packed = pack_command(command)
        after_count = packed.index(b"\r\n")
        self.parts: list[Any] = [b"*%d" % (len(command) + count), packed[after_count:], *values]


def send_commands(connection: Any, commands: Sequence[tuple[Any, ...] | Framed]) -> None:
    """Send `commands` in one write (one system call, not one per command); their replies
    are read with `read_replies`."""
    parts: list[Any] = []
    for command in commands:
        if isinstance(command, Framed):
            parts += command.parts
        else:
            parts.append(pack_command(command))
    connection.send_packed_command([b"".join(parts)])


def read_replies(connection: Any, count: int) -> list[Any]:
    """Read `count` replies (errors inside EXEC stay values); raise the first error after."""
    replies = []
    error: ResponseError | None = None
    for _ in range(count):
        try:
            replies.append(connection.read_response())
        except ResponseError as exc:  # read every reply before raising, or the next ones stay
            replies.append(exc)
            error = error or exc
    if error is not None:
        raise error
    return replies
