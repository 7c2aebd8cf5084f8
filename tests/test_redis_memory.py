"""Redis memory: an evicting policy is refused at a worker's start-up, and `status`, `--watch`
and the metrics show each Redis' used memory, maxmemory and policy.

The servers here are this module's own (started with `maxmemory` and a policy; the shared
test Redis is never reconfigured).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

from tests.conftest import Result
from tests.support.celery_procs import project_env, worker
from tests.support.prometheus import parse, value
from tests.support.servers import RedisServer, free_port, start_redis
from worker import cli, runtime
from worker.cli.status import memory_lines, status_data
from worker.cli.watch import WatchState, render
from worker.errors import EvictionPolicyError
from worker.metrics import RedisCollector
from worker.redis_memory import (
    NOEVICTION,
    RedisMemory,
    check_eviction,
    evicts,
    memory_report,
    refusal,
)
from worker.settings import Settings

MAXMEMORY = 64 * 1024 * 1024
PASSWORD = "s3cret-pw"
EVICTING = ("allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu",
            "volatile-random", "volatile-ttl")  # fmt: skip


# -- the judge (pure) ---------------------------------------------------------------------


def memory(
    policy: str, node: str = "10.0.0.5:6379", db: int | None = 0, **kw: object
) -> RedisMemory:
    fields: dict[str, object] = {
        "redis": "buffer",
        "node": node,
        "db": db,
        "used_bytes": 1000,
        "maxmemory_bytes": 4000,
        "policy": policy,
    }
    fields.update(kw)
    return RedisMemory(**fields)  # type: ignore[arg-type]


def test_every_policy_but_noeviction_evicts() -> None:
    assert not evicts(NOEVICTION)
    for policy in EVICTING:
        assert evicts(policy), policy
    assert memory("noeviction").used_ratio == 0.25
    assert memory("noeviction", maxmemory_bytes=0).used_ratio is None


def test_the_refusal_is_one_line_naming_the_server_the_policy_and_the_fix() -> None:
    assert refusal([memory(NOEVICTION), memory(NOEVICTION, redis="broker", db=1)]) is None
    line = refusal([memory("allkeys-lru"), memory("allkeys-lru", redis="broker")])
    assert line is not None and "\n" not in line
    assert "Redis 10.0.0.5:6379/0 (buffer, broker) has maxmemory-policy allkeys-lru" in line
    assert "CONFIG SET maxmemory-policy noeviction" in line and "redis.conf" in line
    assert "EVENT_BUFFER_ALLOW_EVICTION=true" in line
    # One server, two databases: named once, with both.
    line = refusal([memory("volatile-lru"), memory("volatile-lru", redis="broker", db=1)])
    assert line is not None
    assert (
        "Redis 10.0.0.5:6379 (buffer db 0, broker db 1) has maxmemory-policy volatile-lru" in line
    )
    # Only the servers that evict are named.
    line = refusal(
        [memory(NOEVICTION), memory("allkeys-lfu", node="10.0.0.6:6380", redis="broker", db=2)]
    )
    assert line is not None and "10.0.0.5" not in line
    assert "Redis 10.0.0.6:6380/2 (broker) has maxmemory-policy allkeys-lfu" in line
    # A cluster's masters: no database.
    line = refusal([memory("allkeys-lru", node="10.0.0.7:7001", db=None)])
    assert line is not None and "Redis 10.0.0.7:7001 (buffer) has" in line


# -- real servers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evicting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis with maxmemory 64mb, allkeys-lru, and a password."""
    server = start_redis(
        tmp_path_factory.mktemp("evicting"),
        "--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "allkeys-lru",
    )  # fmt: skip
    client = server.client()
    client.config_set("requirepass", PASSWORD)  # after start: start_redis' probe has none
    client.close()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis with maxmemory 64mb and noeviction (this module may CONFIG SET it)."""
    server = start_redis(
        tmp_path_factory.mktemp("bounded"),
        "--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction",
    )  # fmt: skip
    try:
        yield server
    finally:
        server.stop()


def url(server: RedisServer, db: int = 0, password: bool = True) -> str:
    auth = f":{PASSWORD}@" if password else ""
    return f"redis://{auth}127.0.0.1:{server.port}/{db}"


def test_a_worker_on_an_evicting_redis_stops_at_start_up_with_one_line(
    evicting: RedisServer, tmp_path: Path
) -> None:
    env = project_env(REDIS_URL=url(evicting), CLICKHOUSE_URL=f"chdb://{tmp_path / 'ch'}")
    proc = worker(env, tmp_path / "worker.log", "-Q", "ingest,flush", "-P", "solo")
    assert proc.process is not None
    assert proc.process.wait(60) == 2
    log = proc.text()
    lines = [line for line in log.splitlines() if "maxmemory-policy" in line]
    assert len(lines) == 1, log
    assert lines[0].startswith(f"eventbuffer: Redis 127.0.0.1:{evicting.port}/0 (buffer, broker)")
    assert "has maxmemory-policy allkeys-lru" in lines[0]
    assert "CONFIG SET maxmemory-policy noeviction" in lines[0]
    assert "EVENT_BUFFER_ALLOW_EVICTION=true" in lines[0]
    assert PASSWORD not in log
    assert "ready." not in log and "Traceback" not in log


def test_the_setting_lets_a_worker_start_on_an_evicting_redis(
    evicting: RedisServer, tmp_path: Path
) -> None:
    env = project_env(
        REDIS_URL=url(evicting),
        CLICKHOUSE_URL=f"chdb://{tmp_path / 'ch'}",
        EVENT_BUFFER_ALLOW_EVICTION="true",
    )
    proc = worker(env, tmp_path / "worker.log", "-Q", "ingest", "-P", "solo")
    try:
        proc.wait_for(" ready.", timeout=60)
        log = proc.text()
        assert "eventbuffer: warning: Redis " in log
        assert "has maxmemory-policy allkeys-lru; EVENT_BUFFER_ALLOW_EVICTION=true accepts" in log
        assert PASSWORD not in log
    finally:
        proc.stop()


def test_an_evicting_broker_alone_is_refused_and_named(
    evicting: RedisServer, bounded: RedisServer
) -> None:
    settings = Settings.from_env(
        {"REDIS_URL": url(bounded, password=False), "CELERY_BROKER_URL": url(evicting, 1)}
    )
    with pytest.raises(EvictionPolicyError) as refused:
        check_eviction(settings)
    line = str(refused.value)
    assert f"Redis 127.0.0.1:{evicting.port}/1 (broker) has maxmemory-policy allkeys-lru" in line
    assert str(bounded.port) not in line
    # The buffer alone on a noeviction Redis, the broker AMQP (not asked): nothing to say.
    amqp = Settings.from_env(
        {"REDIS_URL": url(bounded, password=False), "CELERY_BROKER_URL": "amqp://127.0.0.1:1//"}
    )
    assert check_eviction(amqp) == []


def test_a_redis_that_does_not_answer_is_not_checked_and_does_not_block_the_start() -> None:
    port = free_port()  # nothing listens there
    settings = Settings.from_env({"REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{port}/0"})
    warnings = check_eviction(settings)
    assert len(warnings) == 1
    assert (
        f"cannot read the maxmemory-policy of the buffer and broker Redis 127.0.0.1:{port}"
        in (warnings[0])
    )
    assert PASSWORD not in warnings[0]


# -- status, --watch, metrics ---------------------------------------------------------------


@pytest.fixture
def run_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> Callable[..., Result]:
    """`eventbuffer ARGS` in this process, on the given buffer and broker URLs."""

    def invoke(redis_url: str, broker_url: str, *argv: str) -> Result:
        monkeypatch.setenv("REDIS_URL", redis_url)
        monkeypatch.setenv("CELERY_BROKER_URL", broker_url)
        monkeypatch.setenv("CLICKHOUSE_URL", f"chdb://{tmp_path / 'ch'}")
        monkeypatch.setenv("COLUMNS", "200")
        try:
            code = cli.main(list(argv))
        finally:
            runtime.reset()
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


def test_status_shows_each_redis_memory_maxmemory_and_policy(
    run_on: Callable[..., Result], evicting: RedisServer, bounded: RedisServer
) -> None:
    buffer, broker = url(evicting), url(bounded, 1, password=False)
    result = run_on(buffer, broker, "status")
    assert result.code == 0, result.err
    out = result.out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if "127.0.0.1:" in line}
    evicting_row = rows[f"127.0.0.1:{evicting.port}"]
    assert evicting_row[1] == "buffer" and evicting_row[-1] == "allkeys-lru"
    assert "64.0 MiB" in " ".join(evicting_row)
    assert rows[f"127.0.0.1:{bounded.port}"][1:2] == ["broker"]
    assert rows[f"127.0.0.1:{bounded.port}"][-1] == "noeviction"
    flat = " ".join(out.split())
    assert (
        f"! Redis 127.0.0.1:{evicting.port} (buffer) evicts keys at maxmemory (allkeys-lru)" in flat
    )
    assert f"! Redis 127.0.0.1:{bounded.port}" not in flat
    assert PASSWORD not in out

    data = json.loads(run_on(buffer, broker, "status", "--json").out)
    by_role = {m["redis"]: m for m in data["memory"]}
    assert by_role["buffer"]["maxmemory_bytes"] == MAXMEMORY
    assert by_role["buffer"]["policy"] == "allkeys-lru" and by_role["buffer"]["evicts"]
    assert by_role["buffer"]["used_bytes"] > 0
    assert 0 < by_role["buffer"]["used_ratio"] < 0.5
    assert by_role["broker"]["node"] == f"127.0.0.1:{bounded.port}"
    assert by_role["broker"]["db"] == 1 and not by_role["broker"]["evicts"]

    # A broker that does not answer: status says so, and still shows the buffer.
    closed = f"redis://127.0.0.1:{free_port()}/0"
    out = run_on(buffer, closed, "status").out
    assert "cannot read its memory" in out and "allkeys-lru" in out


def test_status_warns_at_80_and_95_percent_of_maxmemory(bounded: RedisServer) -> None:
    client = bounded.client()
    bounded.ensure_ours()
    used = int(client.info("memory")["used_memory"])
    settings = Settings.from_env({"REDIS_URL": url(bounded, password=False)})
    try:
        for share, level in ((0.5, None), (0.85, "warning"), (0.97, "critical")):
            client.config_set("maxmemory", int(used / share) + 1)
            report = memory_report(settings)
            lines = memory_lines([m.as_dict() for m in report])
            warned = [line for line in lines if "of maxmemory" in line]
            if level is None:
                assert warned == [], lines
                continue
            assert len(warned) == 1, lines
            assert f"Redis 127.0.0.1:{bounded.port} (buffer, broker) is at" in warned[0]
            assert f"({level})" in warned[0]
    finally:
        client.config_set("maxmemory", MAXMEMORY)
        client.close()


def test_watch_shows_the_memory_of_each_redis_within_80_columns(
    evicting: RedisServer, bounded: RedisServer
) -> None:
    settings = Settings.from_env(
        {"REDIS_URL": url(evicting), "CELERY_BROKER_URL": url(bounded, 1, password=False)}
    )
    runtime.configure(settings)
    try:
        data = status_data(settings)
    finally:
        runtime.reset()
    state = WatchState()
    state.update(data, at=0.0)
    console = Console(record=True, width=80, force_terminal=False)
    console.print(render(data, state, settings.high_water))
    view = console.export_text()
    assert max(len(line) for line in view.splitlines()) <= 80, view
    assert "maxmemory" in view and "policy" in view
    assert f"127.0.0.1:{evicting.port}" in view and "allkeys-lru" in view
    assert f"127.0.0.1:{bounded.port}" in view and "noeviction" in view
    assert f"! Redis 127.0.0.1:{evicting.port} (buffer) evicts keys (allkeys-lru)" in view
    assert "…" not in view.replace("ingest …", "").replace("flush …", "")


def test_metrics_export_used_memory_maxmemory_and_policy(
    evicting: RedisServer, bounded: RedisServer
) -> None:
    settings = Settings.from_env(
        {"REDIS_URL": url(evicting), "CELERY_BROKER_URL": url(bounded, 1, password=False)}
    )
    client = redis_lib.Redis.from_url(settings.redis_url)
    registry = CollectorRegistry()
    registry.register(RedisCollector(settings, lambda: client))
    try:
        samples = parse(generate_latest(registry).decode())
    finally:
        client.close()
    buffer = {"redis": "buffer", "node": f"127.0.0.1:{evicting.port}"}
    broker = {"redis": "broker", "node": f"127.0.0.1:{bounded.port}"}
    assert value(samples, "eventbuffer_redis_maxmemory_bytes", **buffer) == MAXMEMORY
    assert value(samples, "eventbuffer_redis_maxmemory_bytes", **broker) == MAXMEMORY
    assert value(samples, "eventbuffer_redis_used_memory_bytes", **buffer) > 0
    assert value(samples, "eventbuffer_redis_used_memory_bytes", **broker) > 0
    assert value(samples, "eventbuffer_redis_maxmemory_policy", policy="allkeys-lru", **buffer) == 1
    assert value(samples, "eventbuffer_redis_maxmemory_policy", policy="noeviction", **broker) == 1
    assert value(samples, "eventbuffer_redis_up") == 1

    # A broker that does not answer leaves only its own gauges out.
    down = Settings.from_env(
        {"REDIS_URL": url(evicting), "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    )
    client = redis_lib.Redis.from_url(down.redis_url)
    registry = CollectorRegistry()
    registry.register(RedisCollector(down, lambda: client))
    try:
        samples = parse(generate_latest(registry).decode())
    finally:
        client.close()
    assert value(samples, "eventbuffer_redis_up") == 1
    assert value(samples, "eventbuffer_redis_maxmemory_bytes", **buffer) == MAXMEMORY
    assert not [k for k in samples if dict(k[1]).get("redis") == "broker"]


def test_run_on_an_evicting_redis_stops_before_starting_anything(
    evicting: RedisServer, tmp_path: Path
) -> None:
    env = project_env(REDIS_URL=url(evicting), CLICKHOUSE_URL=f"chdb://{tmp_path / 'ch'}")
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(
        f"eventbuffer: error: Redis 127.0.0.1:{evicting.port}/0 (buffer, broker)"
    )
    assert (
        "maxmemory-policy allkeys-lru" in line and "CONFIG SET maxmemory-policy noeviction" in line
    )
    assert PASSWORD not in done.stdout + done.stderr
    assert not (tmp_path / "data" / "logs" / "flush.log").exists()  # no worker was started
