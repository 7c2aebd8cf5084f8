"""Structured logs: JSON lines with the expected fields, and never a password."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from tests.support.celery_procs import CeleryProcess, project_env
from tests.support.polling import wait_until
from tests.support.servers import RedisServer
from worker import runtime
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.events import parse_event
from worker.logs import JsonFormatter, RedactSecrets, configure_handlers, one_line, redact
from worker.settings import Settings
from worker.sinks import open_sink

SECRET = "s3cr3t-pa55"
NOW = int(time.time() * 1000)


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing JSON lines to a buffer, configured as the Celery signal does."""
    stream = io.StringIO()
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(logging.StreamHandler(stream))
    configure_handlers(logger, "json")
    yield logger, stream
    logger.handlers.clear()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_redact_masks_url_passwords_and_password_parameters() -> None:
    assert redact(f"redis://:{SECRET}@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact(f"amqp://guest:{SECRET}@mq//") == "amqp://guest:***@mq//"
    assert (
        redact(f"clickhouses://u:{SECRET}@ch:9440/db?password={SECRET}&x=1")
        == "clickhouses://u:***@ch:9440/db?password=***&x=1"
    )
    assert redact("redis://cache:6379/0 and http://host/path") == (
        "redis://cache:6379/0 and http://host/path"
    )


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        # An unencoded "@" in a password: clients split user info at the last one.
        ("redis://:p@ss@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:a@b@c@host:6379/0", "redis://user:***@host:6379/0"),
        ("amqp://guest:@@@host//", "amqp://guest:***@host//"),
        ("rediss://:x@y@h1:1/0,rediss://:z@h2:2/0", "rediss://:***@h2:2/0"),
    ],
)
def test_redact_masks_a_password_holding_unencoded_at_signs(url: str, masked: str) -> None:
    from urllib.parse import urlsplit

    assert urlsplit(url).hostname in ("host", "h1")  # what a client connects to
    assert redact(f"connecting to {url} now") == f"connecting to {masked} now"


def test_json_lines_carry_fields_and_no_secrets(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = json_log
    url = f"redis://user:{SECRET}@cache:6379/0"
    logger.info("connecting to %s", url)
    logger.warning(f"inline {url}", extra={"target": url, "shard": 3, "rows": 12})
    try:
        raise ConnectionError(f"cannot reach {url}")
    except ConnectionError:
        logger.exception("failed")
    records = lines(stream)
    assert len(records) == 3
    for record in records:
        assert {"ts", "level", "logger", "message", "process"} <= record.keys()
        assert record["logger"] == logger.name
    assert records[0]["message"] == "connecting to redis://user:***@cache:6379/0"
    assert records[0]["level"] == "info"
    assert records[1]["target"] == "redis://user:***@cache:6379/0"
    assert (records[1]["shard"], records[1]["rows"]) == (3, 12)
    assert "ConnectionError: cannot reach redis://user:***@cache:6379/0" in records[2]["exc"]
    assert SECRET not in stream.getvalue()


def test_console_format_is_redacted_too() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("test.logs.console")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        configure_handlers(logger, "console")
        configure_handlers(logger, "console")  # idempotent
        logger.warning("broker at %s", f"amqp://guest:{SECRET}@mq:5672//")
    finally:
        logger.handlers.clear()
    assert stream.getvalue() == "WARNING broker at amqp://guest:***@mq:5672//\n"
    assert sum(isinstance(f, RedactSecrets) for f in handler.filters) == 1
    assert not isinstance(handler.formatter, JsonFormatter)


def test_the_flush_logs_one_structured_line_per_shard(
    redis: redis_lib.Redis, settings: Settings, sink: Any
) -> None:
    from tasks.flush import process_buffer

    buffer = EventBuffer(redis, settings)
    buffer.apply(
        [parse_event({"project_id": "p", "name": "x", "created_at": NOW + n}) for n in range(25)]
    )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactSecrets())
    flush_logger = logging.getLogger("worker.flusher")
    flush_logger.addHandler(handler)
    flush_logger.setLevel(logging.INFO)
    runtime.configure(settings)
    try:
        summary = process_buffer()
    finally:
        flush_logger.removeHandler(handler)
        runtime.reset()
    assert summary["rows"] == 25
    [line] = lines(stream)
    assert line["logger"] == "worker.flusher" and line["level"] == "info"
    assert (line["shard"], line["rows"], line["dead"], line["batches"], line["redriven"]) == (
        0,
        25,
        0,
        1,
        0,
    )
    for phase in ("claim_seconds", "insert_seconds", "ack_seconds", "seconds"):
        assert isinstance(line[phase], float) and line[phase] >= 0
    assert line["message"].startswith("flushed shard 0: 25 rows")


@pytest.mark.slow
def test_a_json_worker_logs_json_lines_without_the_redis_password(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    with redis_lib.Redis(port=server.port) as admin:
        admin.config_set("requirepass", SECRET)
    redis_url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
    chdb_url = f"chdb://{tmp_path / 'ch'}"
    sink = open_sink(chdb_url)
    sink.migrate()
    sink.close()
    env = project_env(REDIS_URL=redis_url, CLICKHOUSE_URL=chdb_url, EVENT_BUFFER_LOG_FORMAT="json")
    app = create_app(Settings.from_env(env))
    client = redis_lib.Redis.from_url(redis_url)
    # `celery --quiet`: no start-up banner (it is printed, not logged).
    args = ["--quiet", "worker", "--loglevel=INFO", "--without-mingle", "--without-gossip"]
    proc = CeleryProcess([*args, "-Q", "ingest,flush", "-P", "solo"], env, tmp_path / "w.log")
    proc.start()
    try:
        proc.wait_for("ready.")
        app.send_task(
            "eventbuffer.ingest_events",
            args=[[{"project_id": "p", "name": "x", "created_at": NOW}, {"name": "invalid"}]],
        )
        wait_until(lambda: client.llen("{eventbuffer:0}:queue") == 1, 20, "the event")
        app.send_task("eventbuffer.process_buffer").get(timeout=60)
        proc.wait_for("flushed shard 0")
    finally:
        proc.stop()
        app.close()
        client.close()
        server.stop()
    text = proc.text()
    assert SECRET not in text
    raw = text.splitlines()
    first = next(n for n, line in enumerate(raw) if line.startswith("{"))
    # Everything logged is JSON. Celery's direct prints are not log records: the
    # warning about running as root (before logging is set up) and the shutdown notice.
    records = []
    for line in raw[first:]:
        if not line.strip() or line.startswith("worker: Warm shutdown"):
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(
        r["message"] == f"Connected to eventbuffer-redis://:***@127.0.0.1:{server.port}/0"
        for r in records
    )
    [invalid] = [r for r in records if r["logger"] == "tasks.ingest"]
    assert invalid["level"] == "warning" and invalid["task_name"] == "eventbuffer.ingest_events"
    [flushed] = [r for r in records if r["logger"] == "worker.flusher"]
    assert (flushed["rows"], flushed["batches"], flushed["task_name"]) == (
        1,
        1,
        "eventbuffer.process_buffer",
    )
    # No per-event lines: one line per task received / done, one warning, one flush line.
    assert len(records) < 15
    received = [r for r in records if r["message"].endswith("received")]
    assert received and all("args" not in r and "data" not in r for r in received)


def test_one_line_is_an_errors_text_on_one_line_cut_and_without_passwords() -> None:
    error = ConnectionError("cannot reach\n  redis://app:hunter2@cache:6379/0\n\tafter 3 tries")
    assert one_line(error) == "cannot reach redis://app:***@cache:6379/0 after 3 tries"
    assert one_line("x" * 500, 10) == "x" * 9 + "…"
    assert one_line("x" * 10, 10) == "x" * 10
    assert one_line(TimeoutError()) == "TimeoutError"
    assert one_line("") == ""
