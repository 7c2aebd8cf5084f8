"""Real Celery processes for tests: a worker or Beat in its own process group.

Each process gets its environment explicitly, logs to a file the test can
read, and can be stopped politely (SIGTERM) or killed for real (SIGKILL to
the whole group, as an OOM killer or a lost container would).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import redis as redis_lib

from tests.support.polling import wait_until
from worker.broker.broker_consumer import held_by_consumers
from worker.broker.broker_keys import BrokerKeys

ROOT = Path(__file__).resolve().parents[2]


def ingest_backlog(broker: redis_lib.Redis) -> int:
    """Ingest tasks a Redis broker holds: queued, plus delivered and not acknowledged (in
    the reliable transport's in-flight hashes, retries waiting for their countdown
    included, or kombu's `unacked`)."""
    total = int(broker.hlen("unacked")) + held_by_consumers(broker, BrokerKeys())
    for key in broker.scan_iter(match="ingest*"):
        if broker.type(key) == b"list":
            total += int(broker.llen(key))
    return total


def project_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENT_BUFFER_", "CELERY_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(overrides)
    return env


class CeleryProcess:
    def __init__(
        self, args: list[str], env: Mapping[str, str], log: Path, app: str = "worker"
    ) -> None:
        self.args = args
        self.app = app
        self.env = dict(env)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.offset = 0

    def start(self) -> CeleryProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", self.app, *self.args],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def text(self) -> str:
        """What this process (not an earlier one on the same log) has written."""
        if not self.log.exists():
            return ""
        with self.log.open("rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 30) -> None:
        wait_until(
            lambda: needle in self.text(),
            timeout,
            f"{needle!r} in {self.log}",
            alive=self.alive,
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: no warm shutdown, no acks."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def worker(env: Mapping[str, str], log: Path, *extra: str, app: str = "worker") -> CeleryProcess:
    args = ["worker", "--loglevel=INFO", "--without-mingle", "--without-gossip", *extra]
    return CeleryProcess(args, env, log, app).start()


def beat(env: Mapping[str, str], log: Path, schedule: Path) -> CeleryProcess:
    args = ["beat", "--loglevel=INFO", "--schedule", str(schedule)]
    return CeleryProcess(args, env, log).start()
