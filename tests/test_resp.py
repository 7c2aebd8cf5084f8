"""worker/resp.py against a real Redis: the replies of a long transaction, read in bulk.

Each case runs on redis-py's hiredis parser over RESP3 (redis-py's default) and
RESP2, and on its pure-Python parser (every reply through `read_response`): the
replies and the errors raised must be the same whichever reads them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_lib
from hiredis import pack_command
from redis._parsers import _RESP2Parser, _RESP3Parser
from redis.connection import Connection
from redis.exceptions import ExecAbortError, ResponseError

from worker.apply import _appends
from worker.resp import read_replies, send_commands

PARSERS = {
    "hiredis-resp3": {"protocol": 3},
    "hiredis-resp2": {"protocol": 2},
    "python-resp3": {"protocol": 3, "parser_class": _RESP3Parser},
    "python-resp2": {"protocol": 2, "parser_class": _RESP2Parser},
}


@pytest.fixture(params=list(PARSERS))
def connection(request: pytest.FixtureRequest, redis: redis_lib.Redis) -> Iterator[Any]:
    kwargs = redis.get_connection_kwargs()
    conn = Connection(host=kwargs["host"], port=kwargs["port"], **PARSERS[request.param])
    conn.connect()
    try:
        yield conn
    finally:
        conn.disconnect()


def _transaction(commands: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [("MULTI",), *commands, ("EXEC",)]


def test_a_long_transaction_s_replies(connection: Any, redis: redis_lib.Redis) -> None:
    # Values larger than a socket read (64 KiB), so the replies arrive in several reads.
    redis.set("a-string", "x")
    commands = [("APPEND", f"held:{n}", b"v" * 300) for n in range(600)]
    commands += [("ZADD", "due", "LT", *(x for n in range(600) for x in (n, f"s{n}")))]
    commands += [("GET", f"held:{n}") for n in range(600)]
    sent = _transaction(commands)
    send_commands(connection, sent)
    replies = read_replies(connection, len(sent))
    assert len(replies) == len(sent)
    assert all(r in (b"OK", "OK", b"QUEUED", "QUEUED") for r in replies[:-1])
    results = replies[-1]
    assert results[:600] == [300] * 600
    assert results[600] == 600
    assert results[601:] == [b"v" * 300] * 600
    send_commands(connection, [("PING",)])  # every reply was read: the next one is PING's
    assert read_replies(connection, 1)[0] in (b"PONG", "PONG", True)


def test_an_error_inside_exec_stays_a_value(connection: Any, redis: redis_lib.Redis) -> None:
    redis.set("a-string", "x")
    sent = _transaction([("SET", "k", 1), ("LPUSH", "a-string", "y"), ("INCR", "k")])
    send_commands(connection, sent)
    results = read_replies(connection, len(sent))[-1]
    assert results[0] in (b"OK", "OK", True)
    assert isinstance(results[1], ResponseError) and "WRONGTYPE" in str(results[1])
    assert results[2] == 2


def test_a_queueing_error_raises_after_every_reply_is_read(connection: Any) -> None:
    sent = _transaction([("SET", "k", 1), ("SET", "k"), ("INCR", "k")])
    send_commands(connection, [*sent, ("PING",)])
    with pytest.raises(ResponseError, match="wrong number of arguments") as raised:
        read_replies(connection, len(sent))
    assert not isinstance(raised.value, ExecAbortError)  # the first error is raised
    assert read_replies(connection, 1)[0] in (b"PONG", "PONG", True)  # EXECABORT was read


def test_exec_abort_is_redis_py_s_typed_error(connection: Any) -> None:
    send_commands(connection, [("MULTI",), ("SET", "k"), ("EXEC",), ("PING",)])
    with pytest.raises(ResponseError, match="wrong number of arguments"):
        read_replies(connection, 2)
    with pytest.raises(ExecAbortError):
        read_replies(connection, 1)
    assert read_replies(connection, 1)[0] in (b"PONG", "PONG", True)


def test_a_watch_abort_is_a_nil_exec(connection: Any, redis: redis_lib.Redis) -> None:
    send_commands(connection, [("WATCH", "marker")])
    read_replies(connection, 1)
    redis.set("marker", "other")
    sent = _transaction([("SET", "marker", "mine"), ("LLEN", "queue")])
    send_commands(connection, sent)
    assert read_replies(connection, len(sent))[-1] is None
    assert redis.get("marker") == b"other"


def test_the_replies_are_read_in_bulk(redis: redis_lib.Redis) -> None:
    """With the hiredis parser, `read_response` is called for socket reads, not per reply."""
    kwargs = redis.get_connection_kwargs()
    client = redis_lib.Redis(host=kwargs["host"], port=kwargs["port"])
    connection = client.connection_pool.get_connection()
    calls = []
    read_response = connection.read_response

    def counted(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        return read_response(*args, **kw)

    connection.read_response = counted
    try:
        sent = _transaction([("APPEND", f"held:{n}", b"v") for n in range(200)])
        send_commands(connection, sent)
        assert read_replies(connection, len(sent))[-1] == [1] * 200
        assert len(calls) < 10
    finally:
        client.connection_pool.release(connection)
        client.close()


def test_appends_framed_by_hand_are_redis_py_s(connection: Any, redis: redis_lib.Redis) -> None:
    """The apply's held-record APPENDs (`_appends`) send what pack_command would: per
    session, its values joined, appended to its key."""
    key = "held:{p:0}:s é"
    values = [b"a\r\n" * 100, b"", b"\x1f\x00b" * 3000]
    framed = _appends({"s": key, "t": "new"}, {"s": values, "t": [b"x", b"y"]})
    assert b"".join(framed.parts) == pack_command(
        ("APPEND", key.encode(), b"".join(values))
    ) + pack_command(("APPEND", b"new", b"xy"))
    redis.set(key, b"before")
    send_commands(connection, [framed])
    assert read_replies(connection, 2) == [6 + len(b"".join(values)), 2]
    assert redis.get(key) == b"before" + b"".join(values) and redis.get(b"new") == b"xy"


class _Sent:
    """A connection that keeps what `send_commands` writes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def send_packed_command(self, packed: list[bytes]) -> None:
        self.written += packed


def test_long_commands_are_framed_as_pack_command_frames_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Long commands are framed in Python: byte for byte what hiredis' pack_command makes,
    for bytes, str (UTF-8), int (negative, big) and mixed; other types and strings UTF-8
    cannot encode go to pack_command as ever (its errors too)."""
    packed: list[tuple[Any, ...]] = []

    def counted(command: tuple[Any, ...]) -> bytes:
        packed.append(command)
        return pack_command(command)

    monkeypatch.setattr("worker.resp.pack_command", counted)
    rows = [b'{"a":"\\u00e9\r\n"}' * n for n in range(12)] + [b""]
    commands: list[tuple[Any, ...]] = [
        ("RPUSH", "{p:0}:queue", *rows),
        ("HSET", "{p:0}:v", *(x for n in range(20) for x in (f"sé:{n} %", b"%d;0;{" % n))),
        ("ZADD", "k", "LT", *(x for n in range(20) for x in (-(10**n), b"m"))),
        ("HSET", b"h", *("f", 0, "g", 2**70, b"x", "", "y", "z", "w", -1, "v", b"\x1f")),
        ("ZADD", "k", *(x for n in range(10) for x in (n / 3, f"m{n}".encode()))),  # floats
        ("EVAL", "return 1", 3, "a", "b", "c", "list", "hash", "zset"),  # ends with a str
        ("SET", "k", b"v"),  # short
    ]
    for command in commands:
        sent = _Sent()
        send_commands(sent, [command, ("PING",), command])
        ping = pack_command(("PING",))
        assert sent.written == [pack_command(command) + ping + pack_command(command)]
    # hiredis packed the short ones, those with a float, and those not ending with bytes
    hiredis = ["ZADD", "PING", "ZADD", "EVAL", "PING", "EVAL", "SET", "PING", "SET"]
    assert [c[0] for c in packed] == ["PING"] * 4 + hiredis
    for bad in (("RPUSH", "q", "\ud800", *[b"x"] * 10), ("RPUSH", "q", True, *[b"x"] * 10)):
        with pytest.raises(Exception) as expected:
            pack_command(bad)
        with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
            send_commands(_Sent(), [bad])
