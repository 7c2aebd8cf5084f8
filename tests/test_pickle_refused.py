"""A real Celery worker refuses a pickle-serialized task: nothing runs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib

from tests.support.celery_procs import project_env, worker
from tests.support.dates import now_ms
from tests.support.polling import wait_until
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.deadletters import decode_dead_letter
from worker.settings import Settings


class MakeDir:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return os.mkdir, (self.path,)


@pytest.mark.slow
def test_a_worker_refuses_a_pickled_task(
    redis_url: str, redis: redis_lib.Redis, tmp_path: Path
) -> None:
    chdb = f"chdb://{tmp_path / 'ch'}"
    env = project_env(REDIS_URL=redis_url, CLICKHOUSE_URL=chdb)
    settings = Settings.from_env(env)
    sender = create_app(settings)
    sender.conf.accept_content = ["json", "pickle"]  # the sender may; the worker must not
    marker = tmp_path / "pickle-ran"
    proc = worker(env, tmp_path / "worker.log", "-Q", "ingest", "-P", "solo")
    try:
        proc.wait_for("ready.")
        event = {"project_id": "p", "name": "pickled", "created_at": now_ms()}
        sender.send_task(
            "eventbuffer.ingest_events", args=[[event, MakeDir(marker)]], serializer="pickle"
        )
        proc.wait_for("Refusing to deserialize untrusted content of type pickle")
        # A JSON task after it is applied: the worker went on, the pickled one never ran.
        ok = {"project_id": "p", "name": "json", "created_at": now_ms()}
        sender.send_task("eventbuffer.ingest_events", args=[[ok]])
        buffer = EventBuffer(redis, settings)
        wait_until(lambda: buffer.get_buffer_size() == 1, 20, "the JSON task", alive=proc.alive)
    finally:
        proc.stop()
        sender.close()
    assert "ContentDisallowed" in proc.text()
    assert not marker.exists()
    [row] = redis.lrange("{eventbuffer:0}:queue", 0, -1)
    assert json.loads(row)["name"] == "json"
    # Kept, never unpickled: its raw body is a dead letter that no replay can read.
    [entry] = redis.lrange("{eventbuffer:0}:dead", 0, -1)
    header, payload = decode_dead_letter(entry)
    assert (header.reason, header.task) == ("undeliverable_task", "eventbuffer.ingest_events")
    assert "Refusing to deserialize untrusted content of type pickle" in header.error
    assert payload.startswith(b"\x80")  # the pickle protocol's first byte
    assert redis.llen("ingest") == 0  # not left behind to be redelivered
