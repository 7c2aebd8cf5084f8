"""`eventbuffer migrate` and `eventbuffer query` against real embedded ClickHouse
(chDB), and against a ClickHouse server that does not answer as one.

Quick commands run in-process through `main(argv)`; a failing start runs as a
`python -m worker.cli` subprocess.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib

from tests.conftest import Result
from tests.support.cli import (
    cli_env,
    event,
    run_cli,
)
from worker.buffer import EventBuffer
from worker.settings import Settings
from worker.sinks.chdb import path_from_url
from worker.sinks.schema import AUDIT_TABLE, MIGRATIONS_TABLE


def test_migrate_is_idempotent_and_query_prints_rows(run_main: Callable[..., Result]) -> None:
    first = run_main("migrate")
    assert (first.code, first.err) == (0, "")
    assert "created table `events`" in first.out
    again = run_main("migrate")
    assert again.code == 0
    assert "already exists" in again.out

    sql = "SELECT toUInt8(number) AS n, concat('v', toString(number)) AS s FROM numbers(3)"
    as_json = run_main("query", sql, "--format", "json")
    assert as_json.code == 0
    assert json.loads(as_json.out) == {
        "columns": ["n", "s"],
        "rows": [[0, "v0"], [1, "v1"], [2, "v2"]],
    }
    as_tsv = run_main("query", sql, "--format", "tsv")
    assert as_tsv.out.splitlines() == ["n\ts", "0\tv0", "1\tv1", "2\tv2"]
    as_table = run_main("query", "SHOW TABLES")
    assert as_table.code == 0
    # events, the migrations record and the tables migrations create (the forget audit)
    tables = ["events", MIGRATIONS_TABLE, AUDIT_TABLE]
    assert all(name in as_table.out for name in tables)
    assert f"{len(tables)} rows in" in as_table.out


def test_query_output_is_verbatim(run_main: Callable[..., Result]) -> None:
    assert run_main("migrate").code == 0
    sql = "SELECT '[/bold] :smile: [red]x' AS s, NULL AS n, 'a\tb' AS t"
    as_table = run_main("query", sql)
    assert as_table.code == 0
    assert "[/bold] :smile: [red]x" in as_table.out  # no rich markup or emoji codes
    assert run_main("query", sql, "--format", "tsv").out.splitlines()[1] == (
        "[/bold] :smile: [red]x\t\\N\ta\\tb"
    )


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE events",
        "INSERT INTO events (project_id, name, created_at) VALUES ('p', 'x', now())",
        "  /* a note */ -- and a comment\n  TRUNCATE TABLE events",
        "ALTER TABLE events DELETE WHERE 1",
        "SELECT 1; DROP TABLE events",
        "SELECT 1 INTO OUTFILE 'out.csv'",
        "SELECT 1 INTO/**/OUTFILE '/tmp/eventbuffer-test-outfile'",
        "SELECT 1 INTO -- a comment\n OUTFILE '/tmp/eventbuffer-test-outfile'",
        "-- only a comment",
        # readonly = 1 lets DESCRIBE over it read the file: refused before it runs.
        "SELECT * FROM file('/etc/hostname', 'LineAsString')",
        "DESCRIBE file('/etc/hostname', 'LineAsString')",
    ],
)
def test_query_refuses_writes_without_write(run_main: Callable[..., Result], sql: str) -> None:
    assert run_main("migrate").code == 0
    refused = run_main("query", sql)
    assert refused.code == 2
    assert len(refused.err.strip().splitlines()) == 1
    if sql == "-- only a comment":  # nothing to run: a parse error, --write would not help
        assert "ClickHouse cannot parse the query" in refused.err
    else:
        assert "--write" in refused.err
    assert run_main("query", "EXISTS TABLE events", "--format", "tsv").out.splitlines()[1] == "1"
    assert not Path("/tmp/eventbuffer-test-outfile").exists()


@pytest.mark.parametrize(
    "sql",
    [
        # Starting with a reading keyword, still writing: the engine refuses them (its
        # parser, for the INSERT; readonly = 1, for the settings).
        "SELECT * FROM events SETTINGS readonly = 0",
        "WITH 1 AS x INSERT INTO events (project_id, name, created_at) VALUES ('p', 'x', now())",
        "EXPLAIN SELECT 1 SETTINGS readonly = 0",
    ],
)
def test_read_only_is_enforced_by_the_engine(run_main: Callable[..., Result], sql: str) -> None:
    assert run_main("migrate").code == 0
    refused = run_main("query", sql)
    assert refused.code in (1, 2), refused.out
    assert "readonly" in refused.err.lower() or "read-only" in refused.err.lower(), refused.err
    assert len(refused.err.strip().splitlines()) == 1
    # A write in the same process afterwards still works (readonly stayed in its session).
    insert = "INSERT INTO events (project_id, name, created_at) VALUES ('p', 'x', now())"
    assert run_main("query", insert, "--write").code == 0
    assert run_main("query", "SELECT count() FROM events", "--format", "tsv").out == "count()\n1\n"


def test_read_only_commands_create_no_data_directory(
    run_main: Callable[..., Result],
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("CLICKHOUSE_URL", "chdb://data/clickhouse")
    for argv in (["query", "SELECT count() FROM events"], ["flush"]):
        EventBuffer(redis_lib.Redis.from_url(settings.redis_url), settings).add(
            event("x", int(time.time() * 1000))
        )
        result = run_main(*argv)
        assert result.code == 1, result.out
        [line] = result.err.strip().splitlines()
        assert f"no embedded ClickHouse at {elsewhere / 'data' / 'clickhouse'}" in line
        assert f"relative to the current directory {elsewhere}" in line
    assert list(elsewhere.iterdir()) == []


def test_a_missing_table_says_how_to_create_it(run_main: Callable[..., Result]) -> None:
    scratch = "CREATE TABLE scratch (x UInt8) ENGINE = MergeTree ORDER BY x"
    assert run_main("query", scratch, "--write").code == 0  # data, but no events table
    result = run_main("query", "SELECT count() FROM events")
    assert result.code == 1
    [line] = result.err.strip().splitlines()
    assert "create it with `eventbuffer migrate`" in line


@pytest.mark.parametrize(
    "sql",
    [
        "-- the count\nSELECT 1;",
        "/* c */ (SELECT 1) UNION ALL (SELECT 2)",
        "WITH 1 AS x SELECT x",
        "select ';DROP TABLE events' AS s",
        "DESC events",
        "EXPLAIN SELECT 1",
    ],
)
def test_query_allows_reads(run_main: Callable[..., Result], sql: str) -> None:
    assert run_main("migrate").code == 0
    result = run_main("query", sql, "--format", "tsv")
    assert (result.code, result.err) == (0, "")


def test_query_write_runs_changes(run_main: Callable[..., Result]) -> None:
    assert run_main("migrate").code == 0  # ClickHouse checks the statement: it must be there
    create = "CREATE TABLE scratch (x UInt8) ENGINE = MergeTree ORDER BY x"
    assert run_main("query", create).code == 2
    assert run_main("query", create, "--write").code == 0
    assert run_main("query", "INSERT INTO scratch VALUES (7)", "--write").code == 0
    assert run_main("query", "SELECT x FROM scratch", "--format", "tsv").out == "x\n7\n"


def test_busy_embedded_clickhouse_is_waited_for_then_reported(
    run_main: Callable[..., Result], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_main("migrate").code == 0
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom chdb import session\n"
            "s = session.Session(sys.argv[1]); print('open', flush=True)\n"
            "time.sleep(float(sys.argv[2])); s.close()",
            path_from_url(settings.clickhouse_url),
            "2.5",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        monkeypatch.setattr("worker.cli.common.BUSY_WAIT_S", 0.3)
        busy = run_main("query", "SELECT 1")
        assert busy.code == 1
        assert "in use by another process" in busy.err
        assert len(busy.err.strip().splitlines()) == 1  # chDB's own complaint is silenced
        monkeypatch.setattr("worker.cli.common.BUSY_WAIT_S", 15.0)
        waited = run_main("query", "SELECT 41 + 1", "--format", "tsv")
        assert (waited.code, waited.out.splitlines()[1]) == (0, "42")
    finally:
        holder.kill()
        holder.wait()


def test_query_against_a_port_that_never_answers_says_so_within_the_timeout(
    tmp_path: Path,
) -> None:
    """A ClickHouse URL whose port accepts and never answers (a wrong port, a hung server):
    the query stops after the timeout the settings give, and says what happened."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel accepts connections; nothing ever answers
        port = silent.getsockname()[1]
        env = cli_env(
            CLICKHOUSE_URL=f"clickhouse://127.0.0.1:{port}/default",
            EVENT_BUFFER_CLICKHOUSE_CONNECT_TIMEOUT_S="2",
            EVENT_BUFFER_CLICKHOUSE_INSERT_TIMEOUT_S="3",
            EVENT_BUFFER_FLUSH_STALL_S="60",
        )
        result = run_cli(["query", "SELECT 1"], env, tmp_path, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"no answer from 127.0.0.1:{port} within 3 s" in line
    assert "EVENT_BUFFER_CLICKHOUSE_INSERT_TIMEOUT_S" in line


def test_query_against_an_http_port_names_the_native_port(tmp_path: Path) -> None:
    """ClickHouse's HTTP port (8123) where the native one belongs: say so."""
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        env = cli_env(CLICKHOUSE_URL=f"clickhouse://127.0.0.1:{port}/default")
        result = run_cli(["query", "SELECT 1"], env, tmp_path, timeout=60)
    finally:
        server.shutdown()
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "HTTP port (8123)?" in line and "9000" in line


def test_query_mistakes_get_messages_about_the_mistake(run_main: Callable[..., Result]) -> None:
    assert run_main("migrate").code == 0
    typo = run_main("query", "SELEC 1")
    assert typo.code == 2
    assert "ClickHouse cannot parse the query" in typo.err and "--write" not in typo.err
    table = run_main("query", "SELECT count() FROM event")
    assert table.code == 1
    assert "Unknown table" in table.err and "eventbuffer migrate" not in table.err
    several = run_main("query", "SELECT 1; SELECT 2")
    assert several.code == 2 and "several statements" in several.err and "--write" in several.err
