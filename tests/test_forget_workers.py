"""`eventbuffer forget` while real Celery workers ingest and Beat flushes, and killed halfway.

The stream: every 50 ms a task with a screen_view of Alice's and of Bob's
current sessions (each session eight views then a session_end), created at
the moment it is sent, through a broker Redis to a solo ingest worker with
the default reorder window; Beat flushes every second into chDB (batches of
20 rows, so claims are often open). Some of Alice's tasks wait in the broker
on a queue nobody consumes until after the request, and some arrive after
it, created before it. The CLI runs as its own process in the middle.

Afterwards: Alice's rows in ClickHouse are exactly her events created after
the request (each once); Bob's are all his events, each once, with the
durations his sessions give; one audit row.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from tests.support.celery_procs import (
    ROOT,
    CeleryProcess,
    beat,
    ingest_backlog,
    project_env,
    worker,
)
from tests.support.people import person_event
from tests.support.polling import wait_until
from tests.support.servers import RedisServer
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.claims import Claims
from worker.keys import Keyspace
from worker.lock import FlushLock
from worker.privacy.clickhouse import AUDIT_TABLE
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink, path_from_url

pytestmark = pytest.mark.slow

VIEWS_PER_SESSION = 8


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def view(who: str, session: int, ms: int) -> dict[str, Any]:
    return person_event("screen_view", ms, who, f"{who}-{session}", path=f"/{ms}")


def end(who: str, session: int, ms: int) -> dict[str, Any]:
    return {**view(who, session, ms), "name": "session_end", "path": ""}


def ms_of(event: dict[str, Any]) -> int:
    return int(
        datetime.fromisoformat(event["created_at"].replace("Z", "+00:00")).timestamp() * 1000
    )


def expected_durations(events: list[dict[str, Any]]) -> dict[str, int]:
    """Each event's duration: a view's lasts until its session's next event."""
    by_session: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_session.setdefault(event["session_id"], []).append(event)
    durations: dict[str, int] = {}
    for session in by_session.values():
        session.sort(key=ms_of)
        for event, after in zip(session, [*session[1:], None], strict=True):
            last = after is None or after["name"] == "session_end"
            durations[event["id"]] = (
                0
                if event["name"] == "session_end" or last
                else (
                    ms_of(after) - ms_of(event)  # type: ignore[arg-type]
                )
            )
    return durations


class Stack:
    def __init__(self, tmp: Path, buffer_url: str) -> None:
        self.tmp = tmp
        self.broker = RedisServer(tmp / "broker")
        self.broker.start()
        self.chdb_url = f"chdb://{tmp / 'ch'}"
        sink = ChdbSink(path_from_url(self.chdb_url))
        sink.migrate()
        sink.close()
        self.env = project_env(
            REDIS_URL=buffer_url,
            CELERY_BROKER_URL=self.broker.url,
            CLICKHOUSE_URL=self.chdb_url,
            EVENT_BUFFER_FLUSH_INTERVAL_S="1",
            EVENT_BUFFER_BATCH_SIZE="20",
            EVENT_BUFFER_CHUNK_SIZE="5",
        )
        self.settings = Settings.from_env(self.env)
        self.app = create_app(self.settings)
        self.redis = redis_lib.Redis.from_url(buffer_url)
        self.procs: list[CeleryProcess] = []

    def start(self, *args: str, name: str) -> CeleryProcess:
        proc = worker(self.env, self.tmp / f"{name}.log", "-n", f"{name}@%h", *args)
        self.procs.append(proc)
        proc.wait_for("ready", timeout=60)
        return proc

    def send(self, events: list[dict[str, Any]], queue: str = "ingest") -> None:
        self.app.send_task("eventbuffer.ingest_events", args=[events], queue=queue)

    def forget(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "forget", "--project", "p1", *args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def settled(self) -> bool:
        """Nothing left anywhere before ClickHouse: broker, queues, views, held events."""
        if ingest_backlog(self.broker.client()):
            return False
        for shard in Keyspace(self.settings.key_prefix, self.settings.shards).all():
            if self.redis.llen(shard.queue) or self.redis.hlen(shard.views):
                return False
            if self.redis.zcard(shard.held_due):
                return False
        return True

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.broker.stop()


@pytest.fixture
def stack(tmp_path: Path, redis_url: str, redis: redis_lib.Redis) -> Iterator[Stack]:
    stack = Stack(tmp_path, redis_url)
    try:
        yield stack
    finally:
        stack.close()


def rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    sink = ChdbSink(path_from_url(url))
    try:
        return sink.query(sql)
    finally:
        sink.close()


def test_forget_while_workers_ingest_and_beat_flushes(stack: Stack) -> None:
    stack.start("-Q", "ingest", "-P", "solo", name="ingest")
    flusher = stack.start("-Q", "flush", "-P", "solo", name="flush")
    beats = beat(stack.env, stack.tmp / "beat.log", stack.tmp / "beat-schedule")
    stack.procs.append(beats)
    sent: list[dict[str, Any]] = []
    stop = threading.Event()

    def stream() -> None:
        tick = 0
        while not stop.is_set():
            session, step = divmod(tick, VIEWS_PER_SESSION + 1)
            batch = []
            for who in ("alice", "bob"):
                make = end if step == VIEWS_PER_SESSION else view
                batch.append(make(who, session, now_ms()))
            stack.send(batch)
            sent.extend(batch)
            tick += 1
            time.sleep(0.05)
        # Close the last sessions, so every view is flushed.
        closing = [end(who, session, now_ms()) for who in ("alice", "bob")]
        stack.send(closing)
        sent.extend(closing)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        beats.wait_for("Sending due task process-buffer", timeout=60)
        time.sleep(4)  # some of Alice's events land, others are queued, waiting
        # A flusher that claimed rows and stopped before inserting them (a kill): the
        # claim stays open, and a flusher re-drives it after the request, fenced.
        flusher.stop()
        time.sleep(1)
        keyspace = Keyspace(stack.settings.key_prefix, stack.settings.shards)
        claim = Claims(stack.redis).claim(keyspace.shard(0), "dead-claim", 20, now_ms(), 5)
        assert claim is not None and any(b'"alice"' in row for row in claim.rows)
        # In the broker, on a queue nobody consumes until after the request.
        waiting = [view("alice", 1000, now_ms() - 50), end("alice", 1000, now_ms())]
        stack.send(waiting, queue="ingest-later")
        forget = stack.forget("--profile", "alice", "--json", "--yes")
        out, err = forget.communicate(timeout=300)
        assert forget.returncode == 0, err.decode()
        # The flusher comes back only now: started during the forget's settle wait, it
        # could drain the queue and re-drive the claim before the forget's buffer step
        # (a CI run saw the forget find nothing of Alice's left to remove).
        stack.start("-Q", "flush", "-P", "solo", name="flush-again")
        report = json.loads(out)
        request_ms = int(datetime.fromisoformat(report["requested_at"]).timestamp() * 1000)
        # Late: created before the request, sent after it.
        late = [view("alice", 2000, request_ms - 1000), end("alice", 2000, request_ms - 1)]
        stack.send(late)
        stack.start("-Q", "ingest-later", "-P", "solo", name="later")
        time.sleep(2)  # more of both, after the request
    finally:
        stop.set()
        thread.join(10)
    wait_until(stack.settled, 120, "every event flushed", interval=0.5)
    for proc in stack.procs:
        proc.stop()

    assert report["clickhouse_rows"] > 0
    assert report["buffer_rows"] + report["claimed_rows"] + report["last_views"] > 0
    landed = rows(stack.chdb_url, "SELECT toString(id), profile_id, duration FROM events")
    ids = [row[0] for row in landed]
    assert len(ids) == len(set(ids)), "a row landed twice"
    alice_kept = {e["id"] for e in sent if e["profile_id"] == "alice" and ms_of(e) > request_ms}
    assert alice_kept, "the stream sent nothing of Alice's after the request"
    assert {row[0] for row in landed if row[1] == "alice"} == alice_kept
    bob = [e for e in sent if e["profile_id"] == "bob"]
    assert {row[0]: row[2] for row in landed if row[1] == "bob"} == expected_durations(bob)
    [(audits,)] = rows(stack.chdb_url, f"SELECT count() FROM {AUDIT_TABLE}")
    assert audits == 1


def test_forget_killed_halfway_is_completed_by_running_it_again(
    tmp_path: Path, redis_url: str, redis: redis_lib.Redis
) -> None:
    """SIGKILLed after shard 0 was erased, while it waits for shard 1's lock (held by a
    live flusher: this test); the re-run erases the rest, counts it and is audited."""
    chdb_url = f"chdb://{tmp_path / 'ch'}"
    env = project_env(
        REDIS_URL=redis_url,
        CLICKHOUSE_URL=chdb_url,
        EVENT_BUFFER_SHARDS="2",
        EVENT_BUFFER_REORDER_WINDOW_MS="0",
    )
    settings = Settings.from_env(env)
    sink = ChdbSink(path_from_url(chdb_url))
    sink.migrate()
    buffer = EventBuffer(redis, settings)
    t = now_ms() - 60_000
    events = [
        {**view(who, s, t + s), "name": "click"} for s in range(40) for who in ("alice", "bob")
    ]
    from worker.flusher import Flusher
    from worker.ingestion import ingest

    ingest(buffer, events[:40], "first")
    Flusher(redis, settings, lambda: sink).process_buffer()
    ingest(buffer, events[40:], "second")
    sink.close()
    keyspace = Keyspace(settings.key_prefix, 2)
    queued_before = sum(int(redis.llen(s.queue)) for s in keyspace.all())
    held = FlushLock(redis, keyspace.shard(1).lock, settings.lock_ttl_s)
    assert held.acquire()
    try:
        first = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "forget", "--project", "p1",
             "--profile", "alice", "--json", "--yes"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

        def shard_zero_erased() -> bool:
            return not any(b'"alice"' in r for r in redis.lrange(keyspace.shard(0).queue, 0, -1))

        wait_until(shard_zero_erased, 60, "shard 0 erased", alive=lambda: first.poll() is None)
        time.sleep(0.3)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        held.release()
    assert any(b'"alice"' in r for r in redis.lrange(keyspace.shard(1).queue, 0, -1))
    assert redis.exists(keyspace.tombstones("p1"))

    again = subprocess.run(
        [sys.executable, "-m", "worker.cli", "forget", "--project", "p1",
         "--profile", "alice", "--json", "--yes"],
        cwd=ROOT, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr.decode()
    report = json.loads(again.stdout)
    assert report["clickhouse_rows"] > 0  # the killed run never reached ClickHouse
    assert report["buffer_rows"] > 0  # shard 1's rows
    for shard in keyspace.all():
        assert not any(b'"alice"' in r for r in redis.lrange(shard.queue, 0, -1))
    queued_after = sum(int(redis.llen(s.queue)) for s in keyspace.all())
    assert queued_after == queued_before - 20  # Alice's half of the second batch, no more
    sink = ChdbSink(path_from_url(chdb_url))
    try:
        assert sink.query("SELECT count() FROM events WHERE profile_id = 'alice'") == [(0,)]
        assert sink.query("SELECT count() FROM events WHERE profile_id = 'bob'") == [(20,)]
        assert sink.query(f"SELECT count() FROM {AUDIT_TABLE}") == [(1,)]
    finally:
        sink.close()
