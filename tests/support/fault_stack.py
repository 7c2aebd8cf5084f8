"""The fault suite's system: a whole eventbuffer under load, and its accounting.

A scenario builds a `Stack` (its own redis-server for the buffer, optionally
a second one or RabbitMQ as the broker, embedded ClickHouse in a temporary
directory, Celery ingest/flush workers and Beat as real subprocesses), drives
it with a `Load` (`tests/support/fault_load.py`), injects its fault, waits
until the system has drained (`Stack.wait_drained`), stops every process and
compares ClickHouse with the ids the producer accepted (`Stack.tally`).

Every wait is bounded; every process is stopped by `Stack.close()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_lib
from celery import Celery

from tests.support.celery_procs import CeleryProcess, beat, ingest_backlog, project_env, worker
from tests.support.fault_load import (
    Load,
)
from tests.support.fault_results import (
    ScenarioResult,
    record,
)
from tests.support.servers import RedisServer
from tests.support.sinks import query_when_free
from tests.support.traffic import ReferenceTraffic
from worker.celery import create_app
from worker.keys import CHANNEL_SAVED, Keyspace
from worker.settings import Settings
from worker.sinks import open_sink


class SavedCounter:
    """Sums the rows of every `events:saved` notice: rows acknowledged out of the buffer.

    Resubscribes after a Redis restart (notices published while it was not
    subscribed are missed: `wait_drained` then falls back to quiescence).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.rows = 0
        self.notices = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="saved-counter", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "could not subscribe to events:saved"

    def _run(self) -> None:
        while not self._stop.is_set():
            client = redis_lib.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=1)
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL_SAVED)
                self._ready.set()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message and message["type"] == "message":
                        self.rows += int(json.loads(message["data"])["rows"])
                        self.notices += 1
            except (redis_lib.RedisError, OSError):
                self._stop.wait(0.1)
            finally:
                with contextlib.suppress(Exception):
                    client.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def amqp_queue_depth(app: Celery, name: str) -> int:
    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(name, passive=True).message_count)


@dataclass
class Tally:
    sent: int
    landed: int
    missing: int
    duplicated: int
    unexpected: int
    wrong_durations: int
    missing_ids: list[str] = field(default_factory=list)
    wrong_examples: list[tuple[str, int, list[int]]] = field(default_factory=list)


class Stack:
    """One system under test: Redis (buffer, maybe broker), ClickHouse dir, Celery processes."""

    def __init__(
        self,
        tmp: Path,
        *,
        buffer_args: tuple[str, ...] = (),
        broker: str = "same",  # "same": the buffer Redis; "redis": a second own Redis; or a URL
        broker_args: tuple[str, ...] = (),
        **env: str,
    ) -> None:
        self.tmp = tmp
        self.procs: list[CeleryProcess] = []
        self.popens: list[subprocess.Popen[Any]] = []
        self.loads: list[Load] = []
        self.servers: list[RedisServer] = []
        self.buffer_server = self._server(tmp / "redis", buffer_args)
        self.broker_server: RedisServer | None = None
        if broker == "same":
            broker_url = ""
        elif broker == "redis":
            self.broker_server = self._server(tmp / "broker", broker_args)
            broker_url = self.broker_server.url
        else:
            broker_url = broker
        # CLICKHOUSE_URL in `env` (a ClickHouse server) replaces the embedded default.
        self.chdb_url = env.get("CLICKHOUSE_URL") or f"chdb://{tmp / 'clickhouse'}"
        defaults = {
            "REDIS_URL": self.buffer_server.url,
            "CELERY_BROKER_URL": broker_url,
            "CLICKHOUSE_URL": self.chdb_url,
            "EVENT_BUFFER_FLUSH_INTERVAL_S": "1",
            "EVENT_BUFFER_VISIBILITY_TIMEOUT_S": "60",
            "EVENT_BUFFER_CONSUMER_TIMEOUT_S": "3",
            "EVENT_BUFFER_LOCK_TTL_S": "3",
            "EVENT_BUFFER_MAX_BATCHES_PER_FLUSH": "20",
        }
        self.env = project_env(**{**defaults, **env})
        self.settings = Settings.from_env(self.env)
        self.keyspace = Keyspace(self.settings.key_prefix, self.settings.shards)
        self.redis = redis_lib.Redis.from_url(
            self.buffer_server.url, socket_timeout=5, socket_connect_timeout=2
        )
        self.app = create_app(self.settings)
        self.is_amqp = self.settings.effective_broker_url.startswith(("amqp", "pyamqp"))
        if self.is_amqp:
            with self.app.connection_for_write() as conn:  # start from empty queues
                channel = conn.default_channel
                for q in self.app.conf.task_queues:
                    channel.queue_delete(q.name)
                    q(channel).declare()
        sink = open_sink(self.chdb_url)
        try:
            sink.migrate()
        finally:
            sink.close()
        self.saved = SavedCounter(self.buffer_server.url)

    def _server(self, directory: Path, args: tuple[str, ...]) -> RedisServer:
        server = RedisServer(directory, *args)
        server.start()
        self.servers.append(server)
        return server

    # -- processes ----------------------------------------------------------

    def ingest_worker(
        self, *extra: str, name: str = "ingest", queues: str = "ingest"
    ) -> CeleryProcess:
        args = extra or ("-c", "1")
        proc = worker(self.env, self.tmp / f"{name}.log", "-Q", queues, "-n", f"{name}@%h", *args)
        self.procs.append(proc)
        return proc

    def flush_worker(self, name: str = "flush") -> CeleryProcess:
        proc = worker(self.env, self.tmp / f"{name}.log", "-Q", "flush", "-P", "solo",
                      "-n", f"{name}@%h")  # fmt: skip
        self.procs.append(proc)
        return proc

    def beat(self) -> CeleryProcess:
        proc = beat(self.env, self.tmp / "beat.log", self.tmp / "beat-schedule")
        self.procs.append(proc)
        return proc

    def readme_layout(self, ready_s: float = 60) -> tuple[list[CeleryProcess], CeleryProcess]:
        """The README's layout, ready: two `-P solo` ingest workers (on `ingest` and
        Celery's default queue), a solo flush worker, and Beat. Returns (ingest, flush)."""
        ingest = [
            self.ingest_worker("-P", "solo", name=f"ingest{n}", queues="ingest,celery")
            for n in (1, 2)
        ]
        flush = self.flush_worker()
        self.beat()
        for proc in (*ingest, flush):
            proc.wait_for("ready.", ready_s)
        return ingest, flush

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        process = subprocess.Popen(args, env=self.env, **kwargs)
        self.popens.append(process)
        return process

    def load(self, rate: float, spacing_ms: int = 300_000, **kwargs: Any) -> Load:
        """`Load` at `rate` of reference sessions `spacing_ms` apart in time."""
        traffic = ReferenceTraffic(uuid.uuid4().hex[:8], spacing_ms=spacing_ms)
        load = Load(self.app, traffic, rate, **kwargs)
        self.loads.append(load)
        return load

    def stop_processes(self, timeout: float = 15) -> None:
        """SIGTERM every live Celery process at once (warm shutdown), then wait; kill stragglers."""
        live = [p for p in self.procs if p.alive()]
        for proc in live:
            assert proc.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in live:
            assert proc.process is not None
            try:
                proc.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()

    def close(self) -> None:
        for load in self.loads:  # a failed test may leave one running, holding events
            with contextlib.suppress(Exception):
                load.stop(timeout=5)
            with contextlib.suppress(Exception):
                load.producer.close(timeout=0.5)
        self.saved.close()
        with contextlib.suppress(Exception):
            self.stop_processes(timeout=10)
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.kill()
        for process in self.popens:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)
                process.kill()
                process.wait(10)
        with contextlib.suppress(Exception):
            self.app.close()
        with contextlib.suppress(Exception):
            self.redis.close()
        for server in self.servers:
            server.kill()

    # -- state --------------------------------------------------------------

    @property
    def shard(self) -> Any:
        return self.keyspace.shard(0)

    def queued(self) -> int:
        return sum(int(self.redis.llen(s.queue)) for s in self.keyspace.all())

    def claim_open(self) -> str | None:
        claim = self.redis.hget(self.shard.claim, "id")
        return claim.decode() if claim is not None else None

    def lock_token(self) -> bytes | None:
        return self.redis.get(self.shard.lock)  # type: ignore[no-any-return]

    def broker_backlog(self) -> int:
        """Ingest tasks the broker still holds: queued, plus delivered-unacknowledged (Redis:
        in the reliable transport's in-flight hashes, or kombu's `unacked`)."""
        if self.is_amqp:
            return amqp_queue_depth(self.app, "ingest")
        server = self.broker_server or self.buffer_server
        client = redis_lib.Redis(port=server.port, socket_timeout=2, socket_connect_timeout=1)
        try:
            return ingest_backlog(client)
        finally:
            client.close()

    def wait_drained(self, expected: int, timeout: float, quiet_s: float | None = None) -> float:
        """Until `expected` rows were acknowledged and the buffer is empty; returns when.

        With `quiet_s`, also done once the buffer is empty, no claim is open,
        the broker holds no ingest task and nothing has changed for `quiet_s`
        (for runs that may lose events, or miss `events:saved` notices during a
        Redis restart); the time returned is then the start of the quiet spell.
        """
        deadline = time.monotonic() + timeout
        last: tuple[int, ...] | None = None
        quiet_since = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                queued = self.queued()
                claim = self.claim_open()
                snapshot = (self.saved.rows, queued, int(claim is not None), self.broker_backlog())
            except (redis_lib.RedisError, OSError):
                snapshot = None
            if snapshot is not None:
                rows, queued, claimed, backlog = snapshot
                if rows >= expected and queued == 0 and not claimed:
                    return now
                if snapshot != last:
                    last, quiet_since = snapshot, now
                elif (
                    quiet_s is not None
                    and queued == 0
                    and not claimed
                    and backlog == 0
                    and now - quiet_since >= quiet_s
                ):
                    return quiet_since
            if now > deadline:
                raise AssertionError(
                    f"not drained after {timeout:.0f}s: {snapshot} (saved rows, queued, claim "
                    f"open, broker backlog), expected {expected} saved rows"
                )
            time.sleep(0.2)

    def clickhouse(self, sql: str, timeout: float = 30) -> list[tuple[Any, ...]]:
        """Query embedded ClickHouse, waiting while another process holds the directory."""
        return query_when_free(self.chdb_url, sql, timeout)

    def duplicates_now(self) -> int:
        [(rows, distinct)] = self.clickhouse("SELECT count(), uniqExact(id) FROM events")
        return int(rows) - int(distinct)

    def tally(self, handed: list[str], expected: dict[str, int]) -> Tally:
        """ClickHouse against the handed-over ids and the reference durations."""
        rows = self.clickhouse(
            "SELECT toString(id), count(), groupArray(duration) FROM events GROUP BY id"
        )
        sent = set(handed)
        assert len(sent) == len(handed), "the producer handed out a duplicate id"
        found = {row[0]: (int(row[1]), [int(d) for d in row[2]]) for row in rows}
        missing = sorted(sent - found.keys())
        wrong = [
            (event_id, expected[event_id], durations)
            for event_id, (_, durations) in found.items()
            if event_id in expected and any(d != expected[event_id] for d in durations)
        ]
        return Tally(
            sent=len(sent),
            landed=len(sent & found.keys()),
            missing=len(missing),
            duplicated=sum(count - 1 for count, _ in found.values()),
            unexpected=len(found.keys() - sent),
            wrong_durations=len(wrong),
            missing_ids=missing[:10],
            wrong_examples=wrong[:5],
        )

    def dead_letters(self) -> int:
        return sum(int(self.redis.llen(s.dead)) for s in self.keyspace.all())

    def finish(self, load: Load) -> Tally:
        """Stop every process, then tally ClickHouse against what `load` handed over."""
        self.stop_processes()
        return self.tally(load.handed, load.traffic.expected)

    def record(
        self,
        scenario: str,
        tally: Tally,
        recovery_s: float | None,
        faults: str,
        *,
        asserted: str = "missing=0 dup=0",
        note: str = "",
    ) -> ScenarioResult:
        return record(
            ScenarioResult(
                scenario=scenario,
                sent=tally.sent,
                landed=tally.landed,
                missing=tally.missing,
                duplicated=tally.duplicated,
                recovery_s=None if recovery_s is None else round(recovery_s, 1),
                wrong_durations=tally.wrong_durations,
                unexpected=tally.unexpected,
                faults=faults,
                asserted=asserted,
                note=note,
            )
        )


def assert_exactly_once(stack: Stack, tally: Tally) -> None:
    details = f"{tally} (logs in {stack.tmp})"
    assert tally.missing == 0, f"{tally.missing} events lost: {details}"
    assert tally.duplicated == 0, f"{tally.duplicated} duplicate rows: {details}"
    assert tally.unexpected == 0, details
    assert tally.wrong_durations == 0, f"durations differ from the model: {details}"
    assert stack.queued() == 0 and stack.claim_open() is None
    assert stack.dead_letters() == 0
