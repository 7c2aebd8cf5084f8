"""Real servers for the tests: a private redis-server and embedded ClickHouse (chDB).

Redis: a `redis-server` binary on PATH is started on a free port in a
temporary directory (milliseconds, and the tests own it: they may flush,
kill or restart it). Without the binary, testcontainers starts one when a
Docker engine is reachable; otherwise Redis tests are skipped with the
reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_lib

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from worker.buffer import EventBuffer  # noqa: E402
from worker.clock import ManualClock  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.sinks.chdb import ChdbSink  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server process the tests own: start, SIGKILL, restart on the same data."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "no",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis_lib.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis_lib.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)
            finally:
                client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _docker_reachable() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("redis-server"):
        server = RedisServer(tmp_path_factory.mktemp("redis"))
        server.start()
        try:
            yield server.url
        finally:
            server.stop()
        return
    if _docker_reachable():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7.4-alpine") as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"
        return
    pytest.skip("no redis-server binary and no reachable Docker engine to run one")


@pytest.fixture
def redis(redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def chdb_url(tmp_path: Path) -> str:
    return f"chdb://{tmp_path / 'clickhouse'}"


@pytest.fixture
def settings(redis_url: str, chdb_url: str) -> Settings:
    return Settings.from_env({"REDIS_URL": redis_url, "CLICKHOUSE_URL": chdb_url})


@pytest.fixture
def sink(settings: Settings) -> Iterator[ChdbSink]:
    from worker.sinks.chdb import path_from_url

    sink = ChdbSink(path_from_url(settings.clickhouse_url), settings.clickhouse_table)
    sink.migrate()
    sink.close()
    try:
        yield sink
    finally:
        sink.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def buffer(redis: redis_lib.Redis, settings: Settings, clock: ManualClock) -> EventBuffer:
    return EventBuffer(redis, settings, clock)


@pytest.fixture(autouse=True)
def _release_chdb() -> Iterator[None]:
    # chDB allows one open data directory per process: never leak one into the next test.
    yield
    from worker.sinks.chdb import close_all

    close_all()


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests build settings explicitly; a developer's shell must not leak in.
    for name in list(os.environ):
        if name.startswith("EVENT_BUFFER_"):
            monkeypatch.delenv(name)


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def run_main_env() -> dict[str, str | None]:
    """What `run_main` sets in the environment (None: unset); a module may override it."""
    return {"COLUMNS": "200"}  # rich: no wrapping in the captured output


@pytest.fixture
def run_main(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    settings: Settings,
    run_main_env: dict[str, str | None],
) -> Callable[..., Result]:
    """`eventbuffer ARGS` in this process, with the test's Redis and chDB directory."""
    from worker import cli

    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("CLICKHOUSE_URL", settings.clickhouse_url)
    for name, value in run_main_env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)

    def invoke(*argv: str) -> Result:
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke
