"""Security: hostile values stay data, pickle is refused, TLS and passwords work, secrets hide.

- Event fields never reach a Redis key name unescaped, nor SQL text.
- A real Celery worker refuses a pickle-serialized task (nothing runs).
- Redis with a password over TLS (`rediss://`): the buffer, the flusher and a
  real Celery worker (broker and result backend) work through it.
- ClickHouse URLs with user, password and TLS options are parsed.
- No password shows in `status` output, CLI errors, exceptions or logs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis as redis_lib
from redis.crc import key_slot

from tests.conftest import Result
from tests.support.celery_procs import project_env, worker
from tests.support.clock import ManualClock
from tests.support.polling import wait_until
from tests.support.servers import free_port
from worker import cli, runtime
from worker.buffer import EventBuffer
from worker.celery import celery_config, create_app
from worker.deadletters import decode_dead_letter
from worker.events import as_row, encode_event, parse_event
from worker.flush import Flusher
from worker.ingest import ingest
from worker.logs import JsonFormatter, RedactSecrets
from worker.reorder import release_due
from worker.settings import Settings, SettingsError
from worker.sinks import SinkError, open_sink
from worker.sinks.chdb import ChdbSink, path_from_url
from worker.sinks.native import NativeSink

# Distinctive, and with characters a URL must percent-encode.
PASSWORD = "Zx9-s3cr3t/p@ss:w0rd"
QUOTED = quote(PASSWORD, safe="")


def now_ms() -> int:
    return int(time.time() * 1000)


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets or (PASSWORD,):
        for form in {secret, quote(secret, safe=""), quote(secret)}:
            assert form not in text, f"a password shows in: {text[:2000]}"


def exception_texts(exc: BaseException) -> str:
    """str and repr of an exception and of everything it was raised from."""
    texts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current), *map(str, current.args)]
        current = current.__cause__ or current.__context__
    return "\n".join(texts)


# -- hostile values are data ----------------------------------------------------------

HOSTILE = [
    "{",
    "}",
    "{eventbuffer:0}",
    "}{eventbuffer:1}{",
    "a:b:c",
    "*",
    "?",
    "[a-z]",
    "[",
    "\\",
    "with space",
    "new\nline",
    "tab\tcr\r",
    "%",
    "%7B",  # must not meet "{" once percent-encoded
    "ünïcødé ✓ 😀",
    "'; DROP TABLE events; --",
    "{x:String}",
    "..",
]


@pytest.fixture
def sharded(redis_url: str, chdb_url: str) -> Settings:
    return Settings.from_env(
        {"REDIS_URL": redis_url, "CLICKHOUSE_URL": chdb_url, "EVENT_BUFFER_SHARDS": "3"}
    )


def test_hostile_ids_never_change_a_key_name(
    redis: redis_lib.Redis, sharded: Settings, sink: ChdbSink
) -> None:
    clock = ManualClock(now_ms())
    buffer = EventBuffer(redis, sharded, clock)
    at = now_ms() - 60_000
    views, others = {}, []
    for n, text in enumerate(HOSTILE):
        view = parse_event(
            {
                "project_id": f"proj{text}",
                "name": "screen_view",
                "session_id": text,
                "profile_id": text,
                "created_at": at + n,
                "path": text,
                "properties": {text: text, "nested": {text: [text]}},
            }
        )
        views[text] = view
        others.append(
            parse_event(
                {"project_id": f"proj{text}", "name": text, "profile_id": text, "created_at": at}
            )
        )
    buffer.apply(list(views.values()) + others)
    clock.advance(sharded.reorder_window_ms)  # the views were held by the reorder window
    for shard in buffer.shards():
        release_due(buffer.scripts, shard, sharded, clock)

    # Every key sits in its shard's hash slot, under the deployment's prefix.
    tags = {f"{{eventbuffer:{n}}}" for n in range(3)}
    keys = [key.decode() for key in redis.scan_iter(count=1000)]
    assert keys
    for key in keys:
        tag = key[: key.index("}") + 1]
        assert tag in tags, key
        assert key_slot(key.encode()) == key_slot(tag.encode()), key
    # Distinct ids, distinct keys: "%7B" and "{" do not collide, and every id reads back.
    for text, view in views.items():
        assert buffer.get_last_screen_view(session_id=text) == as_row(view)
        assert buffer.get_last_screen_view(project_id=f"proj{text}", profile_id=text) == as_row(
            view
        )
        assert buffer.get_active_visitor_count(f"proj{text}") == 1
    assert buffer.active_projects() == sorted(f"proj{text}" for text in HOSTILE)

    # session_end queues every view; the flush writes the rows intact.
    buffer.apply(
        [
            parse_event(
                {"project_id": f"proj{t}", "name": "session_end", "session_id": t, "created_at": at}
            )
            for t in HOSTILE
        ]
    )
    clock.advance(sharded.reorder_window_ms)
    flusher = Flusher(redis, sharded, lambda: sink, clock)  # releases the ends, then flushes
    assert sum(result.rows for result in flusher.process_buffer().shards) == 3 * len(HOSTILE)
    for text, view in views.items():
        [row] = sink.query(
            "SELECT session_id, profile_id, project_id, path, properties FROM events "
            "WHERE toString(id) = {id:String}",
            {"id": view.id},
        )
        assert row == (
            text,
            text,
            f"proj{text}",
            text,
            {text: text, f"nested.{text}.0": text},
        )


SQL_HOSTILE = [
    "'; DROP TABLE events; --",
    '"; DROP TABLE events; --',
    "{x:String}",
    "{id:UUID}",
    "\\'); SELECT 1; --",
    "`events`",
    "$$ FORMAT CSV $$",
    "0x00 \x00 nul",
]


def test_sql_looking_values_land_verbatim_and_the_table_survives(
    redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    buffer = EventBuffer(redis, settings)
    at = now_ms()
    events = [
        parse_event(
            {
                "project_id": text,
                "name": text,
                "path": text,
                "referrer": text,
                "created_at": at,
                "properties": {text: text},
            }
        )
        for text in SQL_HOSTILE
    ]
    buffer.apply(events)
    [result] = Flusher(redis, settings, lambda: sink).process_buffer().shards
    assert (result.rows, result.dead) == (len(SQL_HOSTILE), 0)
    assert sink.query("SELECT count() FROM events") == [(len(SQL_HOSTILE),)]
    for text in SQL_HOSTILE:
        # Server-side parameters: the value is never part of the SQL text.
        rows = sink.query(
            "SELECT name, path, referrer, project_id, properties FROM events "
            "WHERE name = {value:String}",
            {"value": text},
        )
        assert rows == [(text, text, text, text, {text: text})]


# -- pickle is refused by a real worker -----------------------------------------------


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


# -- Redis with a password, over TLS --------------------------------------------------


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the server's certificate


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if not shutil.which("openssl"):
        pytest.skip("no openssl command to make a throwaway CA and server certificate")
    d = tmp_path_factory.mktemp("tls")
    for ca in ("ca", "other-ca"):
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN=eventbuffer test {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
            cwd=d,
        )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr", cwd=d,
    )  # fmt: skip
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.pem", cwd=d,
    )  # fmt: skip
    return Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "other-ca.pem")


@dataclass
class TlsRedis:
    port: int
    certs: Certs

    def url(self, password: str = PASSWORD, ca: Path | None = None, db: int = 0) -> str:
        ca_file = quote(str(ca or self.certs.ca), safe="")
        return (
            f"rediss://:{quote(password, safe='')}@127.0.0.1:{self.port}/{db}"
            f"?ssl_cert_reqs=required&ssl_ca_certs={ca_file}"
        )

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(self.url())


@pytest.fixture(scope="module")
def tls_redis(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    binary = shutil.which("redis-server")
    if not binary:
        pytest.skip("no redis-server binary to run a TLS Redis")
    port = free_port()
    directory = tmp_path_factory.mktemp("tls-redis")
    log = directory / "redis.log"
    process = subprocess.Popen(
        [
            binary,
            "--port", "0",  # TLS only: no plain-text port at all
            "--tls-port", str(port),
            "--tls-cert-file", str(certs.cert),
            "--tls-key-file", str(certs.key),
            "--tls-ca-cert-file", str(certs.ca),
            "--tls-auth-clients", "no",
            "--requirepass", PASSWORD,
            "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    server = TlsRedis(port, certs)
    client = server.client()
    deadline = time.monotonic() + 10
    try:
        while True:
            if process.poll() is not None:
                reason = (process.stderr.read() if process.stderr else b"").decode(errors="replace")
                reason += log.read_text(errors="replace") if log.exists() else ""
                pytest.skip(f"this redis-server cannot serve TLS: {reason.strip()[-300:]}")
            try:
                client.ping()
                break
            except redis_lib.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield server
    finally:
        client.close()
        process.terminate()
        process.wait(10)


@pytest.fixture
def tls_client(tls_redis: TlsRedis) -> Iterator[redis_lib.Redis]:
    client = tls_redis.client()
    client.flushall()
    yield client
    client.close()


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


# -- ClickHouse URLs: user, password, TLS ---------------------------------------------


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


# -- no password in status, CLI errors, exceptions or logs ---------------------------


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
