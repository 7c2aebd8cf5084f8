"""Commands on one connection, sent in one write and answered in order (RESP, by hand).

The apply's and the release's transactions (worker/apply.py,
worker/reorder_release.py) run on a connection of their own: every command
of a step is packed as it is (bytes, str, int: no encoding of each in Python
first), sent in one system call, and the replies are read after.

hiredis packs a command's arguments at a few ns per byte (1.6 µs for a
600-byte row, 2026-12-07), several times what joining the bytes costs: a
command with a long argument (the rows, the held records) is packed here by
joining its arguments' frames; the others by hiredis, faster on short ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hiredis import pack_command
from redis.exceptions import ResponseError

# An argument this long or longer makes its command packed by `_pack` rather than hiredis.
LONG_ARGUMENT = 200


class Framed:
    """A command whose trailing values come already framed as RESP bulk strings (parts to
    join: bytes or memoryviews), so a value built from pieces is copied once, when the
    write is joined (the release's rows: worker/reorder_release.py)."""

    __slots__ = ("parts",)

    def __init__(self, command: tuple[Any, ...], count: int, values: list[Any]) -> None:
        """`command`, then `count` values whose frames (`$<length>\\r\\n<value>\\r\\n`) are
        the concatenation of `values`."""
        packed = pack(command)
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
            parts.append(pack(command))
    connection.send_packed_command([b"".join(parts)])


def pack(command: tuple[Any, ...]) -> bytes:
    """A command in RESP, as hiredis' `pack_command` packs it (the same bytes)."""
    for arg in command:
        if arg.__class__ is bytes and len(arg) >= LONG_ARGUMENT:
            return _pack(command)
    return pack_command(command)  # type: ignore[no-any-return]


def _pack(command: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        kind = arg.__class__
        if kind is bytes:
            value = arg
        elif kind is str:
            value = arg.encode()  # strict UTF-8, as hiredis
        elif kind is int:
            value = b"%d" % arg
        else:  # floats, memoryviews, and what hiredis refuses: its own packing and errors
            return pack_command(command)  # type: ignore[no-any-return]
        parts += (b"$%d\r\n" % len(value), value, b"\r\n")
    return b"".join(parts)


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
