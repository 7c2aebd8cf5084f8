"""The Lua scripts survive losing Redis's script cache (NOSCRIPT).

Scripts run by EVALSHA. After SCRIPT FLUSH, or a Redis restart (the script
cache is never persisted), Redis answers NOSCRIPT until they are loaded
again; redis-py's registered scripts reload them (`Script.__call__` on
NOSCRIPT, `Pipeline.execute` by SCRIPT EXISTS before it sends the batch).
These tests check that apply (whose EVAL inside its transaction never
meets NOSCRIPT), claim and ack keep working across both, including in the
middle of a flush (between claim and ack).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis as redis_lib

from tests.support.dates import BASE_MS
from tests.support.servers import RedisServer
from tests.support.sinks import DelegatingSink
from worker.buffer import EventBuffer
from worker.events import Event, as_row, decode_row, parse_event
from worker.flusher import Flusher
from worker.scripts import load_lua
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink

T0 = BASE_MS


def view(n: int, created_ms: int, session: str = "s1") -> Event:
    return parse_event(
        {
            "id": f"00000000-0000-0000-0000-{n:012d}",
            "name": "screen_view",
            "project_id": "proj",
            "profile_id": "u1",
            "session_id": session,
            "created_at": created_ms,
        }
    )


def click(n: int, created_ms: int) -> Event:
    return parse_event(
        {
            "id": f"00000000-0000-0000-0000-{n:012d}",
            "name": "click",
            "project_id": "proj",
            "created_at": created_ms,
        }
    )


def script_shas(redis: redis_lib.Redis) -> list[str]:
    return [redis.script_load(load_lua(stem)) for stem in ("claim", "ack")]


def scripts_cached(redis: redis_lib.Redis, shas: list[str]) -> list[bool]:
    return [bool(found) for found in redis.script_exists(*shas)]


def queued(redis: redis_lib.Redis, buffer: EventBuffer) -> list[tuple[str, int]]:
    shard = buffer.keyspace.shard(0)
    return [(row.id, row.duration) for row in map(decode_row, redis.lrange(shard.queue, 0, -1))]


class HookedSink(DelegatingSink):
    """A real ChdbSink that runs `after_write` once, after its first INSERT:
    the flush is then between claim and ack."""

    def __init__(self, inner: ChdbSink, after_write: Callable[[], None]) -> None:
        super().__init__(inner)
        self.after_write: Callable[[], None] | None = after_write

    def write(self, rows: Sequence[bytes], token: str) -> None:
        self.inner.write(rows, token)
        hook, self.after_write = self.after_write, None
        if hook is not None:
            hook()


def flush_all(flusher: Flusher, buffer: EventBuffer) -> None:
    for _ in range(20):
        if buffer.get_buffer_size() == 0:
            return
        results = flusher.process_buffer().shards
        assert all(result.locked for result in results)
    raise AssertionError("the buffer did not drain")


def stored(sink: ChdbSink) -> list[tuple[str, int]]:
    try:
        rows = sink.query("SELECT toString(id), duration FROM events ORDER BY id")
    finally:
        sink.close()
    return [(row_id, int(duration)) for row_id, duration in rows]


def test_script_flush_between_batches_and_mid_flush(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    buffer = EventBuffer(redis, settings)
    shas = script_shas(redis)

    buffer.apply([view(1, T0)])
    redis.script_flush()
    assert scripts_cached(redis, shas) == [False, False]

    # The second view finds the first one (stored before the flush) and queues it.
    buffer.apply([view(2, T0 + 1500), click(3, T0 + 1600)])
    # (The queue's order is not a promise: the flush sorts rows by time.)
    assert sorted(queued(redis, buffer)) == sorted([(view(1, T0).id, 1500), (click(3, T0).id, 0)])
    last = buffer.get_last_screen_view(session_id="s1")
    assert last is not None and last.id == view(2, T0).id

    # Claim after a SCRIPT FLUSH, and ack after another one between claim and ack.
    redis.script_flush()
    flusher = Flusher(
        redis, settings, lambda: HookedSink(ChdbSink(sink.path, sink.table), redis.script_flush)
    )
    flush_all(flusher, buffer)

    assert stored(sink) == sorted([(view(1, T0).id, 1500), (click(3, T0).id, 0)])
    assert not redis.exists(buffer.keyspace.shard(0).claim)
    # The ack ran after the mid-flush SCRIPT FLUSH: it was loaded again.
    assert scripts_cached(redis, shas) == [False, True]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis the test may SIGKILL and restart on the same port. With an
    append-only file the data survives the kill; the script cache does not."""
    server = RedisServer(tmp_path / "redis", "--appendonly", "yes")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_restart_between_applies_and_mid_flush(
    own_redis: RedisServer, chdb_url: str, sink: ChdbSink
) -> None:
    # No reorder window: the views are applied at once (held views: test_reorder.py).
    settings = Settings.from_env(
        {
            "REDIS_URL": own_redis.url,
            "CLICKHOUSE_URL": chdb_url,
            "EVENT_BUFFER_REORDER_WINDOW_MS": "0",
        }
    )
    client = redis_lib.Redis.from_url(own_redis.url)
    try:
        buffer = EventBuffer(client, settings)
        shas = script_shas(client)

        buffer.apply([view(1, T0)])
        own_redis.kill()
        own_redis.start()
        assert scripts_cached(client, shas) == [False, False]
        assert buffer.get_last_screen_view(session_id="s1") == as_row(view(1, T0))

        # Same client, same connection pool: a dead connection, then NOSCRIPT.
        buffer.apply([view(2, T0 + 2500)])
        assert queued(client, buffer) == [(view(1, T0).id, 2500)]

        # Redis restarts again between the claim and the ack of a flush.
        def restart() -> None:
            own_redis.kill()
            own_redis.start()

        flusher = Flusher(
            client, settings, lambda: HookedSink(ChdbSink(sink.path, sink.table), restart)
        )
        flush_all(flusher, buffer)

        assert stored(sink) == [(view(1, T0).id, 2500)]
        assert not client.exists(buffer.keyspace.shard(0).claim)
        last = buffer.get_last_screen_view(session_id="s1")
        assert last is not None and last.id == view(2, T0).id
    finally:
        client.close()
