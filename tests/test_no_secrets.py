"""No password shows in `status` output, CLI errors, exceptions, sink errors or logs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib

from tests.conftest import Result
from tests.support.celery_procs import project_env
from tests.support.dates import now_ms
from tests.support.passwords import (
    PASSWORD,
    QUOTED,
    assert_no_secret,
    exception_texts,
)
from tests.support.servers import free_port
from tests.support.tls_redis import (
    TlsRedis,
)
from worker import cli, runtime
from worker.buffer import EventBuffer
from worker.events import encode_event, parse_event
from worker.flusher import Flusher
from worker.ingestion import ingest
from worker.logs import JsonFormatter, RedactSecrets
from worker.settings import Settings, SettingsError
from worker.sinks import SinkError, open_sink
from worker.sinks.native import NativeSink


@pytest.mark.parametrize(
    "target",
    ["closed", "tls-to-plain", "plain-to-tls"],
)
def test_native_sink_errors_never_carry_the_password(
    target: str, redis_url: str, tls_redis: TlsRedis
) -> None:
    plain_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    url = {
        "closed": f"clickhouses://app:{QUOTED}@127.0.0.1:{free_port()}/db?verify=false",
        # A TLS handshake with a server that speaks plain Redis.
        "tls-to-plain": f"clickhouses://app:{QUOTED}@127.0.0.1:{plain_port}/db?verify=false"
        "&connect_timeout=1&send_receive_timeout=1",
        # The native protocol, in clear text, to a TLS-only server.
        "plain-to-tls": f"clickhouse://app:{QUOTED}@127.0.0.1:{tls_redis.port}/db"
        "?connect_timeout=2&send_receive_timeout=2",
    }[target]
    sink = NativeSink(url)
    row = encode_event(parse_event({"project_id": "p", "name": "x", "created_at": now_ms()}))
    for attempt in (lambda: sink.query("SELECT 1"), lambda: sink.write([row], "t"), sink.migrate):
        with pytest.raises(SinkError) as caught:
            attempt()
        assert "127.0.0.1" in str(caught.value)  # says where, without the credentials
        assert_no_secret(exception_texts(caught.value))
    sink.close()


@pytest.fixture
def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Result]:
    monkeypatch.setenv("COLUMNS", "250")

    def invoke(env: dict[str, str], *argv: str) -> Result:
        for name in ("REDIS_URL", "CLICKHOUSE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


def test_status_shows_no_password(
    run_cli: Callable[..., Result], tls_redis: TlsRedis, tls_client: redis_lib.Redis, tmp_path: Path
) -> None:
    env = {
        "REDIS_URL": tls_redis.url(),
        "CLICKHOUSE_URL": f"clickhouse://app:{QUOTED}@127.0.0.1:{free_port()}/db",
    }
    settings = Settings.from_env(env)
    buffer = EventBuffer(tls_client, settings)
    buffer.apply([parse_event({"project_id": "p", "name": "x", "created_at": now_ms()})])
    as_json = run_cli(env, "status", "--json")
    assert as_json.code == 0, as_json.err
    data = json.loads(as_json.out)
    assert data["totals"]["queued"] == 1
    assert data["redis"].startswith("rediss://:***@127.0.0.1:")
    plain = run_cli(env, "status")
    assert plain.code == 0, plain.err
    assert "rediss://:***@" in plain.out
    for result in (as_json, plain):
        assert_no_secret(result.out + result.err)


def test_cli_errors_show_no_password(
    run_cli: Callable[..., Result], tls_redis: TlsRedis, tls_client: redis_lib.Redis
) -> None:
    closed = free_port()
    clickhouse = f"clickhouse://app:{QUOTED}@127.0.0.1:{closed}/db?connect_timeout=1"
    good_redis = tls_redis.url()
    wrong_redis = tls_redis.url(password="Wr0ng-pw/guess")
    EventBuffer(tls_client, Settings.from_env({"REDIS_URL": good_redis})).apply(
        [parse_event({"project_id": "p", "name": "x", "created_at": now_ms()})]
    )
    cases = [
        ({"REDIS_URL": wrong_redis}, ["status"], 1),
        ({"REDIS_URL": good_redis, "CLICKHOUSE_URL": clickhouse}, ["query", "SELECT 1"], 1),
        ({"REDIS_URL": good_redis, "CLICKHOUSE_URL": clickhouse}, ["migrate"], 1),
        ({"REDIS_URL": good_redis, "CLICKHOUSE_URL": clickhouse}, ["flush"], 1),
        ({"REDIS_URL": f"user:{PASSWORD}@127.0.0.1:6379"}, ["status"], 2),  # no scheme
        ({"CLICKHOUSE_URL": f"https://app:{QUOTED}@ch/db"}, ["migrate"], 2),
        ({"CELERY_BROKER_URL": f"amqp//guest:{QUOTED}@mq//"}, ["status"], 2),  # typo
    ]
    for env, argv, code in cases:
        result = run_cli(env, *argv)
        assert result.code == code, (argv, result)
        assert result.err.startswith("eventbuffer: error:"), (argv, result)
        assert_no_secret(result.out + result.err, PASSWORD, "Wr0ng-pw/guess")


def test_an_unencoded_at_in_a_password_is_masked_whole(run_cli: Callable[..., Result]) -> None:
    closed = free_port()
    redis_url = f"redis://:hunter@2secret@127.0.0.1:{closed}/0"
    clickhouse = f"clickhouse://app:pa@ss@word@127.0.0.1:{closed}/db?connect_timeout=1"
    for env, argv in (
        ({"REDIS_URL": redis_url}, ["status"]),
        ({"REDIS_URL": redis_url, "CLICKHOUSE_URL": clickhouse}, ["query", "SELECT 1"]),
        ({"REDIS_URL": redis_url, "CLICKHOUSE_URL": clickhouse}, ["migrate"]),
    ):
        result = run_cli(env, *argv)
        assert result.code == 1, (argv, result)
        text = result.out + result.err
        assert "***@127.0.0.1" in text, text
        for piece in ("hunter", "2secret", "pa@", "ss@", "word@"):
            assert piece not in text, (argv, text)


def test_settings_errors_show_no_password() -> None:
    for env in (
        {"REDIS_URL": f"default:{PASSWORD}@redis.internal:6379/0"},
        {"REDIS_URL": f"http://:{QUOTED}@redis.internal"},
        {"CELERY_RESULT_BACKEND": f" :{PASSWORD}@h:1 "},
    ):
        with pytest.raises(SettingsError) as caught:
            Settings.from_env(env)
        message = str(caught.value)
        assert next(iter(env)) in message
        assert_no_secret(message)


def test_exceptions_of_an_unreachable_redis_show_no_password(chdb_url: str) -> None:
    url = f"redis://:{QUOTED}@127.0.0.1:{free_port()}/0"
    settings = Settings.from_env({"REDIS_URL": url, "CLICKHOUSE_URL": chdb_url})
    client = redis_lib.Redis.from_url(url, socket_connect_timeout=1)
    with pytest.raises(redis_lib.ConnectionError) as caught:
        ingest(EventBuffer(client, settings), [{"project_id": "p"}], "b")
    assert_no_secret(exception_texts(caught.value))
    with pytest.raises(redis_lib.ConnectionError) as caught:
        Flusher(client, settings, lambda: open_sink(chdb_url)).process_buffer()
    assert_no_secret(exception_texts(caught.value))
    client.close()


def test_worker_logs_show_no_password(
    tls_redis: TlsRedis, tls_client: redis_lib.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    from tasks.flush import process_buffer
    from tasks.ingest import ingest_events

    clickhouse = f"clickhouse://app:{QUOTED}@127.0.0.1:{free_port()}/db?connect_timeout=1"
    settings = Settings.from_env({"REDIS_URL": tls_redis.url(), "CLICKHOUSE_URL": clickhouse})
    runtime.configure(settings)
    caplog.set_level(logging.DEBUG)
    try:
        ingest_events.apply(
            args=[[{"project_id": "p", "name": "x", "created_at": now_ms()}, {"bad": 1}]],
            task_id=str(uuid.uuid4()),
        ).get()
        summary = process_buffer.apply(task_id=str(uuid.uuid4())).get()
    finally:
        runtime.reset()
    assert summary["errors"] == 1
    assert_no_secret(json.dumps(summary))
    records = caplog.records
    assert any("dead-lettered" in r.getMessage() for r in records)
    assert any(r.levelno >= logging.ERROR and "ClickHouse" in r.getMessage() for r in records)
    # The records themselves, and what the worker's handlers would write.
    redact, formatter = RedactSecrets(), JsonFormatter()
    for record in records:
        raw = record.getMessage() + json.dumps({k: str(v) for k, v in vars(record).items()})
        if record.exc_info and record.exc_info[1] is not None:
            raw += exception_texts(record.exc_info[1])
        assert_no_secret(raw)
        redact.filter(record)
        assert_no_secret(formatter.format(record))


def test_subprocess_status_shows_no_password(tls_redis: TlsRedis, tmp_path: Path) -> None:
    env = project_env(REDIS_URL=tls_redis.url(), CLICKHOUSE_URL=f"chdb://{tmp_path}/ch")
    for args in (["status"], ["status", "--json"]):
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", *args],
            env={**env, "COLUMNS": "250"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert_no_secret(done.stdout + done.stderr)
