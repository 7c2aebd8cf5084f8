"""Celery workers on the reliable transport, for real: pools, shutdowns, kills, senders.

Every worker here is `celery -A worker worker` in its own process group
(tests/support/celery_procs.py), consuming a broker Redis of its own; the buffer is
the session's Redis. Tasks are sent with kombu's stock transport (the test's
Celery app, or a plain Celery app that imports nothing of eventbuffer), as
any producer sends them. Each event is regular (no session), so the buffer's
queue holds exactly one row per applied event: counting ids there shows
every task applied exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from tests.support.broker_system import (
    CONSUMER_TIMEOUT_S,
    KEYS,
    T0,
    System,
)
from tests.support.celery_procs import ROOT, CeleryProcess
from tests.support.polling import wait_until
from worker.celery import create_app
from worker.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture
def system(tmp_path: Path, redis_url: str, redis: redis_lib.Redis) -> Iterator[System]:
    made = System(tmp_path, redis_url)
    try:
        yield made
    finally:
        made.close()


def no_errors(proc: CeleryProcess) -> None:
    text = proc.text()
    assert "Traceback" not in text and "ERROR/" not in text, text[-3000:]


@pytest.mark.parametrize(
    "pool", [("-P", "prefork", "-c", "2"), ("-P", "solo"), ("-P", "threads", "-c", "3")]
)
def test_every_pool_consumes_and_leaves_nothing_behind(
    system: System, pool: tuple[str, ...]
) -> None:
    proc = system.worker("w", *pool)
    proc.wait_for("ready.")
    assert "Connected to eventbuffer-redis://" in proc.text()
    system.send(40)
    system.wait_applied()
    [consumer] = system.consumers()
    assert consumer.split(":")[1] == str(proc.process.pid if proc.process else "")
    proc.stop()
    system.assert_exactly_once()
    assert system.inflight() == 0 and system.consumers() == [] and not system.held_task_ids()
    assert system.broker.llen("ingest") == 0
    no_errors(proc)


def test_a_retired_pool_process_is_replaced_and_its_tasks_run_once(system: System) -> None:
    # The prefork pool of worker/prefork.py, as the flush worker on chDB runs
    # it: every pool process retires after its task; each is replaced, and
    # tasks prefetched meanwhile run once in the next one.
    proc = system.worker("w", "-P", "prefork", "-c", "1", "--max-tasks-per-child", "1")
    proc.wait_for("ready.")
    assert "(prefork)" in proc.text()  # worker.prefork:TaskPool names itself as Celery's does
    system.send(12)
    system.wait_applied()

    def pool_processes() -> list[str]:  # the pool process of every task that succeeded
        lines = proc.text().splitlines()
        return [
            ln.split("/")[1].split("]")[0]
            for ln in lines
            if "/ForkPoolWorker-" in ln and "succeeded" in ln
        ]

    # The buffer has every event before the last task logs its success.
    wait_until(lambda: len(pool_processes()) >= 12, 30, "12 tasks logged as succeeded")
    assert len(set(pool_processes())) == 12, sorted(pool_processes())
    proc.stop()
    system.assert_exactly_once()
    assert system.inflight() == 0 and not system.held_task_ids()
    no_errors(proc)


def test_the_default_prefork_pool_is_prompt_to_replace_processes() -> None:
    from celery.concurrency import get_implementation

    from worker.prefork import MAINTAIN_INTERVAL_S, PromptAsynPool, TaskPool

    settings = Settings.from_env({})
    assert create_app(settings).conf.worker_pool == "worker.prefork:TaskPool"
    assert get_implementation("worker.prefork:TaskPool") is TaskPool
    assert TaskPool.Pool is PromptAsynPool and MAINTAIN_INTERVAL_S < 5.0
    # The property Celery's hub reads for its periodic maintenance.
    timers = PromptAsynPool.timers.fget(type("P", (), {"maintain_pool": print})())  # type: ignore[attr-defined]
    assert list(timers.values()) == [MAINTAIN_INTERVAL_S]


def test_warm_shutdown_puts_prefetched_tasks_back_in_order(system: System) -> None:
    proc = system.worker("w", "-P", "prefork", "-c", "1")  # prefetch: 4 tasks
    proc.wait_for("ready.")
    system.pause_buffer(3000)
    system.send(6)
    wait_until(lambda: system.inflight() == 4, 10, "the worker to hold 4 tasks", alive=proc.alive)
    held = system.held_task_ids()
    assert len(held) == 4
    assert proc.process is not None
    # Warm shutdown, as `docker stop` asks for it (the main process only): the
    # running task finishes, the prefetched ones go back.
    os.kill(proc.process.pid, signal.SIGTERM)
    assert proc.process.wait(30) == 0
    assert "3 unacknowledged task(s) put back" in proc.text()
    assert system.inflight() == 0 and system.consumers() == []
    queued = [json.loads(raw)["headers"]["id"] for raw in system.broker.lrange("ingest", 0, -1)]
    assert len(queued) == 5 and len(set(queued) & held) == 3  # 1 ran, 3 back, 2 never fetched
    assert len(system.applied()) == 5  # the running one (5 events) finished
    again = system.worker("again", "-P", "solo")
    again.wait_for("ready.")
    system.wait_applied()
    again.stop()
    system.assert_exactly_once()
    no_errors(proc)


def test_a_cold_shutdown_loses_nothing(system: System) -> None:
    proc = system.worker("w", "-P", "prefork", "-c", "1")
    proc.wait_for("ready.")
    system.pause_buffer(3000)
    system.send(6)
    wait_until(lambda: system.inflight() == 4, 10, "the worker to hold 4 tasks", alive=proc.alive)
    assert proc.process is not None
    os.kill(proc.process.pid, signal.SIGQUIT)  # cold: running tasks are not waited for
    proc.process.wait(30)
    assert "Cold shutdown" in proc.text()
    system.buffer.execute_command("CLIENT", "UNPAUSE")
    # What the dead worker still held (if anything) comes back after its timeout.
    again = system.worker("again", "-P", "solo")
    again.wait_for("ready.")
    system.wait_applied(timeout=30)
    again.stop()
    system.assert_exactly_once()
    assert system.inflight() == 0


def test_a_worker_killed_for_good_has_its_tasks_run_by_another(system: System) -> None:
    doomed = system.worker("doomed", "-P", "prefork", "-c", "1")
    doomed.wait_for("ready.")
    # The consumer registers on its first fetch or beat, which may come just after "ready.".
    wait_until(lambda: len(system.consumers()) == 1, 10, "the worker to register as a consumer")
    [doomed_id] = system.consumers()
    system.pause_buffer(4000)
    system.send(8)
    wait_until(lambda: system.inflight() == 4, 10, "the worker to hold 4 tasks")
    other = system.worker("other", "-P", "solo")
    other.wait_for("ready.")
    doomed.kill()  # the whole process group, never restarted
    killed_at = time.monotonic()
    system.buffer.execute_command("CLIENT", "UNPAUSE")
    wait_until(
        lambda: not system.broker.exists(KEYS.inflight(doomed_id)), 30, "the dead worker's tasks"
    )
    recovered_after = time.monotonic() - killed_at
    system.wait_applied()
    other.stop()
    system.assert_exactly_once()
    text = other.text()
    assert f"found consumer {doomed_id} dead" in text and "4 unacknowledged task(s)" in text
    assert system.consumers() == []
    # Not before the deadline (no heartbeat for CONSUMER_TIMEOUT_S), and not long after it.
    print(f"recovered {recovered_after:.1f} s after the kill (timeout {CONSUMER_TIMEOUT_S} s)")
    assert recovered_after < 10 * CONSUMER_TIMEOUT_S


FOREIGN_SENDER = textwrap.dedent(
    """
    import sys
    from celery import Celery

    url, tasks = sys.argv[1], sys.argv[2]
    app = Celery("someone-else", broker=url)  # stock kombu Redis transport, JSON
    for n, batch in enumerate(__import__("json").loads(tasks)):
        app.send_task("eventbuffer.ingest_events", args=[batch], queue="ingest",
                      priority=(9 if n % 3 == 0 else 0))
    app.close()
    mine = [m for m in sys.modules if m.split(".")[0] in ("worker", "tasks", "lua_scripts")]
    print("eventbuffer modules:", mine)
    """
)


def test_a_foreign_celery_app_delivers_to_the_worker(system: System, tmp_path: Path) -> None:
    proc = system.worker("w", "-P", "solo")
    proc.wait_for("ready.")
    batches = [
        [{"id": str(uuid.uuid4()), "project_id": "p", "name": "tick", "created_at": T0}]
        for _ in range(6)
    ]
    system.sent = [b[0]["id"] for b in batches]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", FOREIGN_SENDER, system.broker_server.url, json.dumps(batches)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "eventbuffer modules: []" in done.stdout
    system.wait_applied()
    proc.stop()
    system.assert_exactly_once()


def test_an_untested_kombu_stops_the_worker_with_one_line(system: System) -> None:
    fake = (
        "import kombu, sys; kombu.__version__ = '5.8.0'; "
        "sys.argv = ['celery', '-A', 'worker', 'worker', '-Q', 'ingest', '--without-mingle', "
        "'--without-gossip']; from celery.__main__ import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", fake],
        cwd=ROOT,
        env=system.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    [line] = (done.stdout + done.stderr).strip().splitlines()
    assert "tested with kombu 5.7.0 only, not 5.8.0" in line


def test_the_stock_transport_can_still_be_chosen(
    tmp_path: Path, redis_url: str, redis: Any
) -> None:
    system = System(tmp_path, redis_url, EVENT_BUFFER_BROKER_TRANSPORT="kombu")
    try:
        proc = system.worker("w", "-P", "solo")
        proc.wait_for("ready.")
        assert "Connected to redis://" in proc.text()
        system.send(3)
        system.wait_applied()
        assert system.consumers() == [] and system.inflight() == 0
        proc.stop()
        system.assert_exactly_once()
    finally:
        system.close()
