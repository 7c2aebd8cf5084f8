"""EventProducer against a real Redis broker: what lands in the `ingest` queue.

With the Redis transport the queue is the Redis list `ingest` (LPUSH, so
newest first); each entry is a JSON envelope whose base64 `body` is Celery
protocol 2's `[args, kwargs, embed]`. No mocks: brokers are real
redis-servers, one of them killed and restarted, and one test runs a real
worker.
"""

from __future__ import annotations

import base64
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from celery import Celery

from tests.conftest import ROOT
from tests.support import polling
from tests.support.dates import BASE_MS, stored
from tests.support.servers import RedisServer
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.clock import SYSTEM_CLOCK
from worker.events import InvalidEvent, decode_row, parse_event
from worker.keys import ShardKeys
from worker.names import TASK_INGEST_EVENTS
from worker.producer import BufferFull, EventProducer, ProducerClosed, ProducerError
from worker.reorder import release_due
from worker.settings import Settings

T0 = BASE_MS


@dataclass
class Message:
    task_id: str
    task: str
    events: list[dict[str, Any]]


def messages(client: redis_lib.Redis) -> list[Message]:
    """The task messages waiting in the `ingest` queue, oldest first."""
    out = []
    for raw in reversed(client.lrange("ingest", 0, -1)):
        envelope = json.loads(raw)
        assert envelope["properties"]["body_encoding"] == "base64"
        args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        assert kwargs == {}
        headers = envelope["headers"]
        # The producer sends its batch as a plain JSON array of event objects.
        assert isinstance(args[0], list)
        out.append(Message(headers["id"], headers["task"], args[0]))
    return out


def sent_ids(client: redis_lib.Redis) -> list[str]:
    return [e["id"] for m in messages(client) for e in m.events]


def event(i: int = 0, **fields: Any) -> dict[str, Any]:
    return {"name": "click", "project_id": "p1", "created_at": T0 + i, **fields}


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    polling.wait_until(predicate, timeout, interval=0.005)


def broker_app(url: str) -> Celery:
    return create_app(Settings.from_env({"REDIS_URL": url}))


@pytest.fixture
def app(redis_url: str, redis: redis_lib.Redis) -> Iterator[Celery]:
    app = broker_app(redis_url)
    yield app
    app.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    """A broker this test owns: it may kill and restart it (same port)."""
    server = RedisServer(tmp_path / "broker")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_size_trigger_sends_full_batches_then_flush_sends_the_rest(
    app: Celery, redis: redis_lib.Redis
) -> None:
    producer = EventProducer(app, batch_size=10, batch_ms=60_000)
    ids = [producer.send(event(i)) for i in range(25)]

    # Sent by the sender thread as soon as each batch fills: no flush, no timer.
    wait_until(lambda: producer.stats.pending == 5)
    assert [len(m.events) for m in messages(redis)] == [10, 10]

    producer.flush()
    sent = messages(redis)
    assert [len(m.events) for m in sent] == [10, 10, 5]
    assert sent_ids(redis) == ids
    assert {m.task for m in sent} == {TASK_INGEST_EVENTS}
    assert len({m.task_id for m in sent}) == 3
    stats = producer.stats
    assert (stats.sent_batches, stats.sent_events, stats.pending, stats.failures) == (3, 25, 0, 0)
    producer.close()


def test_time_trigger_sends_without_flush(app: Celery, redis: redis_lib.Redis) -> None:
    producer = EventProducer(app, batch_size=100, batch_ms=50)
    start = time.monotonic()
    ids = [producer.send(event(i)) for i in range(3)]
    wait_until(lambda: len(messages(redis)) == 1, timeout=1.0)
    assert time.monotonic() - start >= 0.04
    assert sent_ids(redis) == ids
    producer.close()


def test_sent_rows_are_normalized_and_ids_are_stable(app: Celery, redis: redis_lib.Redis) -> None:
    given = "7f0c4f43-4f59-4d6b-9a43-0d6c3b1f8a11"
    with EventProducer(app, batch_ms=60_000) as producer:
        assert producer.send(event(id=given.upper(), properties={"a": {"b": 1}})) == given
        parsed = parse_event(event(1))
        assert producer.send(parsed) == parsed.id
        assigned = producer.send(event(2))
    rows = messages(redis)[0].events
    assert [r["id"] for r in rows] == [given, parsed.id, assigned]
    assert rows[0]["properties"] == {"a.b": "1"}
    assert rows[0]["created_at"] == stored(T0)
    assert "duration" not in rows[0]  # fields at their defaults are omitted


def test_close_flushes_is_idempotent_and_refuses_sends(app: Celery, redis: redis_lib.Redis) -> None:
    with EventProducer(app, batch_ms=60_000) as producer:
        ids = [producer.send(event(i)) for i in range(4)]
    assert sent_ids(redis) == ids
    producer.close()
    with pytest.raises(ProducerClosed):
        producer.send(event())
    assert len(messages(redis)) == 1


def test_interpreter_exit_flushes(redis_url: str, redis: redis_lib.Redis) -> None:
    script = (
        "from worker.producer import EventProducer\n"
        "p = EventProducer(batch_ms=60_000)\n"
        "for i in range(7):\n"
        f"    print(p.send({{'name': 'n', 'project_id': 'p', 'created_at': {T0} + i}}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENT_BUFFER_")}
    env["REDIS_URL"] = redis_url
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert sent_ids(redis) == done.stdout.split()
    assert len(messages(redis)) == 1


def test_collected_producer_still_sends_what_it_held(app: Celery, redis: redis_lib.Redis) -> None:
    producer = EventProducer(app, batch_ms=60_000)
    ids = [producer.send(event(i)) for i in range(5)]
    ref = weakref.ref(producer)
    del producer
    gc.collect()
    assert ref() is None, "the sender thread and exit hook must not keep a producer alive"
    wait_until(lambda: sent_ids(redis) == ids)


def test_concurrent_sends_each_event_exactly_once(app: Celery, redis: redis_lib.Redis) -> None:
    producer = EventProducer(app, batch_size=100, batch_ms=10)
    start = threading.Barrier(8)
    ids: list[list[str]] = [[] for _ in range(8)]

    def work(n: int) -> None:
        start.wait()
        for i in range(500):
            ids[n].append(producer.send(event(i, profile_id=f"t{n}")))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    producer.close()

    counts = Counter(sent_ids(redis))
    assert len(counts) == 4000 and set(counts.values()) == {1}
    assert counts.keys() == {i for chunk in ids for i in chunk}
    assert all(0 < len(m.events) <= 100 for m in messages(redis))
    # Each thread's events keep their order across batches.
    by_thread = [
        [e["id"] for m in messages(redis) for e in m.events if e["profile_id"] == f"t{n}"]
        for n in range(8)
    ]
    assert by_thread == ids
    assert producer.stats.sent_events == 4000


def test_invalid_event_raises_at_once_and_queues_nothing(
    app: Celery, redis: redis_lib.Redis
) -> None:
    producer = EventProducer(app, batch_size=1)
    with pytest.raises(InvalidEvent) as missing:
        producer.send({"name": "click", "created_at": T0})
    assert missing.value.field == "project_id"
    with pytest.raises(InvalidEvent) as bad_date:
        producer.send(event(created_at="yesterday"))
    assert bad_date.value.field == "created_at"
    assert producer.stats.pending == 0
    producer.close()
    assert messages(redis) == []


def test_broker_outage_holds_events_and_a_later_flush_sends_each_once(
    broker: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.producer")
    app = broker_app(broker.url)
    client = redis_lib.Redis.from_url(broker.url)
    producer = EventProducer(app, batch_size=10, batch_ms=60_000)
    producer.send(event())
    producer.flush()  # the connection pool now holds a live connection
    broker.kill()

    ids = [producer.send(event(i)) for i in range(25)]
    with pytest.raises(ProducerError) as failed:
        producer.flush(timeout=0.3)
    assert failed.value.unsent == 25 == producer.stats.pending

    # A failure is counted just before it is logged, perhaps by the sender
    # thread (flush() may have found it sending): wait for the record itself.
    def logged_failures() -> set[str]:
        return {r.getMessage().split()[1] for r in caplog.records if "not sent" in r.getMessage()}

    wait_until(lambda: bool(logged_failures()), timeout=5.0)
    failed_task_ids = logged_failures()

    broker.start()  # same port, empty: the message sent before the outage is gone
    producer.flush()
    sent = messages(client)
    assert sent_ids(client) == ids  # nothing lost, nothing twice, in order
    assert [len(m.events) for m in sent] == [10, 10, 5]
    # A batch keeps its task id across attempts (the worker's dedup key).
    assert failed_task_ids <= {m.task_id for m in sent}
    assert producer.stats.pending == 0
    producer.close()
    assert len(messages(client)) == 3
    client.close()
    app.close()


def test_max_pending_pushes_back_on_the_caller(broker: RedisServer) -> None:
    app = broker_app(broker.url)
    client = redis_lib.Redis.from_url(broker.url)
    producer = EventProducer(app, batch_size=10, batch_ms=60_000, max_pending=20)
    broker.kill()
    ids = [producer.send(event(i)) for i in range(20)]
    with pytest.raises(BufferFull) as full:
        producer.send(event(20))
    assert full.value.unsent == 20
    with pytest.raises(ProducerError):
        producer.close(timeout=0)
    assert producer.stats.pending == 20  # held, not dropped

    broker.start()
    producer.close()  # close again: sends what the failed close left
    assert sent_ids(client) == ids
    client.close()
    app.close()


def test_end_to_end_with_a_real_worker(
    settings: Settings, redis: redis_lib.Redis, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENT_BUFFER_")}
    env.update(REDIS_URL=settings.redis_url, CLICKHOUSE_URL=settings.clickhouse_url)
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log_file:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker",
                "worker",
                "-Q",
                "ingest,flush",
                "-P",
                "solo",
                "--without-heartbeat",
                "--without-mingle",
                "--without-gossip",
                "--loglevel",
                "WARNING",
            ],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        app = broker_app(settings.redis_url)
        sessions = [f"s{n}" for n in range(30)]
        views: dict[str, list[str]] = {s: [] for s in sessions}
        with EventProducer(app) as producer:
            for step in range(10):
                for s in sessions:
                    view = event(step * 1000, name="screen_view", session_id=s, path=f"/{step}")
                    views[s].append(producer.send(view))
        app.close()

        buffer = EventBuffer(redis, settings)
        worker_settings = Settings.from_env(env)  # the worker's: the default reorder window

        def applied() -> bool:
            for shard in buffer.shards():  # release what the window held, as a flush does
                release_due(buffer.scripts, shard, worker_settings, SYSTEM_CLOCK)
            if buffer.get_buffer_size() != 270:
                return False
            last = [buffer.get_last_screen_view(session_id=s) for s in sessions]
            return [v.id if v else None for v in last] == [views[s][-1] for s in sessions]

        try:
            wait_until(applied, timeout=25)
        except AssertionError:
            pytest.fail(f"worker did not apply the events; its log:\n{log_path.read_text()}")
        queued = [decode_row(r) for r in redis.lrange(ShardKeys("eventbuffer", 0).queue, 0, -1)]
        assert sorted(e.id for e in queued) == sorted(i for s in sessions for i in views[s][:-1])
        assert {e.duration for e in queued} == {1000}
    finally:
        worker.terminate()
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def test_producer_validates_with_the_configured_limits(app: Celery, redis: redis_lib.Redis) -> None:
    big = event(properties={"blob": "x" * 100_000})
    roomy = Settings.from_env(
        {"REDIS_URL": "redis://h/0", "EVENT_BUFFER_MAX_EVENT_BYTES": "500000"}
    )
    with EventProducer(app, settings=roomy) as producer:
        producer.send(big)  # the worker accepts it under this setting: so does the producer
    assert len(sent_ids(redis)) == 1

    tight = Settings.from_env({"REDIS_URL": "redis://h/0", "EVENT_BUFFER_MAX_EVENT_BYTES": "70000"})
    with EventProducer(app, settings=tight) as producer, pytest.raises(InvalidEvent) as caught:
        producer.send(big)
    assert "over the limit of 70000" in caught.value.problem


def test_importing_the_producer_leaves_the_host_apps_current_app_alone() -> None:
    script = (
        "import celery\n"
        "host = celery.Celery('host', broker='memory://')\n"
        "from worker.producer import EventProducer\n"
        "EventProducer(host).close()\n"
        "assert celery.current_app.main == 'host', celery.current_app.main\n"
        "EventProducer().close()  # its own app, from REDIS_URL\n"
        "assert celery.current_app.main == 'host', celery.current_app.main\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENT_BUFFER_")}
    env.update(PYTHONPATH=str(ROOT), REDIS_URL="redis://127.0.0.1:1/0")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_a_host_apps_worker_is_untouched_by_eventbuffer(
    redis_url: str, redis: redis_lib.Redis, tmp_path: Path
) -> None:
    """A host worker importing the producer: no eventbuffer settings, logging or metrics."""
    from tests.support.servers import free_port

    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENT_BUFFER_", "CELERY_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        HOST_BROKER_URL=redis_url,
        # The host's own variables, meaningless to eventbuffer: a REDIS_URL without a
        # scheme (eventbuffer's settings would refuse it) and a metrics port.
        REDIS_URL="localhost:6379",
        EVENT_BUFFER_METRICS_PORT=str(metrics_port),
        EVENT_BUFFER_LOG_FORMAT="json",
    )
    log_path = tmp_path / "host-worker.log"
    with log_path.open("wb") as log_file:
        host_worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "tests.support.host_app", "worker"),
                *("-P", "solo", "-Q", "celery", "--without-mingle", "--without-gossip"),
                *("--loglevel", "INFO"),
            ],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        host = Celery("host-sender", broker=redis_url)
        host.conf.update(task_serializer="json", accept_content=["json"])
        host.send_task("host.track", args=["p1", int(time.time() * 1000)])
        # The host's task ran and sent its event through the producer, on the host's broker.
        wait_until(lambda: len(messages(redis)) == 1, timeout=30)
        # The task's success line is written after its send: wait for it, not just the send.
        wait_until(lambda: "succeeded" in log_path.read_text(), timeout=30)
        log = log_path.read_text()
        assert "Task host.track" in log and "succeeded" in log, log
        # Celery's own text logs: eventbuffer's JSON format is not applied to the host.
        assert not any(line.startswith("{") for line in log.splitlines()), log
        assert "SettingsError" not in log and "REDIS_URL" not in log, log
        assert "metrics" not in log, log
        with pytest.raises(OSError):  # nobody serves eventbuffer's metrics in the host worker
            socket.create_connection(("127.0.0.1", metrics_port), timeout=1).close()
        host.close()
    finally:
        host_worker.terminate()
        try:
            host_worker.wait(15)
        except subprocess.TimeoutExpired:
            host_worker.kill()


def test_the_serializer_is_registered_by_a_producer_not_by_the_import() -> None:
    """Importing the producer changes nothing in kombu; making one registers its encoder."""
    script = """
from kombu.exceptions import SerializerNotInstalled
from kombu.serialization import dumps
import worker.producer
def registered():
    try:
        dumps([1], serializer="eventbuffer-json")
    except SerializerNotInstalled:
        return False
    return True
print(registered())
worker.producer.EventProducer(batch_ms=0).close(timeout=0)
print(registered())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENT_BUFFER_")}
    env.update(PYTHONPATH=str(ROOT), REDIS_URL="redis://127.0.0.1:1/0")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
