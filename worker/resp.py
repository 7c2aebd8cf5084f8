"""Commands on one connection, sent in one write and answered in order (RESP, by hand).

The apply's and the release's transactions (worker/apply.py,
worker/reorder_release.py) run on a connection of their own: every command
of a step is packed by hiredis as it is (bytes, str, int: no encoding of each
in Python first), sent in one system call, and the replies are read after.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hiredis import pack_command
from redis.exceptions import ResponseError


def send_commands(connection: Any, commands: Sequence[tuple[Any, ...]]) -> None:
    """Send `commands` in one write (one system call, not one per command); their replies
    are read with `read_replies`."""
    connection.send_packed_command([b"".join([pack_command(command) for command in commands])])


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
