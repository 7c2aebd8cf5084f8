"""Redis with a password over TLS (`rediss://`): the buffer, the flusher and a real
Celery worker (broker and result backend) work through it; ClickHouse URLs with
user, password and TLS options are parsed."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis as redis_lib

from tests.support.celery_procs import project_env, worker
from tests.support.dates import now_ms
from tests.support.passwords import (
    PASSWORD,
    QUOTED,
    assert_no_secret,
    exception_texts,
)
from tests.support.polling import wait_until
from tests.support.tls_redis import (
    TlsRedis,
)
from worker.buffer import EventBuffer
from worker.celery import celery_config, create_app
from worker.events import as_row, parse_event
from worker.flusher import Flusher
from worker.ingestion import ingest
from worker.settings import Settings
from worker.sinks import open_sink
from worker.sinks.chdb import ChdbSink, path_from_url
from worker.sinks.native import NativeSink


def test_the_tls_redis_is_tls_only_and_checks_password_and_certificate(
    tls_redis: TlsRedis, tls_client: redis_lib.Redis
) -> None:
    assert tls_client.ping()
    assert tls_client.connection_pool.connection_class is redis_lib.SSLConnection
    plain = redis_lib.Redis(port=tls_redis.port, password=PASSWORD, socket_timeout=1)
    with pytest.raises(redis_lib.ConnectionError):
        plain.ping()
    plain.close()
    untrusted = redis_lib.Redis.from_url(tls_redis.url(ca=tls_redis.certs.other_ca))
    with pytest.raises(redis_lib.ConnectionError, match="certificate verify failed"):
        untrusted.ping()
    untrusted.close()
    wrong = redis_lib.Redis.from_url(tls_redis.url(password="Wr0ng-pw/guess"))
    with pytest.raises(redis_lib.AuthenticationError) as caught:
        wrong.ping()
    wrong.close()
    assert_no_secret(exception_texts(caught.value), PASSWORD, "Wr0ng-pw/guess")


def test_buffer_and_flush_over_tls_with_a_password(
    tls_redis: TlsRedis, tls_client: redis_lib.Redis, chdb_url: str
) -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": tls_redis.url(),
            "CLICKHOUSE_URL": chdb_url,
            "EVENT_BUFFER_REORDER_WINDOW_MS": "0",  # the views are applied at once
        }
    )
    sink = open_sink(settings.clickhouse_url)
    sink.migrate()
    buffer = EventBuffer(tls_client, settings)
    at = now_ms() - 10_000
    views = [
        parse_event(
            {
                "project_id": "p",
                "name": "screen_view",
                "session_id": "s1",
                "profile_id": "u1",
                "created_at": at + n * 1000,
            }
        )
        for n in range(3)
    ]
    result = ingest(buffer, [{"project_id": "p", "name": "click", "created_at": at}, {}], "b1")
    assert (result.accepted, result.invalid) == (1, 1)
    buffer.apply(views)
    assert buffer.get_buffer_size() == 3
    assert buffer.get_last_screen_view(session_id="s1") == as_row(views[-1])
    assert buffer.get_active_visitor_count("p") == 1
    try:
        [flushed] = Flusher(tls_client, settings, lambda: sink).process_buffer().shards
        assert flushed.rows == 3
        rows = sink.query("SELECT name, duration FROM events ORDER BY created_at, name")
    finally:
        sink.close()
    assert rows == [("click", 0), ("screen_view", 1000), ("screen_view", 1000)]
    assert buffer.get_buffer_size() == 0


@pytest.mark.slow
def test_a_celery_worker_over_tls_ingests_and_flushes(
    tls_redis: TlsRedis, tls_client: redis_lib.Redis, tmp_path: Path
) -> None:
    chdb = f"chdb://{tmp_path / 'ch'}"
    sink = open_sink(chdb)
    sink.migrate()
    sink.close()
    env = project_env(REDIS_URL=tls_redis.url(), CLICKHOUSE_URL=chdb)
    settings = Settings.from_env(env)
    app = create_app(settings)
    proc = worker(env, tmp_path / "worker.log", "-Q", "ingest,flush", "-P", "solo")
    try:
        proc.wait_for("ready.", timeout=60)
        at = now_ms()
        events = [{"project_id": "p", "name": f"e{n}", "created_at": at + n} for n in range(5)]
        app.send_task("eventbuffer.ingest_events", args=[events])
        buffer = EventBuffer(tls_client, settings)
        wait_until(lambda: buffer.get_buffer_size() == 5, 30, "the events", alive=proc.alive)
        # The result travels back through the TLS result backend.
        summary = app.send_task("eventbuffer.process_buffer").get(timeout=60)
        assert summary["rows"] == 5
    finally:
        proc.stop()
        app.close()
    sink = ChdbSink(path_from_url(chdb))
    try:
        assert sink.query("SELECT count() FROM events") == [(5,)]
    finally:
        sink.close()
    text = proc.text()
    assert "rediss://" in text  # the banner names the broker ...
    assert_no_secret(text)  # ... without its password


def test_rediss_without_verification_options_still_verifies(tls_redis: TlsRedis) -> None:
    # No ssl_cert_reqs in the URL: kombu alone would connect without checking the
    # certificate; the app asks for verification (against the system CAs).
    url = f"rediss://:{QUOTED}@127.0.0.1:{tls_redis.port}/0"
    settings = Settings.from_env({"REDIS_URL": url})
    config = celery_config(settings)
    assert config["broker_use_ssl"]["ssl_cert_reqs"].name == "CERT_REQUIRED"
    assert config["redis_backend_use_ssl"]["ssl_cert_reqs"].name == "CERT_REQUIRED"
    assert "broker_use_ssl" not in celery_config(Settings.from_env({"REDIS_URL": tls_redis.url()}))
    app = create_app(settings)
    try:
        app.backend  # noqa: B018 - Celery refuses a rediss:// backend without ssl_cert_reqs
        with app.connection_for_write() as conn:
            assert conn.ssl["ssl_cert_reqs"].name == "CERT_REQUIRED"
            with pytest.raises(Exception, match="certificate verify failed") as caught:
                conn.ensure_connection(max_retries=1, interval_start=0, timeout=5)
        assert_no_secret(exception_texts(caught.value))
    finally:
        app.close()


def test_clickhouses_url_is_parsed_with_credentials_and_tls_options() -> None:
    url = (
        f"clickhouses://analyst:{QUOTED}@ch.example.com:9440/analytics"
        "?ca_certs=%2Fetc%2Fssl%2Fch-ca.pem&verify=true&connect_timeout=3&compression=lz4"
    )
    settings = Settings.from_env({"CLICKHOUSE_URL": url, "EVENT_BUFFER_TABLE": "ev"})
    sink = open_sink(settings.clickhouse_url, settings.clickhouse_table)
    assert isinstance(sink, NativeSink)
    assert (sink.database, sink.table, sink._where) == ("analytics", "ev", "ch.example.com:9440")
    options = sink._options
    assert options["user"] == "analyst" and options["password"] == PASSWORD
    assert options["secure"] is True and options["verify"] is True
    assert options["ca_certs"] == "/etc/ssl/ch-ca.pem"
    assert (options["connect_timeout"], options["compression"]) == (3.0, "lz4")
    plain = NativeSink(f"clickhouse://analyst:{QUOTED}@ch.example.com/analytics")
    assert plain._options.get("secure", False) is False and plain._where == "ch.example.com:9000"
    assert NativeSink("clickhouses://h/db?verify=false")._options["verify"] is False
    assert_no_secret(repr(settings.clickhouse_url.split("@")[1]))
