"""`eventbuffer query` without --write is read-only in the engine (issue #24, items 6 and 7).

Every bypass of the old regex guard, on embedded chDB and on a ClickHouse 26
server (chDB serving the native protocol): `INTO OUTFILE` hidden by a heredoc
or by each zero-width character ClickHouse's lexer skips, table functions
under DESCRIBE and in SELECT (`file` reads any file, `url`/`s3`/`remote`
connect anywhere), and several statements at once. A file the query names
must not appear and a TCP listener the query points at must see no
connection; each attack is first shown to work with --write (on chDB), so
the test would catch the guard failing. The Debian 18.16 server cannot
parse a query for the check: there every query without --write is refused.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Result
from tests.support.native_server import local_server, server_binary
from worker.cli.statement import Node, _code, check, tree

# Characters ClickHouse's lexer skips as whitespace, which Python's \s does not all match.
ZERO_WIDTH = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u180e"]


class Listener:
    """A TCP port that counts the connections made to it (and closes each at once)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture(params=["chdb", "server"])
def query(
    request: pytest.FixtureRequest,
    run_main: Callable[..., Result],
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Result]:
    """`eventbuffer query ARGS` against embedded chDB or a ClickHouse 26 server."""
    if request.param == "server":
        monkeypatch.setenv("CLICKHOUSE_URL", request.getfixturevalue("chdb_server_url"))
    assert run_main("migrate").code == 0

    def invoke(*argv: str) -> Result:
        return run_main("query", *argv)

    return invoke


def refused(result: Result, *words: str) -> None:
    assert result.code == 2, (result.out, result.err)
    [line] = result.err.strip().splitlines()
    assert "--write" in line
    for word in words:
        assert word in line, line
    assert result.out == ""


def outfile_attacks(target: Path) -> list[str]:
    heredoc = f"SELECT 'x' WHERE $$'$$ != '' INTO OUTFILE '{target}' APPEND FORMAT TSVRaw"
    hidden = [f"SELECT 'pwned' INTO{z}OUTFILE '{target}' FORMAT TSVRaw" for z in ZERO_WIDTH]
    others = [
        f"SHOW TABLES INTO OUTFILE '{target}'",
        f"DESCRIBE TABLE events INTO OUTFILE '{target}'",
        f"EXISTS TABLE events INTO OUTFILE '{target}'",
        f"SHOW CREATE TABLE events INTO OUTFILE '{target}'",
        f"EXPLAIN SELECT 1 INTO OUTFILE '{target}'",
    ]
    return [heredoc, *hidden, f"SELECT 1 INTO OUTFILE '{target}'", *others]


def test_into_outfile_is_refused_however_it_is_hidden(
    query: Callable[..., Result], tmp_path: Path
) -> None:
    target = tmp_path / "authorized_keys"
    for sql in outfile_attacks(target):
        refused(query(sql), "INTO OUTFILE")
        assert not target.exists(), sql


def test_the_hidden_outfiles_do_write_with_write(
    run_main: Callable[..., Result], tmp_path: Path
) -> None:
    # The control: in chDB these statements write the file readonly = 1 lets through.
    assert run_main("migrate").code == 0
    for i, sql in enumerate(outfile_attacks(tmp_path / "out")):
        target = tmp_path / f"out{i}"
        result = run_main("query", sql.replace(str(tmp_path / "out"), str(target)), "--write")
        assert result.code == 0, result.err
        assert target.exists(), sql


@pytest.mark.parametrize(
    "sql",
    [
        "DESCRIBE file('/etc/passwd', 'TSVWithNames')",
        "DESC TABLE file('/etc/pass*', 'TSVWithNames')",
        "SELECT * FROM file('/etc/passwd', 'LineAsString')",
        "SELECT file('/etc/passwd')",
        "SELECT 1 IN file('/etc/passwd', 'LineAsString')",
        "SELECT * FROM view(SELECT * FROM file('/etc/passwd', 'LineAsString'))",
        "EXPLAIN SELECT * FROM FILE('/etc/passwd', 'LineAsString')",
        "WITH t AS (SELECT * FROM file('/etc/passwd', 'LineAsString')) SELECT * FROM t",
    ],
)
def test_file_reading_functions_are_refused(query: Callable[..., Result], sql: str) -> None:
    result = query(sql)
    refused(result, "file(" if "FILE" not in sql else "FILE(")
    assert "root" not in result.err


def connecting_attacks(port: int) -> list[str]:
    return [
        f"DESCRIBE url('http://127.0.0.1:{port}/x.csv', 'CSV')",
        f"DESCRIBE s3('http://127.0.0.1:{port}/bucket/x.csv', 'CSV')",
        f"DESCRIBE remote('127.0.0.1:{port}', system.one)",
        f"SELECT * FROM url('http://127.0.0.1:{port}/x.csv', 'CSV', 'a String')",
        f"SELECT * FROM remoteSecure('127.0.0.1:{port}', system.one)",
        f"SELECT 1 FROM system.one JOIN url('http://127.0.0.1:{port}/', 'CSV', 'a String') ON 1",
        f"EXPLAIN ESTIMATE SELECT * FROM s3('http://127.0.0.1:{port}/b/k.csv', 'CSV', 'a String')",
    ]


def test_functions_that_connect_elsewhere_are_refused_without_connecting(
    query: Callable[..., Result], listener: Listener
) -> None:
    for sql in connecting_attacks(listener.port):
        refused(query(sql), "refusing")
    assert listener.connections == 0


def test_describe_url_does_connect_with_write(
    run_main: Callable[..., Result], listener: Listener
) -> None:
    # The control: the listener sees a DESCRIBE url() that is let through.
    assert run_main("migrate").code == 0
    run_main("query", connecting_attacks(listener.port)[0], "--write")
    assert listener.connections >= 1


@pytest.mark.parametrize(
    ("sql", "word"),
    [
        ("SELECT 1; DROP TABLE events", "one statement"),
        ("SELECT 1;\u200bDROP TABLE events", "one statement"),
        ("DROP TABLE events", "DROP"),
        ("WITH 1 AS x INSERT INTO events (project_id, name) VALUES ('p', 'x')", "INSERT"),
        ("TRUNCATE TABLE events", "TRUNCATE"),
        ("EXPLAIN INSERT INTO events (project_id) VALUES ('p')", "INSERT"),
        ("SELECT 1 AS `a\n Function numbers`", "quoted name"),
    ],
)
def test_statements_that_change_data_are_refused(
    query: Callable[..., Result], sql: str, word: str
) -> None:
    refused(query(sql), word)
    assert query("EXISTS TABLE events", "--format", "tsv").out.splitlines()[1] == "1"


def test_a_query_with_nothing_to_run_is_refused_as_unparsable(
    query: Callable[..., Result],
) -> None:
    result = query("-- only a comment")
    assert result.code == 2 and result.out == ""
    [line] = result.err.strip().splitlines()
    assert "ClickHouse cannot parse the query" in line  # --write would not help


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count() FROM events",
        "-- the count\nSELECT count() FROM events;",
        "SHOW TABLES",
        "SHOW DATABASES",
        "SHOW CREATE TABLE events",
        "DESCRIBE TABLE events",
        "DESC events",
        "DESCRIBE (SELECT 1 AS x)",
        "EXISTS TABLE events",
        "EXPLAIN SELECT count() FROM events",
        "WITH 1 AS x SELECT x",
        "SELECT number FROM numbers(3)",
        "SELECT * FROM values('x UInt8', 1, 2)",
        "SELECT ';DROP TABLE events', $$INTO OUTFILE 'x'$$, format('{}', 'file()') AS s",
        "/* c */ (SELECT 1) UNION ALL (SELECT 2)",
        "SELECT 1 AS `a b`",
    ],
)
def test_reads_still_run(query: Callable[..., Result], sql: str) -> None:
    result = query(sql, "--format", "json")
    assert (result.code, result.err) == (0, "")


def test_a_setting_the_query_sets_is_refused_by_the_engine(query: Callable[..., Result]) -> None:
    result = query("SELECT count() FROM events SETTINGS readonly = 0")
    assert result.code in (1, 2)
    assert "readonly" in result.err.lower()


def test_an_old_server_that_cannot_parse_refuses_every_query(
    run_main: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    if server_binary() is None:
        pytest.skip("clickhouse-server (Debian package) is not installed")
    with local_server() as url:
        monkeypatch.setenv("CLICKHOUSE_URL", url)
        refused(run_main("query", "SELECT 1"), "formatQuerySingleLine")
        refused(run_main("query", "DESCRIBE url('http://127.0.0.1:1/', 'CSV')"), "cannot check")
        written = run_main("query", "SELECT 1 AS x", "--write", "--format", "tsv")
        assert written.out == "x\n1\n"


def node(line: str, *children: Node) -> Node:
    kind, _, text = line.partition(" ")
    return Node(kind, text, len(children), list(children))


def test_a_tree_that_does_not_add_up_is_refused() -> None:
    # What a name holding newlines would forge, were such names let through.
    good = ["SelectWithUnionQuery (children 1)", " ExpressionList"]
    assert tree(good).children[0].kind == "ExpressionList"
    for lines in (
        ["SelectWithUnionQuery (children 2)", " ExpressionList"],
        ["SelectWithUnionQuery (children 1)", " ExpressionList", " Literal '/x'"],
        ["SelectWithUnionQuery (children 1)", "   ExpressionList"],
        ["SelectWithUnionQuery", "ShowTables"],
        [],
    ):
        with pytest.raises(Exception, match="does not read back"):
            tree(lines)
    with pytest.raises(Exception, match="INTO OUTFILE"):
        check(node("SelectWithUnionQuery", node("ExpressionList"), node("Literal '/x'")), set())


def test_the_rendering_is_read_without_its_quoted_parts() -> None:
    code, escaped = _code("SELECT 'INTO OUTFILE \\'x\\'' AS `a b`, \"c\" INTO OUTFILE 'y'")
    assert code.split() == ["SELECT", "AS", ",", "INTO", "OUTFILE"]
    assert not escaped
    assert _code("SELECT 1 AS `a\\nb`")[1]
    assert _code('SELECT 1 AS "a\\"b"')[1]
