"""A hung ClickHouse cannot hold a shard: a real server frozen by SIGSTOP mid-INSERT.

The server is ClickHouse 26.x from the chDB package serving the native
protocol (tests/support/chdb_server.py), a process of its own that SIGSTOP
freezes whole: it accepts connections (the kernel does) and answers nothing,
as a server stuck in a long GC-like pause, a hung disk or a paused VM does.
It knows `insert_deduplication_token`, which the exactly-once checks rest on
(Debian's 18.16 does not).

- The sinks' own timeouts: a native INSERT into the frozen server fails as
  retryable after `EVENT_BUFFER_CLICKHOUSE_INSERT_TIMEOUT_S` (clickhouse-driver's
  default would wait 300 s per socket operation); an embedded (chDB) INSERT
  that runs past it fails with ClickHouse's TIMEOUT_EXCEEDED.
- The whole flush: flusher A (tests/support/hung_flusher.py, a real process)
  inserts its first chunk, the test freezes the server and lets A's second
  INSERT go into it, while another flusher (this process, as Beat's next tick
  would) keeps trying the shard. Either A's insert timeout fails its flush
  and frees the shard, or, when that timeout cannot fire (A's sink waits
  300 s: as an in-process chDB call cannot be abandoned), A's lock watchdog
  stops extending after `EVENT_BUFFER_FLUSH_STALL_S` without progress and the
  other flusher takes the shard over while A is still stuck. After SIGCONT the
  other flusher re-drives A's claim; A, woken, is fenced: it never
  acknowledges. Every event is in ClickHouse exactly once.
- The time limit: a real prefork flush worker whose INSERT into the frozen
  server would wait 300 s is interrupted by `process_buffer`'s soft time limit,
  and its next run flushes the claim it left open.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis as redis_lib

from tests.support.celery_procs import project_env
from tests.support.celery_procs import worker as celery_worker
from tests.support.exactly_once import open_claim
from tests.support.native_server import ChdbServer, chdb_serves
from tests.support.polling import wait_until
from tests.test_lock_expiry import send
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.errors import RetryableSinkError
from worker.flusher import Flusher, FlushResult
from worker.keys import ShardKeys
from worker.names import TASK_PROCESS_BUFFER
from worker.settings import Settings
from worker.sinks import sink_for
from worker.sinks.chdb import ChdbSink
from worker.sinks.native import NativeSink

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).resolve().parent / "support" / "hung_flusher.py"
EXIT_FAILED = 2
EXIT_LOCK_LOST = 3
# Small bounds, so the test runs in seconds: connect 1 s, insert 2 s, stall 4 s, lock 3 s
# (its heartbeat is stale 2 s after the last extension).
TIMEOUTS = {
    "EVENT_BUFFER_CLICKHOUSE_CONNECT_TIMEOUT_S": "1",
    "EVENT_BUFFER_CLICKHOUSE_INSERT_TIMEOUT_S": "2",
    "EVENT_BUFFER_FLUSH_STALL_S": "4",
    "EVENT_BUFFER_LOCK_TTL_S": "3",
}
# The shard leaves A within ~8 s of the freeze (stall 4 s + stale 2 s + a watchdog
# step); A's timeouts without the fix are 300 s. Generous for a loaded machine.
BOUND_S = 30
EVENTS, BATCH, CHUNK = 30, 30, 10


class FrozenServer(ChdbServer):
    """A chDB server that the test can SIGSTOP and SIGCONT."""

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    @contextmanager
    def frozen(self) -> Iterator[None]:
        self.freeze()
        try:
            yield
        finally:
            self.thaw()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrozenServer]:
    why_not = chdb_serves()
    if why_not is not None:
        pytest.skip(f"no ClickHouse server to freeze: {why_not}")
    server = FrozenServer(tmp_path_factory.mktemp("frozen-clickhouse"))
    try:
        server.start()
        yield server
    finally:
        server.thaw()
        server.stop()


@pytest.fixture
def url(server: FrozenServer) -> Iterator[str]:
    """A database of its own on the server, with the `events` table."""
    database = f"hung_{uuid.uuid4().hex[:12]}"
    parts = urlsplit(server.url)
    url = urlunsplit(parts._replace(path=f"/{database}"))
    admin = NativeSink(url)
    admin.migrate()
    admin.close()
    yield url
    server.thaw()
    admin = NativeSink(url)
    try:
        admin.query(f"DROP DATABASE IF EXISTS {database}")
    finally:
        admin.close()


def stored(url: str) -> tuple[int, set[str]]:
    sink = NativeSink(url)
    try:
        [(rows,)] = sink.query("SELECT count() FROM events")
        ids = {row[0] for row in sink.query("SELECT toString(id) FROM events")}
    finally:
        sink.close()
    return int(rows), ids


def events_rows(count: int) -> list[bytes]:
    return [
        json.dumps(
            {
                "id": str(uuid.uuid4()),
                "name": "click",
                "project_id": "p-hung",
                "created_at": "2026-01-01 00:00:00.000",
            }
        ).encode()
        for _ in range(count)
    ]


def in_thread(call: Any) -> tuple[threading.Thread, list[BaseException | None]]:
    """Run `call` in a daemon thread; the list gets its exception (None: it returned)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# -- the sinks' timeouts -------------------------------------------------------------------


def test_a_native_insert_into_a_frozen_server_times_out(server: FrozenServer, url: str) -> None:
    """Both an open connection's INSERT and a new connection's handshake give up after the
    insert timeout (the server's answer never comes); after SIGCONT, the INSERT the frozen
    server received lands once, whatever its client made of it."""
    rows = events_rows(5)
    open_sink = NativeSink(url, connect_timeout_s=1, insert_timeout_s=1)
    new_sink = NativeSink(url, connect_timeout_s=1, insert_timeout_s=1)
    try:
        open_sink.write(events_rows(1), "warm-up")  # connected before the freeze
        with server.frozen():
            writes = [
                in_thread(lambda: open_sink.write(rows, "frozen-0")),
                in_thread(lambda: new_sink.write(rows, "frozen-0")),
            ]
            for thread, _ in writes:
                thread.join(BOUND_S)
                assert not thread.is_alive(), "an INSERT into the frozen server did not time out"
            for _, outcome in writes:
                assert isinstance(outcome[0], RetryableSinkError), outcome
                assert outcome[0].code == 209  # SOCKET_TIMEOUT
        open_sink.write(rows, "frozen-0")  # the flusher's retry: the same token
    finally:
        open_sink.close()
        new_sink.close()
    count, _ = stored(url)
    assert count == 1 + len(rows)


def test_an_embedded_insert_past_its_timeout_fails_as_retryable(sink: ChdbSink) -> None:
    """chDB runs in-process: the timeout is ClickHouse's own `max_execution_time`, which
    the engine checks as it works. A materialized view sleeping 0.9 s per row makes an
    INSERT of 3 rows take 2.7 s; with a 1 s timeout it fails as retryable, and the
    retry (same token, the view dropped) stores the rows once."""
    sink.query("CREATE TABLE slow (y UInt8) ENGINE = Null")
    sink.query(
        "CREATE MATERIALIZED VIEW slow_view TO slow AS SELECT sleepEachRow(0.9) AS y FROM events"
    )
    rows = events_rows(3)
    bounded = ChdbSink(sink.path, sink.table, insert_timeout_s=1)
    try:
        with pytest.raises(RetryableSinkError, match="TIMEOUT_EXCEEDED") as raised:
            bounded.write(rows, "slow-0")
        assert raised.value.code == 159
        bounded.query("DROP VIEW slow_view")
        bounded.write(rows, "slow-0")
        [(count,)] = bounded.query("SELECT count() FROM events")
    finally:
        bounded.close()
    assert int(count) == len(rows)


# -- a flush caught by the freeze ----------------------------------------------------------


class Lines:
    """JSON lines of a child's stdout, read on a thread."""

    def __init__(self, stream: IO[str]) -> None:
        self.items: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.items.append(json.loads(line))

    def first(self, key: str) -> Any:
        wait_until(lambda: any(key in item for item in self.items), BOUND_S, f"a {key!r} line")
        return next(item[key] for item in self.items if key in item)

    def all(self, key: str) -> list[Any]:
        self._thread.join(BOUND_S)
        return [item[key] for item in self.items if key in item]


class OtherFlusher:
    """Another flusher of the shard, as Beat's ticks run it: `process_buffer` again and
    again (after the shard's back-off, as production does) until the buffer is empty."""

    def __init__(self, redis: redis_lib.Redis, settings: Settings) -> None:
        self.flusher = Flusher(redis, settings, lambda: sink_for(settings))
        self.buffer = EventBuffer(redis, settings)
        self.results: list[FlushResult] = []
        self.thread, self.outcome = in_thread(self._run)

    def _run(self) -> None:
        deadline = time.monotonic() + 3 * BOUND_S
        while self.buffer.get_buffer_size() > 0:
            assert time.monotonic() < deadline, "the other flusher never drained the shard"
            shards = self.flusher.process_buffer().shards
            self.results += shards
            if not any(result.batches for result in shards):
                time.sleep(0.05)

    def finish(self) -> list[FlushResult]:
        self.thread.join(3 * BOUND_S)
        assert self.outcome == [None], self.outcome
        return self.results


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait()


def start_flusher_a(
    settings: Settings, extra: Sequence[str], tmp: Path, children: list[subprocess.Popen[str]]
) -> tuple[subprocess.Popen[str], Lines, Path]:
    errors = tmp / "flusher-a.err"
    with errors.open("w") as err:
        child = subprocess.Popen(
            [
                sys.executable,
                str(RUNNER),
                settings.redis_url,
                settings.clickhouse_url,
                str(BATCH),
                str(CHUNK),
                "--lock-ttl",
                TIMEOUTS["EVENT_BUFFER_LOCK_TTL_S"],
                "--connect-timeout",
                TIMEOUTS["EVENT_BUFFER_CLICKHOUSE_CONNECT_TIMEOUT_S"],
                "--insert-timeout",
                TIMEOUTS["EVENT_BUFFER_CLICKHOUSE_INSERT_TIMEOUT_S"],
                "--stall",
                TIMEOUTS["EVENT_BUFFER_FLUSH_STALL_S"],
                "--gate-write",
                "2",
                *extra,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    children.append(child)
    assert child.stdout is not None
    return child, Lines(child.stdout), errors


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("insert timeout", id="insert-timeout"),
        pytest.param("stall bound", id="stall-bound"),
    ],
)
def test_a_server_frozen_mid_insert_does_not_hold_the_shard(
    case: str,
    redis: redis_lib.Redis,
    redis_url: str,
    server: FrozenServer,
    url: str,
    tmp_path: Path,
    children: list[subprocess.Popen[str]],
) -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": redis_url,
            "CLICKHOUSE_URL": url,
            "EVENT_BUFFER_BATCH_SIZE": str(BATCH),
            "EVENT_BUFFER_CHUNK_SIZE": str(CHUNK),
            "EVENT_BUFFER_REORDER_WINDOW_MS": "0",
            **TIMEOUTS,
        }
    )
    lock = ShardKeys(settings.key_prefix, 0).lock
    sent = send(redis, settings, EVENTS)
    # With the stall bound, A's INSERT waits 300 s (clickhouse-driver's default): a
    # timeout that does not fire; only the watchdog's bound can free the shard then.
    extra = ["--sink-insert-timeout", "300"] if case == "stall bound" else []
    a, a_lines, a_errors = start_flusher_a(settings, extra, tmp_path, children)

    token = a_lines.first("inserting")  # chunk 0 is in; A is about to send chunk 1
    claim = token.rsplit(":", 1)[0]
    assert token == f"{claim}:1"
    a_lock = redis.get(lock)
    assert a_lock is not None
    with server.frozen():
        assert a.stdin is not None
        a.stdin.write("go\n")
        a.stdin.flush()
        other = OtherFlusher(redis, settings)
        if case == "insert timeout":
            # A's INSERT gives up: its flush fails, and its lock is released for the next.
            a.wait(BOUND_S)
            assert a.returncode == EXIT_FAILED, a_errors.read_text()
        else:
            wait_until(
                lambda: redis.get(lock) not in (None, a_lock),
                BOUND_S,
                "another flusher to take the shard over from A",
                detail=a_errors.read_text,
            )
            assert a.poll() is None, "A must still be inside its INSERT"
            assert "flush of shard 0 made no progress for" in a_errors.read_text()
    results = other.finish()  # its INSERTs reach the thawed server

    assert claim in [c for result in results for c in result.claims]
    assert any(result.redriven for result in results)
    a.wait(BOUND_S)
    flushed = a_lines.all("flush")
    if case == "stall bound":
        # Woken by the thaw, A's INSERT returned: it stops at its lock check, no ack.
        assert a.returncode == EXIT_LOCK_LOST, a_errors.read_text()
        assert "no progress" in flushed[0]["error"]
    assert [f["batches"] for f in flushed] == [0]
    assert flushed[0]["claims"] == []
    assert a_lines.all("write") == [f"{claim}:0"] + ([token] if case == "stall bound" else [])

    count, ids = stored(url)
    assert count == len(sent), f"{count} rows in ClickHouse for {len(sent)} events"
    assert ids == sent
    assert redis.hget(ShardKeys(settings.key_prefix, 0).claim, "id") is None
    assert EventBuffer(redis, settings).get_buffer_size() == 0


# -- the time limit of a run -----------------------------------------------------------------


def test_a_process_buffer_run_stuck_past_its_time_limit_is_interrupted(
    redis: redis_lib.Redis, redis_url: str, server: FrozenServer, url: str, tmp_path: Path
) -> None:
    """A real prefork flush worker whose INSERT into the frozen server would wait 300 s
    (tests/support/hanging_flush.py: a timeout that does not fire). Celery's soft time
    limit (one INSERT of up to 1 + 2 s, plus the 3 s lock TTL: 6 s) interrupts the run;
    the pool process is free for the next run, which, the server thawed, flushes the
    claim the interrupted one left open: every event once."""
    env = project_env(
        REDIS_URL=redis_url,
        CLICKHOUSE_URL=url,
        EVENT_BUFFER_BATCH_SIZE="3",
        EVENT_BUFFER_CHUNK_SIZE="3",
        EVENT_BUFFER_REORDER_WINDOW_MS="0",
        SINK_INSERT_TIMEOUT_S="300",
        **TIMEOUTS,
    )
    settings = Settings.from_env(env)
    assert settings.flush_time_limit_s[0] == 6
    sent = send(redis, settings, 3)
    proc = celery_worker(
        env,
        tmp_path / "worker.log",
        "-Q",
        "flush",
        "-P",
        "prefork",
        "-c",
        "1",
        app="tests.support.hanging_flush",
    )
    app = create_app(settings)
    buffer = EventBuffer(redis, settings)
    try:
        proc.wait_for("ready.")
        with server.frozen():
            app.send_task(TASK_PROCESS_BUFFER, queue="flush")
            proc.wait_for("Soft time limit (6s) exceeded", BOUND_S)
            proc.wait_for("raised unexpected: SoftTimeLimitExceeded", BOUND_S)  # not a sink error
        assert open_claim(redis, settings) is not None
        app.send_task(TASK_PROCESS_BUFFER, queue="flush")
        wait_until(
            lambda: buffer.get_buffer_size() == 0,
            BOUND_S,
            "the next run to flush the shard",
            detail=proc.text,
        )
    finally:
        proc.kill()
        app.close()
    count, ids = stored(url)
    assert count == len(sent) and ids == sent
    assert open_claim(redis, settings) is None
