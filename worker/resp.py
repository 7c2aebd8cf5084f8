"""Commands on one connection, sent in one write and answered in order (RESP, by hand).

The apply's and the release's transactions (worker/apply.py,
worker/reorder_release.py) run on a connection of their own: every command
of a step is packed as it is (bytes, str, int): by hiredis when short, framed
here when long (a batch's rows: see `_frame`), or comes already framed
(`Framed`), is sent in one system call, and the replies are read after.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
from hiredis import pack_command
from redis.exceptions import ConnectionError, ResponseError

try:  # redis-py's parser with hiredis, and what its reader answers for an incomplete reply
    from redis._parsers import hiredis as _parsers
except ImportError:  # another redis-py: every reply through `read_response`
    _parsers = None  # type: ignore[assignment]
_NOT_ENOUGH_DATA: object | None = getattr(_parsers, "NOT_ENOUGH_DATA", None)
_HIREDIS_PARSER: type | None = getattr(_parsers, "_HiredisParser", None)
_PUSH: type | None = getattr(hiredis, "PushNotification", None)  # RESP3 pushes (hiredis 3.2+)


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


# A command with more arguments than this whose last one is bytes (rows, stored views) is
# framed in Python (`_frame`): hiredis' `pack_command` takes ~1.5-2 us per row of 600
# bytes once a command passes ~128 KiB (its buffers get fresh memory from the system each
# time), against ~0.2 us here. Others: `pack_command` (one C call) is as quick or quicker.
FRAME_IN_PYTHON_FROM = 8


def _frame(command: tuple[Any, ...], parts: list[Any]) -> bool:
    """Append `command` to `parts` framed as RESP, the bytes `pack_command` makes; False
    (nothing appended) when an argument is not exactly bytes, str or int, or a str is not
    encodable (then `pack_command` frames it, or raises its own error)."""
    framed: list[Any] = [b"*%d\r\n" % len(command)]
    append = framed.append
    for arg in command:
        kind = type(arg)
        if kind is bytes:
            value = arg
        elif kind is str:
            try:
                value = arg.encode()
            except UnicodeEncodeError:
                return False
        elif kind is int:
            value = b"%d" % arg
        else:
            return False
        append(b"$%d\r\n" % len(value))
        append(value)
        append(b"\r\n")
    parts += framed
    return True


def send_commands(connection: Any, commands: Sequence[tuple[Any, ...] | Framed]) -> None:
    """Send `commands` in one write (one system call, not one per command); their replies
    are read with `read_replies`."""
    parts: list[Any] = []
    for command in commands:
        if isinstance(command, Framed):
            parts += command.parts
        elif (
            len(command) <= FRAME_IN_PYTHON_FROM
            or type(command[-1]) is not bytes
            or not _frame(command, parts)
        ):
            parts.append(pack_command(command))
    connection.send_packed_command([b"".join(parts)])


def read_replies(connection: Any, count: int) -> list[Any]:
    """Read `count` replies (errors inside EXEC stay values); raise the first error after.

    With redis-py's hiredis parser, the replies already received are taken from its
    reader in a loop (the +QUEUED of a long transaction: one C call each, not a
    `read_response` each); the socket is read only through `read_response`, so its
    timeouts, connection errors and disconnects stay redis-py's. A reply that redis-py
    raises (a connection error) is raised, after a disconnect; a RESP3 push message goes
    to the parser's handler, as in `read_response`. Without that parser (another
    redis-py, or no hiredis), every reply is read with `read_response`.
    """
    parser, reader = _buffered_reader(connection)
    replies: list[Any] = []
    error: ResponseError | None = None
    while len(replies) < count:
        if reader is not None:
            try:
                reply = reader.gets()
            except BaseException:  # a protocol error: the stream is lost, as redis-py does
                connection.disconnect()
                raise
            if reply is not _NOT_ENOUGH_DATA:
                if type(reply) is bytes:  # the usual (+QUEUED): none of the cases below
                    replies.append(reply)
                    continue
                if _PUSH is not None and isinstance(reply, _PUSH):
                    parser.handle_push_response(reply)  # RESP3: as read_response does
                    continue
                if isinstance(reply, list) and reply and isinstance(reply[0], ConnectionError):
                    reply = reply[0]  # redis-py raises these, as read_response would
                if isinstance(reply, ConnectionError):
                    connection.disconnect()
                    raise reply
                if isinstance(reply, ResponseError):
                    error = error or reply
                replies.append(reply)
                continue
        try:  # nothing buffered (or no such reader): redis-py reads the socket
            replies.append(connection.read_response())
        except ResponseError as exc:  # read every reply before raising, or the next ones stay
            replies.append(exc)
            error = error or exc
    if error is not None:
        raise error
    return replies


def _buffered_reader(connection: Any) -> tuple[Any, Any]:
    """redis-py's hiredis parser on `connection` and its reader, or (None, None)."""
    parser = getattr(connection, "_parser", None)
    if _HIREDIS_PARSER is None or _NOT_ENOUGH_DATA is None:
        return None, None
    if not isinstance(parser, _HIREDIS_PARSER) or not hasattr(parser, "handle_push_response"):
        return None, None
    return parser, getattr(parser, "_reader", None)
