"""The fault-injection harness: a whole eventbuffer system under load, and its accounting.

A scenario builds a `Stack` (its own redis-server for the buffer, optionally
a second one or RabbitMQ as the broker, embedded ClickHouse in a temporary
directory, Celery ingest/flush workers and Beat as real subprocesses), drives
it with a `Load` (the real `EventProducer` in a background thread, sending
sessions of the reference model at a steady rate), injects its fault, waits
until the system has drained (`Stack.wait_drained`), stops every process and
compares ClickHouse with the ids the producer accepted (`Stack.tally`).

The reference model (`tests.support.traffic.ReferenceTraffic`): every
session is 5 screen_views with known gaps, a click after the third view
and a session_end. A view's expected duration is the gap to the next view
of its session; the last view, the click and the session_end have 0. Two
ways to send them:

- whole sessions per task (`Load(..., sessions_per_batch=k)`): the producer's
  batch size is exactly k sessions and its timer never fires, so every task
  holds complete sessions in order. Durations are then exact even when tasks
  are redelivered or run on several worker processes in any order (the
  README's "Ordering" caveat) - used wherever the ingest path is faulted;
- interleaved (`sessions_per_batch=None`): `width` sessions are open at once
  and their events interleave, with the producer's normal micro-batching, so
  a session spans many tasks and its last view waits in Redis between them.
  Exact with one ingest process and no redelivery - used where the fault is
  downstream (flusher, lock, ClickHouse).

Every wait is bounded; every process is stopped by `Stack.close()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_lib
from celery import Celery

from tests.support.celery_procs import CeleryProcess, beat, ingest_backlog, project_env, worker
from tests.support.polling import wait_until
from tests.support.servers import RedisServer
from tests.support.sinks import query_when_free
from tests.support.traffic import EVENTS_PER_SESSION, ReferenceTraffic
from worker.celery import create_app
from worker.keys import CHANNEL_SAVED, Keyspace
from worker.producer import BufferFull, EventProducer, ProducerError
from worker.settings import Settings
from worker.sinks import open_sink

HERE = Path(__file__).resolve().parent
PHASE_FLUSHER = HERE / "phase_flusher.py"


# -- results ------------------------------------------------------------------


@dataclass
class ScenarioResult:
    """One row of the summary table (and of the JSON report)."""

    scenario: str
    sent: int
    landed: int
    missing: int
    duplicated: int
    recovery_s: float | None
    wrong_durations: int = 0
    unexpected: int = 0
    faults: str = ""
    asserted: str = "missing=0 dup=0"
    note: str = ""


RESULTS: list[ScenarioResult] = []
REPORT: dict[str, Path | None] = {"path": None}


def record(result: ScenarioResult) -> ScenarioResult:
    """Keep a scenario's row for the summary, and rewrite the JSON report at once."""
    RESULTS.append(result)
    path = REPORT["path"]
    if path is not None:
        path.write_text(json.dumps([asdict(r) for r in RESULTS], indent=2))
    return result


# -- the reference model ------------------------------------------------------


class _WholeSessions:
    """Units of one complete session each."""

    def __init__(self, traffic: ReferenceTraffic) -> None:
        self.traffic = traffic
        self.closing = False

    def next_unit(self) -> list[dict[str, Any]] | None:
        return None if self.closing else self.traffic.session()


class _Interleaved:
    """`width` open sessions, one event of the next session in turn; winds down on close."""

    def __init__(self, traffic: ReferenceTraffic, width: int) -> None:
        self.traffic = traffic
        self.open: deque[deque[dict[str, Any]]] = deque(
            deque(traffic.session()) for _ in range(width)
        )
        self.closing = False

    def next_unit(self) -> list[dict[str, Any]] | None:
        while self.open:
            current = self.open.popleft()
            event = current.popleft()
            if current:
                self.open.append(current)
            elif not self.closing:
                self.open.append(deque(self.traffic.session()))
            return [event]
        return None


class Load:
    """The producer client sending the reference model at a steady rate, in a thread.

    `handed` is every id that `EventProducer.send()` accepted: what the system
    owes ClickHouse. `stop()` ends the stream at a session boundary (an
    interleaved stream first finishes its open sessions), `finish()` then
    flushes the producer until nothing is held.
    """

    def __init__(
        self,
        app: Celery,
        traffic: ReferenceTraffic,
        rate: float,
        *,
        sessions_per_batch: int | None = 4,
        width: int = 20,
        max_events: int = 20_000,
    ) -> None:
        if sessions_per_batch is None:
            self.producer = EventProducer(app, batch_size=100, batch_ms=10)
            self.stream: _WholeSessions | _Interleaved = _Interleaved(traffic, width)
        else:
            # Only the size trigger seals a batch: each task is whole sessions.
            self.producer = EventProducer(
                app, batch_size=EVENTS_PER_SESSION * sessions_per_batch, batch_ms=3_600_000
            )
            self.stream = _WholeSessions(traffic)
        self.traffic = traffic
        self.rate = rate
        self.max_events = max_events
        self.handed: list[str] = []
        self.errors: list[str] = []
        self.buffer_full = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-load", daemon=True)
        self.started = 0.0
        self.stopped_at: float | None = None

    def start(self) -> Load:
        self.started = time.monotonic()
        self._thread.start()
        return self

    @property
    def count(self) -> int:
        return len(self.handed)

    def _run(self) -> None:
        try:
            while True:
                if self._stop.is_set() or len(self.handed) >= self.max_events:
                    self.stream.closing = True
                unit = self.stream.next_unit()
                if unit is None:
                    return
                for event in unit:
                    self._send(event)
                if not self.stream.closing:
                    lag = self.started + len(self.handed) / self.rate - time.monotonic()
                    if lag > 0:
                        self._stop.wait(lag)
        except Exception as exc:  # reported by finish()
            self.errors.append(repr(exc))

    def _send(self, event: dict[str, Any]) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                self.handed.append(self.producer.send(event))
                return
            except BufferFull:
                self.buffer_full += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def wait_for(self, events: int, timeout: float) -> None:
        wait(lambda: self.count >= events, timeout, f"the load to hand over {events} events")

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load thread did not stop"
        self.stopped_at = time.monotonic()

    def finish(self, timeout: float = 60) -> None:
        """Stop, then flush until the producer holds nothing (raises if it cannot)."""
        if self.stopped_at is None:
            self.stop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.producer.flush(timeout=max(1.0, deadline - time.monotonic()))
                break
            except ProducerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.producer.close(timeout=5)
        assert self.producer.stats.pending == 0
        assert not self.errors, self.errors


# -- waiting ------------------------------------------------------------------


def wait(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    wait_until(condition, timeout, what, interval=interval)


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


# -- the system ---------------------------------------------------------------


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

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        process = subprocess.Popen(args, env=self.env, **kwargs)
        self.popens.append(process)
        return process

    def load(self, rate: float, **kwargs: Any) -> Load:
        load = Load(self.app, ReferenceTraffic(uuid.uuid4().hex[:8]), rate, **kwargs)
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


# -- helpers for single processes ---------------------------------------------


def pool_children(proc: CeleryProcess) -> list[int]:
    assert proc.process is not None
    out = subprocess.run(
        ["pgrep", "-P", str(proc.process.pid)], capture_output=True, text=True, timeout=10
    ).stdout
    return [int(pid) for pid in out.split()]


class LineReader:
    """Reads a child's stdout lines (JSON where possible) in a thread, for bounded waits."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[Any] = queue.Queue()
        self.seen: list[Any] = []
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: Any) -> None:
        for line in stream:
            try:
                item = json.loads(line)
            except ValueError:
                item = {"text": line.rstrip()}
            self.lines.put(item)

    def next_matching(self, key: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key!r} line within {timeout}s; saw {self.seen}")
            try:
                item = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(item)
            if key in item:
                return item  # type: ignore[no-any-return]

    def drain(self, timeout: float = 5) -> list[Any]:
        self._thread.join(timeout)
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return self.seen


def phase_flusher_args(phase: str, *extra: str) -> list[str]:
    return [sys.executable, str(PHASE_FLUSHER), "--phase", phase, *extra]


CHDB_HOLDER = """
import sys, time
from chdb import session
path, hold = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + 30
while True:
    try:
        s = session.Session(path)
        break
    except Exception as exc:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
s.query("SELECT count() FROM events")
print('{"held": 1}', flush=True)
time.sleep(hold)
s.close()
print('{"released": 1}', flush=True)
"""


def chdb_holder(stack: Stack, seconds: float) -> subprocess.Popen[str]:
    """A helper process that opens the ClickHouse directory and keeps it for `seconds`."""
    from worker.sinks.chdb import path_from_url

    return stack.popen(
        [sys.executable, "-c", CHDB_HOLDER, path_from_url(stack.chdb_url), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def logs(stack: Stack, prefix: str) -> str:
    """Every log file of the stack whose name starts with `prefix`, concatenated."""
    return "".join(p.read_text(errors="replace") for p in sorted(stack.tmp.glob(f"{prefix}*.log")))


class LogTail:
    """Counts a needle in what a log file gains, reading only the new bytes."""

    def __init__(self, path: Path, needle: str) -> None:
        self.path = path
        self.needle = needle.encode()
        self.offset = path.stat().st_size if path.exists() else 0
        self.count = 0
        self._rest = b""

    def poll(self) -> int:
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
            self.offset += len(data)
            text = self._rest + data
            cut = text.rfind(b"\n") + 1
            self.count += text[:cut].count(self.needle)
            self._rest = text[cut:]
        return self.count
