"""An import's state on disk: one SQLite file and the rows' bytes, so a killed import continues.

The state lives in `<state root>/<key>/state.sqlite`, where the key is a hash
of the import's arguments (format, project, ClickHouse URL and table, and
each file's absolute path, size and modification time): running the same
command again finds it. It holds:

- `meta`: the import's time (`imported_at` of every row), its phase.
- `files`: per file, the last line read into the state, the counts, and the
  committed length of its data file.
- data files (`rows-<file>.data`, next to the state): each valid event's
  stored row (its JSON bytes), appended while reading, one file per export
  file (written by whichever process reads that file). SQLite does not hold
  them: its sorts and scans move only the small columns below.
- `rows`: every valid event of the export (where its stored row is in its
  data file, and what sorting and the durations need), appended while
  reading. SQLite keeps them on disk and sorts them with bounded memory
  (`CREATE INDEX` is an external sort): a 10 GB export needs disk, not 10 GB
  of RAM.
- `fixes`: what the durations pass gave a row (its duration, its derived
  session, that it repeats another), by the row's rowid.
- `ordered`: every row with its durations' fixes, in `created_at` order,
  written once by the sort by time (SQLite's external sort again) for the
  insert pass to read in rowid order; the pass reads each row's bytes from
  its data file (by offset) and applies the fix.
- `rejects`: every line refused (by validation, or by ClickHouse), with its
  file, number and reason.
- `chunks`: the one chunk being inserted: which of its ids ClickHouse had
  already (decided once, before the insert), so a re-run after a crash
  inserts the same rows and counts them the same way.

Each step commits with the progress it made, in one SQLite transaction
(WAL; a process killed at any point loses only the uncommitted step). A
batch of rows is written to its data file before the transaction that
records it (with the data file's new length) commits; when the state is
opened again, each data file is cut back to its committed length, so bytes
a killed import appended after its last commit are dropped (and read again).
`synchronous = OFF`: a commit is in the WAL file (the OS's page cache) when
COMMIT returns, without an fsync. A killed process (SIGKILL included) loses
nothing committed, since the page cache outlives it; a power loss or an OS
crash may lose the last commits or damage the files (a data file shorter
than its committed length is found damaged when the state is opened, one
holding other bytes than rows where the state says when they are read). Lost
commits are redone, and what they had inserted is found by the check
against the table; a damaged state stops the import (exit 1) until its
directory is removed, and the re-run, starting anew, finds every row
already in ClickHouse.
"""

from __future__ import annotations

import gc
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import repeat, takewhile
from operator import add, sub
from pathlib import Path
from typing import Any

STATE_FILE = "state.sqlite"
REJECTS_FILE = "rejects.ndjson"
SUMMARY_FILE = "summary.json"

# The state's layout: a state of another layout (an earlier release's) is not resumed.
LAYOUT = "4"

# SQLite's page cache for the state: what the sorts and scans may keep in memory.
CACHE_KIB = 64 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    idx INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    line INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    valid INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    imported INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    data INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rows (
    grp TEXT NOT NULL,
    ms INTEGER NOT NULL,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    file INTEGER NOT NULL,
    line INTEGER NOT NULL,
    project TEXT NOT NULL,
    own INTEGER NOT NULL,
    off INTEGER NOT NULL,
    len INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS fixes (
    rid INTEGER NOT NULL,
    dur INTEGER,
    sess TEXT,
    dup INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS ordered (
    ms INTEGER NOT NULL,
    id TEXT NOT NULL,
    file INTEGER NOT NULL,
    line INTEGER NOT NULL,
    project TEXT NOT NULL,
    dup INTEGER NOT NULL,
    off INTEGER NOT NULL,
    len INTEGER NOT NULL,
    own INTEGER NOT NULL,
    dur INTEGER,
    sess TEXT
);
CREATE TABLE IF NOT EXISTS rejects (
    file INTEGER NOT NULL,
    line INTEGER NOT NULL,
    field TEXT NOT NULL,
    reason TEXT NOT NULL,
    raw TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    idx INTEGER PRIMARY KEY,
    existing TEXT NOT NULL
);
"""

# The durations pass's order: an index holding every column of `rows` that
# pass needs (sessions' views and ends, and actors of derived sessions), read
# in order without a lookup into the table per row. What the pass finds (a
# duration, a derived session, a repeat) is appended to `fixes` by the row's
# rowid (each row once: a group's rows are walked within one commit): cheaper
# than rewriting each wide row in place, and than keeping `fixes` by rowid as
# it fills (the pass meets rowids in no order); the sort by time indexes it.
_BY_SESSION = (
    "CREATE INDEX IF NOT EXISTS rows_by_session ON rows (grp, ms, id, kind, own) WHERE grp != ''"
)
# The insert pass's order: every row with its fixes, sorted by created_at into
# `ordered`. A sorted copy appended in order costs less than an index (SQLite sorts
# both the same way), and the insert pass then reads each chunk as it is stored: no
# join, no lookups. Ties (copies of one event) are ordered by file and line. `fixes`
# is indexed first (covering: the join reads no row of it). The rows' bytes stay in
# their data files: the insert pass reads them by offset and applies the fix there
# (the common one as bytes SQLite makes, `_FIX_TAIL`; any other through
# worker/importer/rows.py's `finish_row`).
_FIXES_BY_ROW = "CREATE INDEX IF NOT EXISTS fixes_by_row ON fixes (rid, dur, sess, dup)"
_FILL_ORDERED = (
    "INSERT INTO ordered (ms, id, file, line, project, dup, off, len, own, dur, sess) "
    "SELECT r.ms, r.id, r.file, r.line, r.project, coalesce(f.dup, 0), r.off, r.len, "
    "r.own, f.dur, f.sess "
    "FROM rows AS r LEFT JOIN fixes AS f ON f.rid = r.rowid "
    "ORDER BY r.ms, r.id, r.file, r.line"
)
# The common fix as the bytes that replace a row's closing brace (`time_page`).
_FIX_TAIL = (
    "CASE WHEN sess IS NULL AND own = 0 AND dur != 0 "
    "THEN CAST(',\"duration\":' || dur || '}' AS BLOB) END"
)
# A data file's rows for one chunk are read in one piece when they span at most this
# many times their own bytes (`read_rows`).
SPAN_FACTOR = 4
# After a chunk's last row, rows read at a time while they are copies of it.
_TAIL_ROWS = 64

# One row as the state keeps it (the columns of `rows`: its bytes are at `off`, `len`
# bytes long, in its file's data file).
RowRecord = tuple[str, int, str, str, int, int, str, int, int, int]
# What the insert pass makes of a row: its stored bytes, its own duration, the duration
# and session the durations pass gave it (None: unchanged); the bytes as inserted.
Finish = Callable[[bytes, int, int | None, str | None], bytes]


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a pass over the state: its pages make
    tens of thousands of tuples at a time, which start collections that scan every
    object alive (a pass's own objects hold no cycles: reference counting frees them).
    It runs again after, as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def data_path(directory: Path, file: int) -> Path:
    """The data file of the export's file `file` (its rows' bytes)."""
    return directory / f"rows-{file}.data"


class ImportState:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        # A state an earlier release made (another layout) is set aside, not resumed:
        # this run starts anew, and finds in ClickHouse whatever that one inserted.
        self.set_aside = _set_aside_other_layout(directory)
        self.db = sqlite3.connect(directory / STATE_FILE, isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        self.db.execute("PRAGMA temp_store = FILE")
        self.db.executescript(_SCHEMA)
        self._data: dict[int, int] = {}  # the data files open for reading: file -> fd

    @property
    def rejects_path(self) -> Path:
        return self.directory / REJECTS_FILE

    def close(self) -> None:
        for fd in self._data.values():
            os.close(fd)
        self._data.clear()
        self.db.close()

    # meta ------------------------------------------------------------------

    def get(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def count(self, sql: str) -> int:
        """The one number a `SELECT count()...` answers."""
        return int(self.db.execute(sql).fetchone()[0])

    def put(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def initialise(self, paths: Sequence[str], meta: dict[str, str]) -> None:
        """Record the files and the import's fixed facts, once (a resumed import keeps them);
        each data file cut back to its committed length (a killed import's bytes after
        its last commit go: they are read again)."""
        if self.get("created") is not None:
            self._trim_data()
            return
        self.begin()
        for idx, path in enumerate(paths):
            self.db.execute("INSERT INTO files (idx, path) VALUES (?, ?)", (idx, path))
        for key, value in meta.items():
            self.put(key, value)
        self.put("layout", LAYOUT)
        self.put("created", "1")
        self.commit()
        self._trim_data()

    def _trim_data(self) -> None:
        """Every data file at its committed length (a new state's: none, whatever an
        earlier import of the same arguments left); one shorter is a damaged state."""
        for idx, committed in self.db.execute("SELECT idx, data FROM files"):
            path = data_path(self.directory, idx)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size < committed:
                raise sqlite3.DatabaseError(
                    f"{path} holds {size} bytes, the state recorded {committed}: damaged"
                )
            if size > committed:
                os.truncate(path, committed)

    # reading ---------------------------------------------------------------

    def files(self) -> list[dict[str, Any]]:
        cursor = self.db.execute(
            "SELECT idx, path, line, done, valid, rejected, imported, duplicates, data "
            "FROM files ORDER BY idx"
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]

    def add_batch(
        self,
        file: int,
        line: int,
        rows: Sequence[RowRecord],
        rejects: Sequence[tuple[int, int, str, str, str]],
        data: int,
        *,
        done: bool = False,
    ) -> None:
        """Rows and rejects of a file up to `line`, and that progress, in one transaction;
        the rows' bytes are in the file's data file already, `data` bytes long now."""
        self.begin()
        self.db.executemany(
            "INSERT INTO rows (grp, ms, id, kind, file, line, project, own, off, len) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        self.db.executemany("INSERT INTO rejects VALUES (?, ?, ?, ?, ?)", rejects)
        self.db.execute(
            "UPDATE files SET line = ?, done = ?, valid = valid + ?, rejected = rejected + ?, "
            "data = ? WHERE idx = ?",
            (line, int(done), len(rows), len(rejects), data, file),
        )
        self.commit()

    def sort_by_session(self) -> None:
        """The durations pass's order (SQLite sorts on disk, in bounded memory)."""
        self.db.execute(_BY_SESSION)

    def sort_by_time(self) -> None:
        """The insert pass's rows, with what the durations pass gave them, into `ordered`
        by created_at; with the meta `time_sorted`, in one transaction (a re-run after a
        kill starts it anew)."""
        self.begin()
        self.db.execute("DELETE FROM ordered")
        self.db.execute(_FIXES_BY_ROW)
        self.db.execute(_FILL_ORDERED)
        self.put("time_sorted", "1")
        self.commit()

    # durations -------------------------------------------------------------

    def session_page(
        self, after: tuple[str, int, str, str, int, int], limit: int
    ) -> list[tuple[int, str, int, str, str, int]]:
        """(rowid, group, ms, id, kind, own duration) after `after` (the same, rowid last),
        in session order: the index's own order, read without a lookup per row."""
        return self.db.execute(
            "SELECT rowid, grp, ms, id, kind, own FROM rows INDEXED BY rows_by_session "
            "WHERE grp != '' AND (grp, ms, id, kind, own, rowid) > (?, ?, ?, ?, ?, ?) "
            "ORDER BY grp, ms, id, kind, own, rowid LIMIT ?",
            (*after, limit),
        ).fetchall()

    def apply_updates(
        self, updates: Iterable[tuple[int, int | None, str | None, int]], walked: str
    ) -> None:
        """(rowid, duration, session, duplicate) for rows of groups up to `walked` (each row
        once: a group's rows are walked within one commit), with it."""
        self.begin()
        self.db.executemany("INSERT INTO fixes VALUES (?, ?, ?, ?)", updates)
        self.put("walked", walked)
        self.commit()

    # inserting -------------------------------------------------------------

    def time_page(self, after: int, limit: int) -> list[tuple[Any, ...]]:
        """(rowid, ms, id, file, line, project, dup, offset, length, tail, own duration,
        duration, session) of the next `limit` rows of `ordered` after rowid `after`,
        and every row right after them that is a copy of the last one (its ms and id):
        copies of one event never straddle two chunks. The rows' bytes: `read_rows`.
        `tail`: the common fix, a duration for a row without one of its own (and no
        derived session), as the bytes that replace the row's closing brace (as
        worker/importer/rows.py's `with_field` adds a field); None for any other."""
        columns = f"rowid, ms, id, file, line, project, dup, off, len, {_FIX_TAIL}, own, dur, sess "
        columns += "FROM ordered"
        page = self.db.execute(
            f"SELECT {columns} WHERE rowid > ? ORDER BY rowid LIMIT ?", (after, limit)
        ).fetchall()
        if not page:
            return page
        key = (page[-1][1], page[-1][2])
        while True:
            tail = self.db.execute(
                f"SELECT {columns} WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (page[-1][0], _TAIL_ROWS),
            ).fetchall()
            copies = list(takewhile(lambda row: (row[1], row[2]) == key, tail))
            page.extend(copies)
            if len(copies) < _TAIL_ROWS:
                return page

    def read_rows(
        self,
        files: Sequence[int],
        offsets: Sequence[int],
        lengths: Sequence[int],
        tails: Sequence[bytes | None],
        owns: Sequence[int],
        durations: Sequence[int | None],
        sessions: Sequence[str | None],
        *,
        finish: Finish,
    ) -> list[bytes]:
        """The rows (columns as `time_page` gives them) as inserted: each one's bytes from
        its data file, the durations pass's fix applied (`tail`, or `finish(row, own,
        duration, session)`). A data file's rows are read in one piece where they lie
        close together (at most `SPAN_FACTOR` times their bytes), else one by one: only
        about the rows' bytes are in memory."""
        rows: list[bytes] = [b""] * len(files)
        places: dict[int, list[int]] = {}
        for n, file in enumerate(files):
            places.setdefault(file, []).append(n)
        for file, numbers in places.items():
            fd = self._data.get(file)
            if fd is None:
                fd = self._data[file] = os.open(data_path(self.directory, file), os.O_RDONLY)
            starts = [offsets[n] for n in numbers]
            ends = list(map(add, starts, [lengths[n] for n in numbers]))
            start, end = min(starts), max(ends)
            wanted = sum(ends) - sum(starts)
            if end - start <= SPAN_FACTOR * wanted:
                span = os.pread(fd, end - start, start)
                at = repeat(start)
                pieces = list(
                    map(span.__getitem__, map(slice, map(sub, starts, at), map(sub, ends, at)))
                )
            else:
                pieces = list(map(os.pread, repeat(fd), map(sub, ends, starts), starts))
            if sum(map(len, pieces)) != wanted:
                raise sqlite3.DatabaseError(f"{data_path(self.directory, file)} is cut short")
            # Each piece is a JSON object where the state says (zeroed or stale pages after
            # a power loss are not): else a damaged state, not rows ClickHouse would refuse.
            if not all(map(_looks_like_row, pieces)):
                raise sqlite3.DatabaseError(
                    f"{data_path(self.directory, file)} holds something else than the rows "
                    "the state recorded there: damaged"
                )
            if len(places) == 1:
                rows = pieces
            else:
                for n, piece in zip(numbers, pieces, strict=True):
                    rows[n] = piece
        for n, (tail, duration, session) in enumerate(zip(tails, durations, sessions, strict=True)):
            if tail is not None:
                rows[n] = rows[n][:-1] + tail
            elif duration is not None or session is not None:
                rows[n] = finish(rows[n], owns[n], duration, session)
        return rows

    def chunk_intent(self, idx: int) -> set[str] | None:
        row = self.db.execute("SELECT existing FROM chunks WHERE idx = ?", (idx,)).fetchone()
        if row is None:
            return None
        return set(json.loads(row[0]))

    def record_intent(self, idx: int, existing: set[str]) -> None:
        self.begin()
        self.db.execute(
            "INSERT OR REPLACE INTO chunks VALUES (?, ?)", (idx, json.dumps(sorted(existing)))
        )
        self.commit()

    def chunk_done(
        self,
        idx: int,
        after: int,
        counts: dict[int, tuple[int, int]],
        rejects: Sequence[tuple[int, int, str, str, str]] = (),
    ) -> None:
        """Chunk `idx` is in ClickHouse: its per-file (imported, duplicates), the rows
        ClickHouse refused (as rejects) and the cursor."""
        self.begin()
        self.db.executemany("INSERT INTO rejects VALUES (?, ?, ?, ?, ?)", rejects)
        for file, _line, _field, _reason, _raw in rejects:
            self.db.execute("UPDATE files SET rejected = rejected + 1 WHERE idx = ?", (file,))
        for file, (imported, duplicates) in counts.items():
            self.db.execute(
                "UPDATE files SET imported = imported + ?, duplicates = duplicates + ? "
                "WHERE idx = ?",
                (imported, duplicates, file),
            )
        self.db.execute("DELETE FROM chunks WHERE idx = ?", (idx,))
        self.put("inserted", json.dumps([idx, after]))
        self.commit()

    # the end ---------------------------------------------------------------

    def rejects(self) -> Iterator[tuple[str, int, str, str, str]]:
        yield from self.db.execute(
            "SELECT f.path, r.line, r.field, r.reason, r.raw FROM rejects r "
            "JOIN files f ON f.idx = r.file ORDER BY r.file, r.line"
        )


def _set_aside_other_layout(directory: Path) -> Path | None:
    """Rename a state of another layout (and its WAL) aside; the path it went to, if any."""
    path = directory / STATE_FILE
    if not path.exists():
        return None
    db = sqlite3.connect(path, isolation_level=None)
    try:
        try:
            rows = dict(
                db.execute("SELECT key, value FROM meta WHERE key IN ('created', 'layout')")
            )
        except sqlite3.OperationalError:  # no meta table: nothing was recorded yet
            return None
    finally:
        db.close()  # the last connection: SQLite folds the WAL into the file
    if "created" not in rows or rows.get("layout") == LAYOUT:
        return None
    aside = path.with_name(f"{STATE_FILE}.layout-{rows.get('layout', '1')}")
    path.replace(aside)
    for suffix in ("-wal", "-shm"):
        path.with_name(STATE_FILE + suffix).unlink(missing_ok=True)
    return aside


def _looks_like_row(piece: bytes) -> bool:
    """A stored row's bytes: one JSON object (its first and last byte)."""
    return piece[:1] == b"{" and piece[-1:] == b"}"
