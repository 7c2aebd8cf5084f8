"""Embedded ClickHouse through chDB: the default backend, nothing to run.

A chDB data directory can be open in only one process at a time, so the
directory is opened on first use and closed by `close()` (the flusher closes
it at the end of every run; the CLI after every query). Another process
holding it shows up as `RetryableSinkError`: the flush is retried later.

Within one process, every `ChdbSink` on the same path shares one chDB
session (chDB allows one per process), guarded by a lock.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from worker.errors import SettingsError
from worker.sinks import migrations
from worker.sinks.base import (
    INTERRUPTS,
    PermanentSinkError,
    RetryableSinkError,
    RowRejectedError,
    classify,
)
from worker.sinks.migrations import Report
from worker.sinks.schema import COLUMNS, identifier

_TOKEN = re.compile(r"^[A-Za-z0-9:._-]{1,200}$")
# ClickHouse parses JSON in parallel only in segments of at least 10 MiB
# (`min_chunk_bytes_for_parallel_parsing`); below it the parallel parser's
# threads are pure overhead for a small insert (see the README's flush
# benchmark). A chunk of a few segments gains nothing either while the flush's
# own threads (the read-ahead, the next chunk's file) share the cores: a flush
# of 100,000 rows in chunks of 20,000 (~13 MB each) took 1.02-1.03 s without
# it against 1.13-1.18 s with it (medians of 8 and 10 alternated runs, 2 cores).
_PARALLEL_PARSING_MIN_BYTES = 32 * 1024 * 1024
_PARAM_ESCAPES = str.maketrans(
    {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0", "\b": "\\b", "\f": "\\f"}
)


def _chunk_dir() -> str:
    """Where chunks are written for `FROM INFILE`: memory-backed /dev/shm where there is
    one, else the system's temporary directory."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return tempfile.gettempdir()


_CHUNK_PREFIX = "eventbuffer-chunk-"
_CHUNK_NAME = re.compile(re.escape(_CHUNK_PREFIX) + r"(\d+)-[^/]*\.rows\Z")
_swept: set[int] = set()  # the processes that removed dead processes' chunk files


def _chunk_file(data: bytes) -> str | None:
    """A new temporary file holding `data`, or None when none can be written.

    Its name carries the process id: a process killed while inserting leaves its
    file, and the first chunk another process writes removes such files.
    """
    directory = _chunk_dir()
    pid = os.getpid()
    if pid not in _swept:
        _swept.add(pid)
        _remove_orphans(directory)
    try:
        fd, path = tempfile.mkstemp(prefix=f"{_CHUNK_PREFIX}{pid}-", suffix=".rows", dir=directory)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
    except OSError:
        _remove(path)
        return None
    return path


def _remove_orphans(directory: str) -> None:
    """Remove the chunk files of processes that no longer run."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = _CHUNK_NAME.match(name)
        if match is None:
            continue
        try:
            os.kill(int(match[1]), 0)
        except ProcessLookupError:
            _remove(os.path.join(directory, name))
        except (OSError, ValueError, OverflowError):
            continue


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _quoted(path: str) -> str:
    """`path` as a ClickHouse string literal."""
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Chunks prepared ahead (`ChdbSink.prepare`) and not yet written, at most: the next chunk of
# a claim, the first of the claim read ahead, and one to spare.
_PREPARED_MAX = 3


@dataclass
class _Chunk:
    """A chunk's rows ready for its INSERT: in a file, else (no file could be written) as
    bytes for the statement; or why ClickHouse must not see them."""

    path: str | None
    data: bytes | None  # only when there is no file
    parallel: int  # input_format_parallel_parsing for this chunk
    not_utf8: UnicodeDecodeError | None = None  # the rows are not UTF-8: not inserted

    def discard(self) -> None:
        if self.path is not None:
            _remove(self.path)
            self.path = None


def _prepare(rows: Sequence[bytes]) -> _Chunk:
    """`rows` joined (one copy, as bytes) and written to a file for `FROM INFILE`."""
    data = b"\n".join(rows)
    size = len(data) - max(len(rows) - 1, 0)  # the rows' bytes, without the newlines
    parallel = int(size >= _PARALLEL_PARSING_MIN_BYTES)
    # ClickHouse stores a String's bytes as they come, so the rows are checked to be
    # UTF-8 here (an ASCII chunk, the usual one, is at once).
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return _Chunk(None, None, parallel, exc)
    path = _chunk_file(data)
    return _Chunk(path, data if path is None else None, parallel)


def _same_rows(a: Sequence[bytes], b: Sequence[bytes]) -> bool:
    """The same row objects in the same order (so the same bytes in a chunk's file)."""
    return a is b or (len(a) == len(b) and all(map(operator.is_, a, b)))


def _discard_when_done(future: Future[_Chunk]) -> None:
    """Remove the file of a prepared chunk that will not be written, once it exists."""

    def done(finished: Future[_Chunk]) -> None:
        if not finished.cancelled() and finished.exception() is None:
            finished.result().discard()

    future.add_done_callback(done)


class _Handle:
    """One open chDB session on one directory, shared by the sinks on it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.users = 0
        self.session: Any = None
        self.readonly = False

    def open(self, readonly: bool = False) -> Any:
        """The session, opened read-only or writable as asked.

        A read-only session stays read-only (nothing in a query can lift
        `readonly = 1`): asking for the other kind closes it and opens anew.
        Consecutive read-only queries share one session, so another process
        cannot take the directory between them.
        """
        if self.session is not None and self.readonly != readonly:
            self.close()
        if self.session is None:
            from chdb import session as chdb_session

            os.makedirs(self.path, exist_ok=True)
            try:
                self.session = chdb_session.Session(self.path)  # type: ignore[no-untyped-call]
            except Exception as exc:  # chDB raises RuntimeError for a locked directory
                raise RetryableSinkError(
                    f"embedded ClickHouse at {self.path} could not be opened "
                    f"(held by another process?): {exc}"
                ) from exc
            if readonly:
                try:
                    # chDB turns introspection functions on by default.
                    self.session.query("SET allow_introspection_functions = 0")
                    self.session.query("SET readonly = 1")
                except Exception:
                    self.close()
                    raise
            self.readonly = readonly
        return self.session

    def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            session.close()


_handles: dict[str, _Handle] = {}
_handles_lock = threading.Lock()


def _handle_for(path: str) -> _Handle:
    with _handles_lock:
        handle = _handles.get(path)
        if handle is None:
            handle = _handles[path] = _Handle(path)
        return handle


def _forget_handles_after_fork() -> None:
    # A session opened by a parent is not usable in a forked child.
    global _handles_lock
    _handles.clear()
    _handles_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_handles_after_fork)


def close_all() -> None:
    """Close every chDB session this process holds (tests, shutdown)."""
    with _handles_lock:
        handles = list(_handles.values())
    for handle in handles:
        with handle.lock:
            handle.users = 0
            handle.close()


def has_data(path: str) -> bool:
    """Does `path` hold an embedded ClickHouse (what a first session creates there)?"""
    return os.path.isdir(os.path.join(path, "metadata"))


def path_from_url(url: str) -> str:
    """`chdb:///abs/path` -> /abs/path; `chdb://rel/path` -> <cwd>/rel/path."""
    rest = url.split("://", 1)[1]
    if not rest:
        raise SettingsError("a chdb:// URL needs a path, e.g. chdb://data/clickhouse")
    return os.path.abspath(rest)


class ChdbSink:
    """Writes JSON rows into an embedded ClickHouse table, unparsed."""

    def __init__(
        self, path: str, table: str = "events", *, insert_timeout_s: float | None = None
    ) -> None:
        """`insert_timeout_s`: ClickHouse's `max_execution_time` for each INSERT, which
        the embedded engine checks as it processes the rows (a query that never gets
        that far is bounded by the flush lock's stall limit and the task's time limit
        instead: an in-process call cannot be abandoned)."""
        self.path = os.path.abspath(path)
        self.table = table
        self.insert_timeout_s = insert_timeout_s
        self._quoted_table = identifier(table)
        self._handle = _handle_for(self.path)
        self._holding = False
        # Chunks being prepared on a thread while another is inserted (`prepare`).
        self._prepared: list[tuple[Sequence[bytes], Future[_Chunk]]] = []
        self._prepared_lock = threading.Lock()
        self._preparer: ThreadPoolExecutor | None = None

    def _session(self, readonly: bool = False) -> Any:
        handle = self._handle
        with handle.lock:
            session = handle.open(readonly)
            if not self._holding:
                handle.users += 1
                self._holding = True
            return session

    def _run(
        self,
        sql: str | bytes,
        fmt: str = "CSV",
        params: dict[str, Any] | None = None,
        readonly: bool = False,
    ) -> Any:
        if params:
            # ClickHouse parses a {name:Type} parameter's text in its Escaped (TSV)
            # format: a backslash, tab or newline in a string must be escaped, or
            # the value is changed (or refused) instead of matched verbatim.
            params = {
                name: value.translate(_PARAM_ESCAPES) if isinstance(value, str) else value
                for name, value in params.items()
            }
        with self._handle.lock:
            session = self._session(readonly)
            try:
                return session.query(sql, fmt, params=params)
            except INTERRUPTS:
                raise
            except Exception as exc:
                raise classify(str(exc)) from exc

    def prepare(self, rows: Sequence[bytes], *, now: bool = False) -> None:
        """`rows` will likely be written next: join them and write their file on a thread
        now, while the engine inserts another chunk (chDB releases the GIL). The `write`
        of the same row objects then only inserts. Nothing reaches the table here; a
        prepared chunk never written is removed (by later preparations, at the latest
        by `close`). Thread-safe: the flusher's read-ahead prepares the first chunk of
        the next claim. `now`: on the calling thread, before returning (a chunk nothing
        is inserted beside, whose preparation should not share the interpreter with the
        threads that begin with its INSERT)."""
        if not rows:
            return
        done: Future[_Chunk] | None = None
        if now:
            done = Future()
            done.set_result(_prepare(rows))
        with self._prepared_lock:
            if done is None:
                if self._preparer is None:
                    self._preparer = ThreadPoolExecutor(1, thread_name_prefix="chdb-chunks")
                done = self._preparer.submit(_prepare, rows)
            self._prepared.append((rows, done))
            while len(self._prepared) > _PREPARED_MAX:
                _discard_when_done(self._prepared.pop(0)[1])

    def open_ahead(self) -> None:
        """The session will be needed soon (the flusher is reading a claim's rows): open it
        on the sink's thread meanwhile, so the first INSERT does not wait for it. Opened
        only for rows about to be written, and closed by `close` as ever (which waits
        for the opening). A failure is not raised here: the INSERT that needs the
        session tries again and raises it."""
        if self._holding:
            return
        with self._prepared_lock:
            if self._preparer is None:
                self._preparer = ThreadPoolExecutor(1, thread_name_prefix="chdb-chunks")
            self._preparer.submit(self._open_quietly)

    def _open_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self._session()

    def _take_prepared(self, rows: Sequence[bytes]) -> _Chunk | None:
        """The chunk `prepare` made of these very rows, if any (waiting for it)."""
        with self._prepared_lock:
            for entry in self._prepared:
                # The same row objects, in the same order: the same bytes in the file.
                if _same_rows(entry[0], rows):
                    self._prepared.remove(entry)
                    future = entry[1]
                    break
            else:
                return None
        try:
            return future.result()
        except Exception:  # an optimisation only: the chunk is prepared again
            return None

    def _drop_prepared(self) -> None:
        with self._prepared_lock:
            prepared, self._prepared = self._prepared, []
            preparer, self._preparer = self._preparer, None
        for _, future in prepared:
            _discard_when_done(future)
        if preparer is not None:
            preparer.shutdown(wait=True)

    def write(self, rows: Sequence[bytes], token: str) -> None:
        if not _TOKEN.match(token):
            raise PermanentSinkError(f"unsafe dedup token {token!r}")
        chunk = self._take_prepared(rows) or _prepare(rows)
        try:
            if chunk.not_utf8 is not None:
                exc = chunk.not_utf8
                raise RowRejectedError(f"row is not valid UTF-8: {exc}") from exc
            timeout = (
                f", max_execution_time = {self.insert_timeout_s:g}"
                if self.insert_timeout_s is not None
                else ""
            )
            settings = (
                f"SETTINGS insert_deduplication_token = '{token}', async_insert = 0, "
                f"input_format_parallel_parsing = {chunk.parallel}{timeout} "
                "FORMAT JSONEachRow"
            )
            # The rows reach chDB through a file (`FROM INFILE`), not inside the
            # statement: chDB's Python binding scans a statement's whole text before
            # running it, which for a chunk of 10,000 rows costs more than a third of
            # the insert (see the README's flush benchmark). Where no temporary file can
            # be written, the rows go in the statement as before.
            if chunk.path is None:
                assert chunk.data is not None
                statement = f"INSERT INTO {self._quoted_table} {settings}".encode()
                self._run(b"\n".join([statement, chunk.data]))
                return
            self._run(
                f"INSERT INTO {self._quoted_table} FROM INFILE {_quoted(chunk.path)} {settings}"
            )
        finally:
            chunk.discard()

    def query(
        self, sql: str, params: dict[str, Any] | None = None, *, readonly: bool = False
    ) -> list[tuple[Any, ...]]:
        return self.query_with_columns(sql, params, readonly=readonly)[1]

    def query_with_columns(
        self, sql: str, params: dict[str, Any] | None = None, *, readonly: bool = False
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Column names and rows of a query; `readonly`: the engine refuses any write.

        A read-only query runs in a session opened with `readonly = 1`, which
        nothing in the query can lift (the setting forbids changing settings);
        the next writing query closes it and opens a writable one.
        `readonly` does not stop `INTO OUTFILE`, nor table functions in every
        place (`DESCRIBE file(...)`): `eventbuffer query` checks the parsed
        statement for those first (worker/cli/statement.py).
        """
        result = self._run(sql, "JSONCompact", params=params, readonly=readonly)
        raw = result.bytes()
        if not raw:
            return [], []
        data = json.loads(raw)
        return [column["name"] for column in data["meta"]], [tuple(row) for row in data["data"]]

    def format_query(self, sql: str) -> str:
        [(text,)] = self.query(
            "SELECT formatQuerySingleLine({sql:String})", {"sql": sql}, readonly=True
        )
        return str(text)

    def migrate(
        self,
        cluster: str | None = None,
        *,
        retention_days: int | None = None,
        columns: Sequence[tuple[str, str]] = COLUMNS,
        on_wait: Callable[[str], None] | None = None,
    ) -> Report:
        """Apply the pending migrations (worker/sinks/migrations.py): the table first.

        Embedded ClickHouse is one process's at a time, so it has no cluster.
        """
        if cluster is not None:
            raise ValueError("embedded ClickHouse has no cluster")
        return migrations.migrate(
            self.query,
            table=self.table,
            database=None,
            retention_days=retention_days,
            columns=columns,
            on_wait=on_wait,
        )

    def close(self) -> None:
        self._drop_prepared()
        handle = self._handle
        with handle.lock:
            if self._holding:
                self._holding = False
                handle.users = max(0, handle.users - 1)
                if handle.users == 0:
                    handle.close()
