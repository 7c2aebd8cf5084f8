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
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_lib

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.clock import ManualClock  # noqa: E402
from tests.support.servers import (  # noqa: E402
    RedisServer,
    docker_reachable,
    start_redis,
)
from tests.support.tls_redis import Certs, TlsRedis, make_certs, serve_tls_redis  # noqa: E402
from worker.buffer import EventBuffer  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.sinks.chdb import ChdbSink  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | None]:
    """The session's private redis-server (None when a Docker container serves instead)."""
    if shutil.which("redis-server"):
        server = start_redis(tmp_path_factory.mktemp("redis"))
        try:
            yield server
        finally:
            server.stop()
        return
    yield None


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer | None) -> Iterator[str]:
    if redis_server is not None:
        yield redis_server.url
        return
    if docker_reachable():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7.4-alpine") as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"
        return
    pytest.skip("no redis-server binary and no reachable Docker engine to run one")


@pytest.fixture
def redis(redis_url: str, redis_server: RedisServer | None) -> Iterator[redis_lib.Redis]:
    """A client of the session's Redis, emptied first: after checking that it is ours."""
    if redis_server is not None:
        redis_server.ensure_ours()
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
    """Settings for tests of one rule at a time: views and session_ends are applied at
    once (no reorder window), so a test sees OpenPanel's rules right after `apply`.
    The window is tested in tests/test_reorder.py and with real workers, at its default,
    in tests/test_reorder_workers.py and every test that starts workers from the env."""
    return Settings.from_env(
        {
            "REDIS_URL": redis_url,
            "CLICKHOUSE_URL": chdb_url,
            "EVENT_BUFFER_REORDER_WINDOW_MS": "0",
        }
    )


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
def embedded(tmp_path: Path) -> Iterator[ChdbSink]:
    """An embedded chDB sink on a data directory of the test's own, not migrated."""
    made = ChdbSink(str(tmp_path / "clickhouse"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def chdb_server_url() -> Iterator[str]:
    """ClickHouse 26.x from chDB serving the native protocol, one per module."""
    from tests.support.native_server import chdb_server, chdb_serves

    why = chdb_serves()
    if why is not None:
        pytest.skip(f"no ClickHouse 26.x server here: {why}")
    with chdb_server() as url:
        yield url


@pytest.fixture(scope="module")
def old_server_url() -> Iterator[str]:
    """Debian's ClickHouse 18.16 (`clickhouse-server`), run privately, one per module."""
    from tests.support.native_server import local_server, server_binary

    if server_binary() is None:
        pytest.skip("clickhouse-server (Debian package) is not installed")
    with local_server() as url:
        yield url


@pytest.fixture
def db_url(chdb_server_url: str) -> str:
    """A database on the module's chDB server that no test has used (not created yet)."""
    from tests.support.migrations import fresh_database_url

    return fresh_database_url(chdb_server_url)


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
    monkeypatch.setenv("EVENT_BUFFER_REORDER_WINDOW_MS", str(settings.reorder_window_ms))
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


# A Redis served over TLS with its own certificates (tests/support/tls_redis.py),
# one per test module that asks for it.
@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    with serve_tls_redis(certs, tmp_path_factory.mktemp("tls-redis")) as server:
        yield server


@pytest.fixture
def tls_client(tls_redis: TlsRedis) -> Iterator[redis_lib.Redis]:
    client = tls_redis.client()
    client.flushall()
    yield client
    client.close()
