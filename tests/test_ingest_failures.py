"""What happens to a batch that cannot be applied: it is retried, or kept, never dropped.

Real Celery workers on a real Redis broker:

- an unexpected error inside the ingest task (redis-py's RedisClusterException,
  injected by `tests/support/faulty_worker.py`) is retried a bounded number of
  times, then the raw batch becomes one `ingest_failed` dead letter that
  `eventbuffer dlq replay` applies once the cause is gone;
- a real permanent Redis error (a buffer key of the wrong type) goes the same way;
- messages Celery refuses before any task runs (celery-node's `[args, null, {}]`
  body, a misspelled task name, a body that is not JSON) become
  `undeliverable_task` dead letters with their raw body; other apps' unknown
  tasks keep Celery's own handling.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from kombu import Connection, Exchange, Queue

from tests.conftest import Result
from tests.support.celery_procs import CeleryProcess, project_env, worker
from tests.support.polling import wait_until
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.deadletters import DeadLetter, decode_dead_letter
from worker.keys import ShardKeys
from worker.settings import Settings

pytestmark = pytest.mark.slow

SHARD = ShardKeys("eventbuffer", 0)


def now_ms() -> int:
    return int(time.time() * 1000)


def events(project: str, count: int = 3) -> list[dict[str, Any]]:
    return [
        {"id": str(uuid.uuid4()), "project_id": project, "name": f"e{n}", "created_at": now_ms()}
        for n in range(count)
    ]


def dead_letters(redis: redis_lib.Redis) -> list[tuple[DeadLetter, bytes]]:
    return [decode_dead_letter(e) for e in redis.lrange(SHARD.dead, 0, -1)]


def queued_ids(redis: redis_lib.Redis) -> set[str]:
    return {json.loads(row)["id"] for row in redis.lrange(SHARD.queue, 0, -1)}


@pytest.fixture
def stack(
    redis_url: str, settings: Settings, tmp_path: Path
) -> Iterator[Callable[[str], CeleryProcess]]:
    """Starts an ingest worker (consuming `ingest` and `celery`) of the given app module."""
    started: list[CeleryProcess] = []

    def start(app: str) -> CeleryProcess:
        env = project_env(REDIS_URL=redis_url, CLICKHOUSE_URL=settings.clickhouse_url)
        proc = worker(env, tmp_path / "worker.log", "-Q", "ingest,celery", "-P", "solo", app=app)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def test_an_unexpected_error_is_retried_then_the_raw_batch_is_dead_lettered(
    stack: Callable[[str], CeleryProcess],
    redis_url: str,
    redis: redis_lib.Redis,
    run_main: Callable[..., Result],
) -> None:
    proc = stack("tests.support.faulty_worker")
    app = create_app(Settings.from_env({"REDIS_URL": redis_url}))
    once, always, fine = events("fail-once"), events("fail-always"), events("fine")
    try:
        proc.wait_for(" ready.", 60)
        for batch in (once, always, fine):
            app.send_task("eventbuffer.ingest_events", args=[batch], queue="ingest")
        wait_until(lambda: len(dead_letters(redis)) == 1, 60, "the dead letter", alive=proc.alive)
        wait_until(lambda: len(queued_ids(redis)) == 6, 30, "the other batches", alive=proc.alive)
    finally:
        proc.stop()
        app.close()
    log = proc.text()
    # The batch that failed once was applied by its retry, once.
    assert queued_ids(redis) == {e["id"] for e in once + fine}
    [(header, raw)] = dead_letters(redis)
    assert (header.reason, header.source, header.task) == (
        "ingest_failed",
        "ingest",
        "eventbuffer.ingest_events",
    )
    assert "RedisClusterException: injected: fails every time" in header.error
    assert json.loads(raw) == always  # the raw batch, whole
    assert "failed (1 of 3 attempts)" in log and "failed (2 of 3 attempts)" in log, log
    assert "dead-lettered whole as ingest_failed" in log

    # Once the cause is gone (any worker, or the CLI here), the batch is replayed whole.
    replayed = run_main("dlq", "replay", "--yes")
    assert replayed.code == 0, replayed.err
    assert queued_ids(redis) == {e["id"] for e in once + fine + always}
    assert redis.llen(SHARD.dead) == 0
    assert "Nothing to replay" in run_main("dlq", "replay", "--yes").out


def test_a_permanent_redis_error_dead_letters_the_batch_instead_of_retrying_forever(
    stack: Callable[[str], CeleryProcess],
    redis_url: str,
    redis: redis_lib.Redis,
    settings: Settings,
    run_main: Callable[..., Result],
) -> None:
    # A list where the sessions' held events are indexed (the default reorder window
    # holds the batch's screen_views there).
    redis.rpush(SHARD.held_due, "x")
    proc = stack("worker")
    app = create_app(Settings.from_env({"REDIS_URL": redis_url}))
    batch = [{**e, "name": "screen_view", "session_id": "s1"} for e in events("p")]
    try:
        proc.wait_for(" ready.", 60)
        app.send_task("eventbuffer.ingest_events", args=[batch], queue="ingest")
        wait_until(lambda: len(dead_letters(redis)) == 1, 60, "the dead letter", alive=proc.alive)
    finally:
        proc.stop()
        app.close()
    [(header, raw)] = dead_letters(redis)
    assert header.reason == "ingest_failed"
    assert "BufferKeyTypeError" in header.error and SHARD.held_due in header.error
    assert json.loads(raw) == batch
    assert EventBuffer(redis, settings).get_buffer_size() == 0  # nothing half-applied

    redis.delete(SHARD.held_due)
    assert run_main("dlq", "replay", "--yes").code == 0
    view = EventBuffer(redis, settings).get_last_screen_view(session_id="s1")
    assert view is not None and view.id == batch[-1]["id"]


def publish_raw(url: str, queue: str, task: str, body: bytes, task_id: str) -> None:
    """A task message as another language's client builds it (protocol 2 headers)."""
    headers = {
        "lang": "js",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
        "shadow": None,
        "argsrepr": None,
        "kwargsrepr": None,
        "origin": "node@test",
    }
    exchange = Exchange(queue, type="direct")
    with Connection(url) as connection:
        connection.Producer().publish(
            body,
            exchange=exchange,
            routing_key=queue,
            declare=[Queue(queue, exchange, routing_key=queue)],
            content_type="application/json",
            content_encoding="utf-8",
            headers=headers,
            correlation_id=task_id,
        )


def test_messages_celery_refuses_become_dead_letters_with_their_raw_body(
    stack: Callable[[str], CeleryProcess],
    redis_url: str,
    redis: redis_lib.Redis,
    run_main: Callable[..., Result],
) -> None:
    proc = stack("worker")
    node, typo = events("node"), events("typo")
    # celery-node's client.sendTask(name, args): kwargs is null, which Celery refuses.
    node_body = json.dumps([[node], None, {}]).encode()
    typo_body = json.dumps([[typo], {}, {}]).encode()
    cases = {
        "node": ("ingest", "eventbuffer.ingest_events", node_body),
        "typo": ("ingest", "eventbuffer.ingest_evnts", typo_body),
        "not-json": ("ingest", "eventbuffer.ingest_events", b"[[{not json"),
        "foreign": ("celery", "shop.send_mail", json.dumps([[], {}, {}]).encode()),
    }
    try:
        proc.wait_for(" ready.", 60)
        for name, (queue, task, body) in cases.items():
            publish_raw(redis_url, queue, task, body, f"task-{name}")
        wait_until(lambda: len(dead_letters(redis)) == 3, 60, "dead letters", alive=proc.alive)
        proc.wait_for("Received unregistered task of type 'shop.send_mail'", 30)
    finally:
        proc.stop()
    letters = {header.claim: (header, raw) for header, raw in dead_letters(redis)}
    assert set(letters) == {"task-node", "task-typo", "task-not-json"}
    for name in ("node", "typo", "not-json"):
        header, raw = letters[f"task-{name}"]
        assert header.reason == "undeliverable_task"
        assert header.task == cases[name][1]
        assert raw == cases[name][2]
    assert "keyword arguments are not a mapping" in letters["task-node"][0].error
    assert "NotRegistered" in letters["task-typo"][0].error
    assert redis.llen("ingest") == 0 and redis.llen("celery") == 0

    replayed = run_main("dlq", "replay", "--yes")
    assert replayed.code == 0, replayed.err
    assert "1 dead letter(s) still fail" in replayed.out  # the body that is not JSON stays
    assert queued_ids(redis) == {e["id"] for e in node + typo}
    [(left, _)] = dead_letters(redis)
    assert left.claim == "task-not-json"
