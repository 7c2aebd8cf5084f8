"""The worker system for real: Celery worker and Beat subprocesses, a real broker.

Events go in through the public task names, come out as rows in embedded
ClickHouse; workers are SIGKILLed mid-ingest; redelivered batches are
skipped; concurrent flushes are serialized by the lock.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from celery import Celery

from tests.support.celery_procs import CeleryProcess, beat, project_env, worker
from tests.support.dates import BASE_MS
from tests.support.polling import wait_until
from tests.support.servers import rabbitmq_reachable
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.flusher import Flusher
from worker.settings import Settings
from worker.sinks import RetryableSinkError, open_sink

pytestmark = pytest.mark.slow

# created_at must lie within EVENT_BUFFER_MAX_PAST_DAYS of now: derived from now.
T0 = BASE_MS


def chdb_rows(url: str, sql: str, timeout: float = 20) -> list[tuple[Any, ...]]:
    """Query embedded ClickHouse, waiting while a flushing worker holds the directory."""
    rows: list[tuple[Any, ...]] = []

    def attempt() -> bool:
        nonlocal rows
        sink = open_sink(url)
        try:
            rows = sink.query(sql)
            return True
        except RetryableSinkError:
            return False
        finally:
            sink.close()

    wait_until(attempt, timeout, "the chDB directory to be free", interval=0.3)
    return rows


def landed(url: str) -> tuple[int, int]:
    [(count, unique)] = chdb_rows(url, "SELECT count(), uniqExact(id) FROM events")
    return int(count), int(unique)


@pytest.fixture
def env(redis_url: str, redis: redis_lib.Redis, tmp_path: Path) -> dict[str, str]:
    # `redis` starts every test from an empty Redis: buffer, broker queues and all.
    chdb_url = f"chdb://{tmp_path / 'ch'}"
    sink = open_sink(chdb_url)
    sink.migrate()
    sink.close()
    return project_env(
        REDIS_URL=redis_url,
        CLICKHOUSE_URL=chdb_url,
        EVENT_BUFFER_FLUSH_INTERVAL_S="1",
        EVENT_BUFFER_VISIBILITY_TIMEOUT_S="3",
    )


@pytest.fixture
def app(env: dict[str, str]) -> Iterator[Celery]:
    app = create_app(Settings.from_env(env))
    yield app
    app.close()


def settings_of(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


def session_traffic(sessions: int, views: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Sessions of screen_views 1 s, 2 s, 3 s ... apart, then session_end; expected durations."""
    events: list[dict[str, Any]] = []
    expected: dict[str, int] = {}
    for s in range(sessions):
        for v in range(views):
            event_id = str(uuid.uuid4())
            offset = v * (v + 1) // 2  # gaps of 1 s, 2 s, 3 s ...
            events.append(
                {
                    "id": event_id,
                    "project_id": "shop",
                    "name": "screen_view",
                    "session_id": f"session-{s}",
                    "profile_id": f"user-{s}",
                    "created_at": BASE_MS + s * 100_000 + offset * 1000,
                    "path": f"/page/{v}",
                }
            )
            expected[event_id] = (v + 1) * 1000 if v < views - 1 else 0
        end_id = str(uuid.uuid4())
        events.append(
            {
                "id": end_id,
                "project_id": "shop",
                "name": "session_end",
                "session_id": f"session-{s}",
                "profile_id": f"user-{s}",
                "created_at": BASE_MS + s * 100_000 + 90_000,
            }
        )
        expected[end_id] = 0
    return events, expected


def run_end_to_end(app: Celery, env: dict[str, str], tmp_path: Path) -> None:
    ingest_one = app.signature("eventbuffer.ingest_event")
    ingest_many = app.signature("eventbuffer.ingest_events")
    events, expected = session_traffic(sessions=6, views=4)
    # One worker process: tasks then run in the order they were sent. With more,
    # two tasks holding events of one session may be applied in either order
    # (the README's "Ordering" section), which would change their durations.
    workers = worker(env, tmp_path / "worker.log", "-Q", "ingest,flush", "-c", "1")
    beats = beat(env, tmp_path / "beat.log", tmp_path / "beat-schedule")
    try:
        workers.wait_for("ready.")
        half = len(events) // 2
        for item in events[:half]:
            ingest_one.delay(item)
        for start in range(half, len(events), 5):
            ingest_many.delay(events[start : start + 5])
        beats.wait_for("Sending due task process-buffer")
        wait_until(
            lambda: landed(env["CLICKHOUSE_URL"])[0] == len(events),
            60,
            "Beat's process_buffer to land every event",
            alive=workers.alive,
            # Each look opens the chDB directory, which the flush worker needs too.
            interval=0.5,
        )
    finally:
        beats.stop()
        workers.stop()
    rows = chdb_rows(env["CLICKHOUSE_URL"], "SELECT toString(id), duration FROM events")
    assert dict(rows) == expected
    assert landed(env["CLICKHOUSE_URL"]) == (len(events), len(events))


def test_events_sent_with_delay_land_with_durations_via_beat(
    app: Celery, env: dict[str, str], tmp_path: Path
) -> None:
    run_end_to_end(app, env, tmp_path)


def _fresh_amqp_queues(app: Celery) -> None:
    """Start from empty queues: the RabbitMQ server is shared with the machine."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in app.conf.task_queues:
            channel.queue_delete(queue.name)
            queue(channel).declare()


def test_end_to_end_on_an_amqp_broker(env: dict[str, str], tmp_path: Path) -> None:
    if not rabbitmq_reachable():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672 (guest/guest) to run the AMQP broker test")
    env = {**env, "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"}
    app = create_app(Settings.from_env(env))
    _fresh_amqp_queues(app)
    try:
        run_end_to_end(app, env, tmp_path)
    finally:
        app.close()


def _kill_during_ingest(
    app: Celery,
    env: dict[str, str],
    redis: redis_lib.Redis,
    log: Path,
    kill: Callable[[CeleryProcess], None],
    kills_wanted: int,
    until: Callable[[], bool] = lambda: True,
) -> None:
    """Send 6000 events in 240 tasks, SIGKILL workers mid-stream, check exactly-once.

    Kills at least `kills_wanted` times, and on (up to 12 kills) until `until()`
    holds, e.g. until a kill was seen to land inside a task.
    """
    settings = settings_of(env)
    buffer = EventBuffer(redis, settings)
    ingest_many = app.signature("eventbuffer.ingest_events")
    batches = [
        [
            {"id": str(uuid.uuid4()), "project_id": "p", "name": "tick", "created_at": T0 + n}
            for n in range(25)
        ]
        for _ in range(240)
    ]
    total = sum(len(b) for b in batches)
    for batch in batches:
        ingest_many.delay(batch)

    kills = 0
    proc = worker(env, log, "-Q", "ingest", "-c", "2")
    try:
        proc.wait_for("ready.")
        while (kills < kills_wanted or (kills < 12 and not until())) and (
            buffer.get_buffer_size() < total
        ):
            before = buffer.get_buffer_size()
            wait_until(
                lambda before=before: buffer.get_buffer_size() >= min(total, before + 100),  # type: ignore[misc]
                60,
                "the worker to apply some batches",
                alive=proc.alive,
            )
            if buffer.get_buffer_size() < total:
                kill(proc)
                kills += 1
                if not proc.alive():
                    proc = worker(env, log, "-Q", "ingest", "-c", "2")
                    proc.wait_for("ready.")
        assert kills >= 1, "the worker finished before it could be killed; send more work"
        # Unacknowledged tasks come back (AMQP: at once; Redis: after the visibility timeout).
        wait_until(
            lambda: buffer.get_buffer_size() >= total,
            60,
            f"every batch to be applied (buffer {buffer.get_buffer_size()} of {total})",
            alive=proc.alive,
        )
    finally:
        proc.stop()
    assert buffer.get_buffer_size() == total, "a redelivered batch was applied twice"

    sink = open_sink(env["CLICKHOUSE_URL"])
    while buffer.get_buffer_size():
        Flusher(redis, settings, lambda: sink).process_buffer()
    sink.close()
    assert landed(env["CLICKHOUSE_URL"]) == (total, total)


def _pool_killer(redis: redis_lib.Redis) -> Callable[[CeleryProcess], None]:
    """SIGKILL a worker's pool processes while they are inside a task.

    An ingest task takes about a millisecond, so a kill at a random moment
    mostly finds an idle pool. Redis writes are paused first (CLIENT PAUSE
    WRITE): pool processes holding a task block in its apply call, and the
    kill lands mid-task (as an OOM killer would), not between tasks.
    """

    def kill(proc: CeleryProcess) -> None:
        assert proc.process is not None
        redis.client_pause(2000, all=False)
        try:
            time.sleep(0.3)  # let the prefetched tasks reach their apply call
            children = subprocess.run(
                ["pgrep", "-P", str(proc.process.pid)], capture_output=True, text=True
            ).stdout.split()
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        finally:
            redis.client_unpause()

    return kill


def test_pool_processes_killed_mid_ingest_lose_and_duplicate_nothing(
    app: Celery, env: dict[str, str], redis: redis_lib.Redis, tmp_path: Path
) -> None:
    # The main process sees WorkerLostError and, with reject_on_worker_lost,
    # puts the task back on the queue; batches applied but not yet acked come
    # back too and are skipped by their markers.
    log = tmp_path / "worker.log"

    def a_kill_landed_mid_task() -> bool:
        return "WorkerLostError" in log.read_text()

    _kill_during_ingest(
        app, env, redis, log, _pool_killer(redis), kills_wanted=4, until=a_kill_landed_mid_task
    )
    assert a_kill_landed_mid_task()


def test_whole_worker_killed_mid_ingest_on_amqp_loses_and_duplicates_nothing(
    env: dict[str, str], redis: redis_lib.Redis, tmp_path: Path
) -> None:
    # The whole worker (main process and pool) is SIGKILLed, repeatedly. On
    # AMQP the broker redelivers everything unacknowledged when the dead
    # connection closes. (A Redis broker has a window in which a popped task
    # is not yet recorded as unacknowledged: see the README, "Delivery".)
    if not rabbitmq_reachable():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672 (guest/guest) for the whole-worker kill test")
    env = {**env, "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"}
    app = create_app(Settings.from_env(env))
    _fresh_amqp_queues(app)
    try:
        log = tmp_path / "worker.log"

        def an_applied_batch_came_back() -> bool:
            # A kill that lands between a task's apply and its ack: a matter of timing,
            # so the worker is killed again (up to 12 times) until one has.
            return "was applied before: skipped" in log.read_text()

        _kill_during_ingest(
            app, env, redis, log, CeleryProcess.kill, kills_wanted=4,
            until=an_applied_batch_came_back,
        )  # fmt: skip
        assert an_applied_batch_came_back()
    finally:
        app.close()


def test_redelivery_of_an_applied_batch_applies_nothing(
    app: Celery, env: dict[str, str], redis: redis_lib.Redis, tmp_path: Path
) -> None:
    buffer = EventBuffer(redis, settings_of(env))
    batch = [{"project_id": "p", "name": "x", "created_at": T0} for _ in range(3)]
    task_id = str(uuid.uuid4())
    proc = worker(env, tmp_path / "worker.log", "-Q", "ingest", "-P", "solo")
    try:
        proc.wait_for("ready.")
        app.send_task("eventbuffer.ingest_events", args=[batch], task_id=task_id)
        wait_until(lambda: buffer.get_buffer_size() == 3, 20, "the first delivery")
        # The same message again, as a broker redelivers it after a lost ack.
        app.send_task("eventbuffer.ingest_events", args=[batch], task_id=task_id)
        proc.wait_for(f"batch {task_id} was applied before: skipped")
    finally:
        proc.stop()
    assert buffer.get_buffer_size() == 3


def test_a_run_stopped_by_its_batch_limit_asks_for_the_next_at_once(
    app: Celery, env: dict[str, str], redis: redis_lib.Redis, tmp_path: Path
) -> None:
    # One claim of 30 per run (EVENT_BUFFER_MAX_BATCHES_PER_FLUSH=1) and 80 rows queued.
    # No Beat runs and no ingest asks for a flush: only a run whose last claim was
    # full can ask for the next, until the queue is empty.
    env = {**env, "EVENT_BUFFER_BATCH_SIZE": "30", "EVENT_BUFFER_CHUNK_SIZE": "30"}
    buffer = EventBuffer(redis, settings_of(env))
    from worker.events import parse_event

    buffer.apply(
        [parse_event({"project_id": "p", "name": "x", "created_at": T0 + n}) for n in range(80)]
    )
    proc = worker(env, tmp_path / "worker.log", "-Q", "flush", "-P", "solo")
    try:
        proc.wait_for("ready.")
        app.send_task("eventbuffer.process_buffer")
        wait_until(
            lambda: buffer.get_buffer_size() == 0,
            30,
            "the runs that follow the first",
            alive=proc.alive,
            interval=0.2,
        )
    finally:
        proc.stop()
    assert landed(env["CLICKHOUSE_URL"]) == (80, 80)


def test_two_concurrent_process_buffer_runs_one_does_the_work(
    app: Celery, env: dict[str, str], redis: redis_lib.Redis, tmp_path: Path
) -> None:
    env = {**env, "EVENT_BUFFER_MAX_BATCHES_PER_FLUSH": "1000", "EVENT_BUFFER_BATCH_SIZE": "500"}
    settings = settings_of(env)
    buffer = EventBuffer(redis, settings)
    from worker.events import parse_event

    for chunk in range(20):
        buffer.apply(
            [
                parse_event({"project_id": "p", "name": "x", "created_at": T0 + chunk * 1000 + n})
                for n in range(1000)
            ]
        )
    proc = worker(env, tmp_path / "worker.log", "-Q", "flush", "-c", "2")
    try:
        proc.wait_for("ready.")
        first = app.send_task("eventbuffer.process_buffer")
        second = app.send_task("eventbuffer.process_buffer")
        results = [first.get(timeout=60), second.get(timeout=60)]
    finally:
        proc.stop()
    assert sum(r["rows"] for r in results) == 20_000
    assert sorted(r["rows"] > 0 for r in results) == [False, True]
    assert landed(env["CLICKHOUSE_URL"]) == (20_000, 20_000)


def test_back_pressure_flushes_before_the_next_beat(
    app: Celery, env: dict[str, str], redis: redis_lib.Redis, tmp_path: Path
) -> None:
    env = {**env, "EVENT_BUFFER_HIGH_WATER": "50"}
    app = create_app(Settings.from_env(env))
    ingest_many = app.signature("eventbuffer.ingest_events")
    proc = worker(env, tmp_path / "worker.log", "-Q", "ingest,flush", "-c", "2")
    try:
        proc.wait_for("ready.")
        ingest_many.delay(
            [{"project_id": "p", "name": "x", "created_at": T0 + n} for n in range(80)]
        )
        # No Beat runs: only the back-pressure request can flush these.
        wait_until(
            lambda: landed(env["CLICKHOUSE_URL"])[0] == 80,
            30,
            "the back-pressure flush",
            alive=proc.alive,
            interval=0.5,
        )
    finally:
        proc.stop()
        app.close()
