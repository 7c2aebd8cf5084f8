"""NativeSink against real ClickHouse servers (no mocks).

The local Debian clickhouse-server (18.16) predates DateTime64, Map and
insert_deduplication_token: it checks connection handling, error mapping and
columnar writes into a table of the types it has. The full `events` schema
and deduplication need a modern server: CLICKHOUSE_TEST_URL, else ClickHouse
26.x from the chDB package serving the native protocol (tests/support/chdb_server.py),
else Docker.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from tests.support.dates import DAY, NEXT_DAY
from tests.support.native_server import (
    chdb_serves,
    free_port,
    local_server,
    modern_server,
    server_binary,
)
from worker.events import encode_event, parse_event
from worker.sinks.base import (
    PermanentSinkError,
    RetryableSinkError,
    RowRejectedError,
    SinkError,
)
from worker.sinks.native import NativeSink
from worker.sinks.schema import COLUMNS

MODERN_SKIP = (
    "needs ClickHouse >= 22.2 (DateTime64, Map, insert_deduplication_token): "
    "no chDB server here ({why}); set CLICKHOUSE_TEST_URL or run Docker"
)

# Only types 18.16 has. latitude is not Nullable and duration is narrower
# than the real schema, to exercise null defaults and range errors.
COMPAT_TABLE = """
CREATE TABLE events_compat (
    id UUID,
    name String,
    project_id String,
    profile_id String,
    session_id String,
    path String,
    country FixedString(2),
    created_at DateTime,
    imported_at Nullable(DateTime),
    longitude Nullable(Float32),
    latitude Float32,
    duration UInt32,
    created_date Date MATERIALIZED toDate(created_at),
    extra String DEFAULT 'x'
) ENGINE = MergeTree ORDER BY (project_id, created_at, id)
"""

# The server evaluates session_number on insert: a non-numeric session fails.
STRICT_TABLE = """
CREATE TABLE events_strict (
    id UUID,
    name String,
    project_id String,
    session_id String,
    created_at DateTime,
    session_number UInt32 MATERIALIZED toUInt32(concat('0', session_id))
) ENGINE = MergeTree ORDER BY id
"""

# properties is a Map in the real schema; a String column cannot take it.
MISTYPED_TABLE = """
CREATE TABLE events_mistyped (
    id UUID, name String, project_id String, created_at DateTime, properties String
) ENGINE = MergeTree ORDER BY id
"""


def event_row(project: str, **fields: Any) -> bytes:
    """A stored row exactly as the buffer holds it."""
    data: dict[str, Any] = {
        "name": "page_view",
        "project_id": project,
        "created_at": f"{DAY}T12:00:00.250Z",
    }
    data.update(fields)
    return encode_event(parse_event(data))


def epoch_seconds(created_at: str) -> int:
    return int(datetime.fromisoformat(created_at).replace(tzinfo=UTC).timestamp())


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


# --- ClickHouse 18.16 -------------------------------------------------------


@pytest.fixture(scope="module")
def old_url() -> Iterator[str]:
    if server_binary() is None:
        pytest.skip("clickhouse-server (Debian package) is not installed")
    with local_server() as url:
        admin = NativeSink(url, require_dedup=False)
        for ddl in (COMPAT_TABLE, STRICT_TABLE, MISTYPED_TABLE):
            admin.query(ddl)
        admin.close()
        yield url


@pytest.fixture
def compat(old_url: str) -> Iterator[NativeSink]:
    sink = NativeSink(old_url, table="events_compat", require_dedup=False)
    yield sink
    sink.close()


def test_connects_to_old_server(old_url: str) -> None:
    sink = NativeSink(old_url)
    try:
        [(version,)] = sink.query("SELECT version()")
    finally:
        sink.close()
    assert version.startswith("18.16.")


def test_query_binds_params_client_side(old_url: str) -> None:
    sink = NativeSink(old_url)
    try:
        rows = sink.query("SELECT %(text)s, %(number)s", {"text": "it's; DROP", "number": 7})
    finally:
        sink.close()
    assert rows == [("it's; DROP", 7)]


def test_a_read_only_query_cannot_write_on_the_server(old_url: str, compat: NativeSink) -> None:
    compat.write([event_row("p-readonly")], "t-readonly")
    before = compat.query("SELECT count() FROM events_compat")
    for sql in (
        "INSERT INTO events_compat (project_id, name) VALUES ('p', 'x')",
        "SELECT 1 SETTINGS readonly = 0",
        "DROP TABLE events_compat",
    ):
        with pytest.raises(PermanentSinkError) as refused:
            compat.query(sql, readonly=True)
        assert refused.value.code == 164, sql  # READONLY
    assert compat.query("SELECT count() FROM events_compat", readonly=True) == before
    # The same connection writes again afterwards: readonly was that query's own.
    compat.write([event_row("p-readonly-2")], "t-readonly-2")
    assert compat.query("SELECT count() FROM events_compat")[0][0] == before[0][0] + 1


def test_migrate_modern_schema_fails_on_old_server(old_url: str) -> None:
    sink = NativeSink(old_url, table="events_modern")
    try:
        with pytest.raises(PermanentSinkError) as caught:
            sink.migrate()
        # Neither a row problem nor worth retrying: the server lacks the types.
        assert type(caught.value) is PermanentSinkError
        assert sink.query("EXISTS TABLE default.events_modern") == [(0,)]
    finally:
        sink.close()


def test_compat_write_round_trip(compat: NativeSink) -> None:
    rows = [
        event_row("p-round", name="a", profile_id="u1", country="DE", longitude=13.5),
        event_row(
            "p-round",
            name="screen_view",
            session_id="s1",
            path="/home",
            created_at=f"{DAY}T12:00:01.999Z",
            imported_at=f"{NEXT_DAY}T08:30:00Z",
            latitude=52.25,
            duration=1500,
        ),
        event_row("p-round", name="ünïcode", country="ÜÖ"[:1], properties={"k": "v"}),
    ]
    compat.write(rows, "token-round")

    got = compat.query(
        "SELECT toString(id), name, profile_id, session_id, path, country,"
        " toUnixTimestamp(created_at), imported_at IS NULL, longitude, latitude, duration, extra"
        " FROM events_compat WHERE project_id = %(p)s ORDER BY created_at, name",
        {"p": "p-round"},
    )
    events = [parse_event(row) for row in rows]
    expected = [
        (
            e.id,
            e.name,
            e.profile_id,
            e.session_id,
            e.path,
            e.country,
            epoch_seconds(str(e.created_at)),
            int(e.imported_at is None),
            e.longitude,
            e.latitude or 0.0,  # null into a non-Nullable column: its default
            e.duration,
            "x",  # not an event field: the table's DEFAULT
        )
        for e in sorted(events, key=lambda e: (str(e.created_at), e.name))
    ]
    assert got == expected


def test_without_dedup_a_redriven_batch_duplicates(compat: NativeSink) -> None:
    rows = [event_row("p-dup", name=f"e{i}") for i in range(3)]
    compat.write(rows, "same-token")
    compat.write(rows, "same-token")
    assert compat.query("SELECT count() FROM events_compat WHERE project_id = 'p-dup'") == [(6,)]


def test_old_server_refused_when_dedup_required(old_url: str) -> None:
    sink = NativeSink(old_url, table="events_compat")
    try:
        with pytest.raises(PermanentSinkError) as caught:
            sink.write([event_row("p-refused")], "token")
        assert type(caught.value) is PermanentSinkError
        message = str(caught.value)
        assert "ClickHouse 18.16" in message
        assert "insert_deduplication_token" in message
        assert "22.2" in message
        rows = sink.query("SELECT count() FROM events_compat WHERE project_id = 'p-refused'")
        assert rows == [(0,)]
    finally:
        sink.close()


@pytest.mark.parametrize(
    ("table", "fields"),
    [
        # 'ÜÖ' is two characters but four bytes: parse_event refuses it, a row
        # stored before that check is refused by the sink (built by hand below).
        ("events_compat", {"country": "ÜÖ"}),
        ("events_compat", {"duration": 2**40}),  # beyond UInt32
        ("events_strict", {"session_id": "s-1"}),  # rejected by the server
    ],
    ids=["fixedstring-too-long", "uint32-overflow", "server-side-parse"],
)
def test_rejected_row(old_url: str, table: str, fields: dict[str, Any]) -> None:
    sink = NativeSink(old_url, table=table, require_dedup=False)
    try:
        project = f"p-reject-{uuid.uuid4().hex[:8]}"
        if "country" in fields:
            country = f'"country":"{fields["country"]}"'.encode()
            bad = event_row(project, country="SE").replace(b'"country":"SE"', country)
        else:
            bad = event_row(project, **fields)
        with pytest.raises(RowRejectedError):
            sink.write([event_row(project), bad], "t")
        # The block is all or nothing, and the sink is usable again afterwards.
        count = f"SELECT count() FROM {table} WHERE project_id = %(p)s"
        assert sink.query(count, {"p": project}) == [(0,)]
        sink.write([event_row(project)], "t2")
        assert sink.query(count, {"p": project}) == [(1,)]
    finally:
        sink.close()


def test_undecodable_row_rejected(compat: NativeSink) -> None:
    with pytest.raises(RowRejectedError):
        compat.write([event_row("p-bad"), b'{"name": "x", "project_id": '], "t")
    with pytest.raises(RowRejectedError):
        compat.write([b'{"name": "x", "project_id": "p", "created_at": "yesterday"}'], "t")


def test_column_type_that_cannot_hold_the_field(old_url: str) -> None:
    sink = NativeSink(old_url, table="events_mistyped", require_dedup=False)
    try:
        with pytest.raises(PermanentSinkError, match="properties") as caught:
            sink.write([event_row("p-mistyped", properties={"a": "b"})], "t")
        assert type(caught.value) is PermanentSinkError
    finally:
        sink.close()


def test_missing_table_is_permanent(old_url: str) -> None:
    sink = NativeSink(old_url, table="no_such_table", require_dedup=False)
    try:
        with pytest.raises(PermanentSinkError) as caught:
            sink.write([event_row("p")], "t")
        assert type(caught.value) is PermanentSinkError
        assert "no_such_table" in str(caught.value)
        assert "Stack trace" not in str(caught.value)
    finally:
        sink.close()


def test_unreachable_port_is_retryable() -> None:
    sink = NativeSink(f"clickhouse://default@127.0.0.1:{free_port()}/default")
    with pytest.raises(RetryableSinkError):
        sink.write([event_row("p")], "t")
    with pytest.raises(RetryableSinkError):
        sink.query("SELECT 1")
    sink.close()


def test_url_defaults() -> None:
    sink = NativeSink("clickhouse://example.invalid")
    assert (sink.database, sink.table) == ("default", "events")
    with pytest.raises(ValueError, match="clickhouse://"):
        NativeSink("http://example.invalid:8123/")


def test_tls_url_defaults_to_port_9440() -> None:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 9440)) == 0:
            pytest.skip("something listens on 127.0.0.1:9440")
    sink = NativeSink("clickhouses://app:pw@127.0.0.1/analytics?verify=false")
    assert sink.database == "analytics"
    with pytest.raises(RetryableSinkError, match=r"127\.0\.0\.1:9440"):
        sink.query("SELECT 1")
    sink.close()


def test_wrong_password_is_not_echoed(old_url: str) -> None:
    password = "Hunter2-s3cret@pass"
    port = urlsplit(old_url).port
    sink = NativeSink(f"clickhouse://default:{quote(password, safe='')}@127.0.0.1:{port}/default")
    with pytest.raises(PermanentSinkError) as caught:
        sink.query("SELECT 1")
    error = caught.value
    for text in (str(error), repr(error), str(error.__cause__)):
        assert password not in text
        assert quote(password, safe="") not in text
    assert "password" in str(error).lower()  # still says what went wrong
    sink.close()


def test_close_then_reuse(old_url: str) -> None:
    sink = NativeSink(old_url)
    assert sink.query("SELECT 1") == [(1,)]
    sink.close()
    assert sink.query("SELECT 2") == [(2,)]
    sink.close()
    sink.close()


# --- ClickHouse >= 22.2 -----------------------------------------------------


@pytest.fixture(scope="module")
def modern_url() -> Iterator[str]:
    with modern_server() as url:
        if url is None:
            pytest.skip(MODERN_SKIP.format(why=chdb_serves()))
        database = f"eventbuffer_test_{uuid.uuid4().hex[:12]}"
        yield with_database(url, database)
        admin = NativeSink(url)
        try:
            admin.query(f"DROP DATABASE IF EXISTS {database}")
        finally:
            admin.close()


@pytest.fixture(scope="module")
def modern(modern_url: str) -> Iterator[NativeSink]:
    sink = NativeSink(modern_url)
    sink.migrate()
    sink.migrate()  # idempotent
    yield sink
    sink.close()


def count(sink: NativeSink, project: str) -> int:
    [(n,)] = sink.query(
        f"SELECT count() FROM {sink.database}.{sink.table} WHERE project_id = %(p)s",
        {"p": project},
    )
    return int(n)


def test_modern_migrate_creates_full_schema(modern: NativeSink) -> None:
    described = modern.query(f"DESCRIBE TABLE {modern.database}.events")
    assert [(name, kind) for name, kind, *_ in described] == list(COLUMNS)


def test_modern_token_deduplicates(modern: NativeSink) -> None:
    rows = [event_row("p-token", name=f"e{i}") for i in range(5)]
    modern.write(rows, "chunk-1")
    modern.write(rows, "chunk-1")  # a re-driven flush
    assert count(modern, "p-token") == 5
    modern.write(rows, "chunk-2")  # same rows, new chunk: stored again
    assert count(modern, "p-token") == 10


def test_modern_round_trip(modern: NativeSink) -> None:
    row = event_row(
        "p-types",
        name="screen_view",
        session_id="s1",
        properties={"plan": "pro", "cart": {"items": 2}},
        country="DE",
        longitude=13.5,
        imported_at=f"{NEXT_DAY}T08:30:00Z",
        duration=1500,
    )
    event = parse_event(row)
    modern.write([row], "types-1")
    got = modern.query(
        "SELECT toString(id), name, properties, toString(created_at), created_at, country,"
        " longitude, latitude, imported_at, duration"
        f" FROM {modern.database}.events WHERE project_id = 'p-types'"
    )
    assert got == [
        (
            event.id,
            "screen_view",
            {"plan": "pro", "cart.items": "2"},
            f"{DAY} 12:00:00.250",
            datetime.fromisoformat(f"{DAY}T12:00:00.250+00:00"),
            "DE",
            13.5,
            None,
            datetime.fromisoformat(f"{NEXT_DAY}T08:30:00+00:00"),
            1500,
        )
    ]


def test_modern_rejected_row(modern: NativeSink) -> None:
    # A row stored before parse_event checked the country's bytes: 4 bytes
    # for a FixedString(2), refused by the server.
    bad = event_row("p-modern-reject", country="SE").replace(
        b'"country":"SE"', '"country":"ÜÖ"'.encode()
    )
    with pytest.raises(RowRejectedError):
        modern.write([bad], "reject-1")
    assert count(modern, "p-modern-reject") == 0


def test_modern_async_insert(modern_url: str, modern: NativeSink) -> None:
    sink = NativeSink(modern_url, table="events_async", async_insert=True)
    try:
        sink.migrate()
        sink.write([event_row("p-async", name=f"e{i}") for i in range(3)], "async-1")
        # wait_for_async_insert=1: the rows are there when write() returns.
        assert count(sink, "p-async") == 3
        sink.query("SYSTEM FLUSH LOGS")
        # query_log records only settings that differ from the server's
        # default, and from 26.2 async_insert is on by default.
        settings = sink.query(
            "SELECT if(Settings['async_insert'] != '', Settings['async_insert'],"
            " (SELECT default FROM system.settings WHERE name = 'async_insert'))"
            " FROM system.query_log"
            " WHERE type = 'QueryFinish' AND query_kind = 'Insert'"
            " AND current_database = %(db)s AND position(query, 'events_async') > 0"
            " AND position(query, 'eventbuffer_migrations') = 0",  # migrate's own record
            {"db": sink.database},
        )
        assert settings == [("1",)]
    finally:
        sink.close()


def test_modern_errors_are_typed(modern_url: str, modern: NativeSink) -> None:
    sink = NativeSink(modern_url, table="no_such_table")
    try:
        with pytest.raises(PermanentSinkError):
            sink.write([event_row("p")], "t")
        with pytest.raises(SinkError):
            sink.query("SELEKT 1")
    finally:
        sink.close()
