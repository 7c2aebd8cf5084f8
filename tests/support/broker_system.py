"""A broker Redis, the buffer Redis, Celery workers on the reliable transport and a stock sender."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis as redis_lib
from celery import Celery

from tests.support.celery_procs import CeleryProcess, project_env, worker
from tests.support.dates import BASE_MS
from tests.support.polling import wait_until
from tests.support.servers import RedisServer
from worker.broker.broker_keys import BrokerKeys
from worker.celery import create_app
from worker.keys import Keyspace
from worker.settings import Settings

KEYS = BrokerKeys()
T0 = BASE_MS
CONSUMER_TIMEOUT_S = 2


class System:
    """A broker Redis, the buffer Redis, the env of the workers and a stock sender."""

    def __init__(self, tmp: Path, buffer_url: str, **env: str) -> None:
        self.tmp = tmp
        self.broker_server = RedisServer(tmp / "broker")
        self.broker_server.start()
        self.env = project_env(
            REDIS_URL=buffer_url,
            CELERY_BROKER_URL=self.broker_server.url,
            CLICKHOUSE_URL=f"chdb://{tmp / 'ch'}",
            EVENT_BUFFER_CONSUMER_TIMEOUT_S=str(CONSUMER_TIMEOUT_S),
            **env,
        )
        self.settings = Settings.from_env(self.env)
        self.app: Celery = create_app(self.settings)
        self.broker = redis_lib.Redis.from_url(self.broker_server.url)
        self.buffer = redis_lib.Redis.from_url(buffer_url)
        self.queue = Keyspace(self.settings.key_prefix, 1).shard(0).queue
        self.procs: list[CeleryProcess] = []
        self.sent: list[str] = []

    def worker(self, name: str, *args: str) -> CeleryProcess:
        proc = worker(self.env, self.tmp / f"{name}.log", "-Q", "ingest", "-n", f"{name}@%h", *args)
        self.procs.append(proc)
        return proc

    def send(self, tasks: int, per_task: int = 5, **options: Any) -> None:
        for _ in range(tasks):
            batch = [
                {"id": str(uuid.uuid4()), "project_id": "p", "name": "tick", "created_at": T0}
                for _ in range(per_task)
            ]
            self.sent += [e["id"] for e in batch]
            self.app.send_task("eventbuffer.ingest_events", args=[batch], queue="ingest", **options)

    def applied(self) -> Counter[str]:
        rows = self.buffer.lrange(self.queue, 0, -1)
        return Counter(json.loads(row)["id"] for row in rows)

    def wait_applied(self, timeout: float = 60) -> None:
        wait_until(
            lambda: len(self.applied()) >= len(set(self.sent)),
            timeout,
            f"{len(self.sent)} events in the buffer (have {len(self.applied())})",
        )

    def assert_exactly_once(self) -> None:
        applied = self.applied()
        assert set(applied) == set(self.sent), "events missing or unexpected"
        assert max(applied.values()) == 1, "an event was applied twice"

    def inflight(self) -> int:
        """Messages held by consumers (in-flight index entries)."""
        return sum(int(self.broker.hlen(k)) for k in self.broker.scan_iter(KEYS.inflight("*")))

    def held_task_ids(self) -> set[str]:
        """Task ids of the messages consumers hold, each under its own key."""
        keys = self.broker.scan_iter(KEYS.message("*", "*"))
        return {json.loads(self.broker.lindex(k, 0))["headers"]["id"] for k in keys}

    def consumers(self) -> list[str]:
        return [m.decode() for m in self.broker.zrange(KEYS.registry, 0, -1)]

    def pause_buffer(self, ms: int) -> None:
        """Stall the buffer Redis' writes: a task received meanwhile blocks in its apply."""
        self.buffer.execute_command("CLIENT", "PAUSE", ms, "WRITE")

    def close(self) -> None:
        with_errors = []
        for proc in self.procs:
            try:
                proc.stop(timeout=15)
            except Exception as exc:
                with_errors.append(exc)
            proc.kill()
        self.buffer.execute_command("CLIENT", "UNPAUSE")
        self.app.close()
        self.broker.close()
        self.buffer.close()
        self.broker_server.kill()
