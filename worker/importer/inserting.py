"""The last pass of an import: rows into ClickHouse by created_at, each chunk exactly once.

For each chunk of `chunk_rows` rows (every copy of one event in the same
chunk) the importer asks ClickHouse which of its ids the table holds
(worker/importer/writer.py), records that answer in the state, inserts the
rest with a token derived from their ids, then commits the chunk with its
counts. A re-run after a crash re-drives the chunk with the recorded answer:
the same rows are counted the same way, the ids that landed are found by the
check, and a block it cannot see yet carries the same token.

A row ClickHouse refuses for its data (RowRejectedError: a value the table
cannot take, though the event model took it) does not stop the import: as
the flush does, the insert is halved until that row is alone, the rest goes
in (each half with the token of its own ids), and the row is recorded with
the chunk's commit as a reject (its file, line and ClickHouse's message).
A re-run after a crash finds the halves that landed by the check and refuses
the row again; it is counted once, when its chunk commits.

ClickHouse is opened for each chunk (its check and its insert) and closed
right after (a flush worker gets an embedded ClickHouse between chunks).
With `isolate` (embedded ClickHouse) the importer hands each chunk to a
child process that checks and inserts it (worker/importer/isolation.py),
`CHUNKS_PER_CHILD` chunks per child: first the chunk's ids (the check), then,
once the answer is recorded, its rows, which the importer reads from its
data files while the child opens ClickHouse and asks; and it reads the next
chunk from its state while the child inserts. The first chunk a run writes
has ClickHouse opened for it while the importer reads its page (`ahead`).
Only the importer touches the state.
"""

from __future__ import annotations

import importlib
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any, NamedTuple, Protocol

from worker.importer.import_state import ImportState, gc_paused
from worker.importer.isolation import Child
from worker.importer.options import ImportOptions, Progress
from worker.importer.rows import finish_row
from worker.importer.writer import chunk_token, existing_ids
from worker.sinks import RetryableSinkError, RowRejectedError, Sink

# With `isolate`, a child process inserts this many chunks, then the next one takes over.
CHUNKS_PER_CHILD = 10
# The next child is forked (and loads chDB) when the one inserting has this many
# chunks left to insert, and more chunks remain than it will take.
FORK_AHEAD_CHUNKS = 3
# A step that fails as retryable (ClickHouse away, chDB held by a flush) is tried again
# this many times, with backoff, before the import stops (a re-run continues).
WRITE_ATTEMPTS = 8
# The reason of a row ClickHouse refused (after its validation here), in the rejects.
REASON_REFUSED = "refused by ClickHouse"
RAW_CLIP = 2_000
# What the importer sends a child before a chunk's page is read: open ClickHouse now.
AHEAD = "ahead"

Connect = Callable[[], AbstractContextManager[Sink]]


class Check(NamedTuple):
    """What the check of one chunk needs: the ids to insert unless ClickHouse has them,
    and where it looks (projects, seconds)."""

    ids: list[str]
    projects: list[str]
    first: str
    end: str


class Rows(NamedTuple):
    """The rows of a chunk's ids (in the same order, joined by newlines: a stored row is
    one line of JSON), and the insert's token when every id goes in. One `bytes` of
    rows goes to a child process as one copy, where a list of them costs a pickled
    object per row."""

    rows: bytes
    token: str


class Writer(Protocol):
    def write(
        self,
        check: Check,
        load: Callable[[], Rows],
        record: Callable[[set[str]], None],
        meanwhile: Callable[[], None],
        more: int,
    ) -> dict[str, str]:
        """Check and insert a chunk (`write_chunk`): its rows are `load()`ed while
        ClickHouse is asked, where it is asked elsewhere; `meanwhile()` runs while
        the rows are being inserted, where they are inserted elsewhere; `more`: how
        many chunks may follow. The rows refused (id -> ClickHouse's message)."""
        ...

    def ahead(self) -> None:
        """A chunk is about to be written (its page is being read): where it is written
        elsewhere, ClickHouse is opened for it now."""
        ...

    def close(self) -> None: ...


def write_chunk(
    connect: Connect,
    check: Check,
    record: Callable[[set[str]], None],
    load: Callable[[], Rows],
    opened: _Opened | None = None,
) -> dict[str, str]:
    """Open ClickHouse (unless `opened` has), ask which of the chunk's ids it holds,
    give that answer to `record` (the state keeps it before anything is inserted),
    insert the other rows (`load()`), close; the rows ClickHouse refused (id -> its
    message)."""
    refused: dict[str, str] = {}
    with opened or _Opened(connect) as sink:
        present = (
            existing_ids(sink, check.ids, check.projects, check.first, check.end)
            if check.ids
            else set()
        )
        record(present)
        loaded = load()
        ids = check.ids
        rows = loaded.rows.split(b"\n") if ids else []
        if len(rows) != len(ids):
            raise ValueError(f"a chunk of {len(ids)} ids came with {len(rows)} rows")
        token: str | None = loaded.token
        if present:
            kept = [n for n, event_id in enumerate(ids) if event_id not in present]
            ids, rows, token = [ids[n] for n in kept], [rows[n] for n in kept], None
        if ids:
            _write_isolating(sink, ids, rows, refused, token)
    return refused


class _InProcess:
    """A ClickHouse server: each chunk written by this process."""

    def __init__(self, connect: Connect) -> None:
        self.connect = connect

    def write(
        self,
        check: Check,
        load: Callable[[], Rows],
        record: Callable[[set[str]], None],
        meanwhile: Callable[[], None],
        more: int,
    ) -> dict[str, str]:
        load()  # before ClickHouse is opened (`write_chunk` gets the rows loaded)
        refused = write_chunk(self.connect, check, record, load)
        meanwhile()
        return refused

    def ahead(self) -> None:
        pass

    def close(self) -> None:
        pass


class _InChildren:
    """Embedded ClickHouse: each chunk written by a child process, `CHUNKS_PER_CHILD`
    per child (worker/importer/isolation.py). The first child is forked at once."""

    def __init__(self, connect: Connect) -> None:
        self.connect = connect
        self.current: Child | None = None
        self.written = 0  # chunks handed to `current`
        self.next: Child | None = self._fork()
        self.opened = False  # `current` has opened ClickHouse for the next chunk (`ahead`)

    def _fork(self) -> Child:
        return Child(_serve(self.connect), warm=_load_chdb)

    def _child(self) -> Child:
        """The child for the next chunk."""
        if (
            self.current is None
            or self.written == CHUNKS_PER_CHILD
            or self.current.channel.closed  # let go after what was thought the last chunk
        ):
            if self.current is not None:
                self.current.close()
            self.current, self.next, self.written = self.next or self._fork(), None, 0
        return self.current

    def ahead(self) -> None:
        if not self.opened:
            self._child().send(AHEAD)
            self.opened = True

    def write(
        self,
        check: Check,
        load: Callable[[], Rows],
        record: Callable[[set[str]], None],
        meanwhile: Callable[[], None],
        more: int,
    ) -> dict[str, str]:
        child = self.current if self.opened and self.current is not None else self._child()
        self.opened = False
        self.written += 1
        left = CHUNKS_PER_CHILD - self.written  # after this one
        if self.next is None and more > left and left < FORK_AHEAD_CHUNKS:
            self.next = self._fork()
        child.send(check)  # the child opens ClickHouse and asks
        rows = load()  # meanwhile
        record(child.receive())
        child.send(rows)  # recorded: insert
        meanwhile()
        refused: dict[str, str] = child.receive()
        if not more:  # the last chunk: the child exits while the importer finishes
            child.let_go()
        return refused

    def close(self) -> None:
        for child in (self.current, self.next):
            if child is not None:
                child.close()
        self.current = self.next = None


def _serve(connect: Connect) -> Callable[[Connection], None]:
    """A child's work: each chunk it is sent checked and written, until the channel closes."""

    def serve(channel: Connection) -> None:
        loaded: list[Rows] = []  # the chunk's rows, once the importer sends them

        def record(present: set[str]) -> None:
            channel.send(present)
            loaded.append(channel.recv())  # the importer recorded it: the rows

        while True:
            message: Check | str = channel.recv()
            if not isinstance(message, Check):  # AHEAD: open ClickHouse, the chunk follows
                opened = _Opened(connect)
                with opened:
                    check: Check = channel.recv()
                    channel.send(write_chunk(connect, check, record, loaded.pop, opened))
                continue
            channel.send(write_chunk(connect, message, record, loaded.pop))

    return serve


def _load_chdb() -> None:
    importlib.import_module("chdb.session")


def start_insert(options: ImportOptions, connect: Connect) -> Writer:
    """The insert pass's writer, made now: with `isolate`, its first child is forked and
    loads chDB while this process sorts and walks the durations. `close()` it after."""
    return _InChildren(connect) if options.isolate else _InProcess(connect)


def insert(state: ImportState, options: ImportOptions, writer: Writer, report: Progress) -> None:
    """Insert the chunks from where the state says to the last."""
    with gc_paused():
        _insert_all(state, options, writer, report)


def _insert_all(
    state: ImportState, options: ImportOptions, writer: Writer, report: Progress
) -> None:
    total = state.count("SELECT count() FROM rows")
    progress = state.get("inserted")
    if progress is None:
        idx, after = 0, 0
    else:
        last = json.loads(progress)
        idx, after = last[0] + 1, int(last[1])
    done = state.count("SELECT coalesce(sum(imported + duplicates), 0) FROM files")
    report("inserting", done, total, "")
    if done < total:
        writer.ahead()  # a child opens ClickHouse while the first page is read
    page = state.time_page(after, options.chunk_rows)
    prepared = _prepare(page) if page else None
    while prepared is not None:
        more = -(-(total - done - prepared.size) // options.chunk_rows)
        following = _insert_chunk(state, writer, idx, prepared, options.chunk_rows, more)
        done += prepared.size
        report("inserting", done, total, "")
        idx += 1
        prepared = following


class _Prepared:
    """A page of `ordered` made ready to write: its check (each event once: not a row the
    durations pass marked a repeat, nor a second row of one id), for each of the
    chunk's ids its file, line and where its row is; per file, the page's rows not in
    the chunk. Its rows are read from the data files by `load` (once)."""

    def __init__(
        self,
        check: Check,
        size: int,
        end_key: int,
        files: Sequence[int],
        lines: Sequence[int],
        places: Sequence[Sequence[Any]],
        repeats: Counter[int],
    ) -> None:
        self.check = check
        self.size = size  # rows of the page
        self.end_key = end_key  # the page's last rowid in `ordered`
        self.files = files
        self.lines = lines
        # Column by column, for the chunk's ids: file, offset, length, own duration,
        # the durations pass's duration and session.
        self.places = places
        self.repeats = repeats
        self.rows: list[bytes] = []
        self.loaded: Rows | None = None

    def load(self, state: ImportState) -> Rows:
        """The chunk's rows as inserted, read from the data files (the first call)."""
        if self.loaded is None:
            self.rows = state.read_rows(*self.places, finish=finish_row)
            self.loaded = Rows(b"\n".join(self.rows), chunk_token(self.check.ids))
        return self.loaded


def _prepare(page: list[tuple[Any, ...]]) -> _Prepared:
    """The chunk of `page` (rows of `ordered`, without their bytes), column by column:
    the common page (no repeats) takes no Python step per row."""
    columns = list(zip(*page, strict=True))
    page_ids, page_files, page_lines, page_projects, dups = columns[2:7]
    places: Sequence[Sequence[Any]] = [columns[3], *columns[7:]]
    repeats: Counter[int] = Counter()
    files: Sequence[int]
    lines: Sequence[int]
    if not any(dups) and len(set(page_ids)) == len(page_ids):
        ids = list(page_ids)
        files, lines, projects = page_files, page_lines, set(page_projects)
    else:
        seen: set[str] = set()
        kept: list[int] = []
        for n, (event_id, dup) in enumerate(zip(page_ids, dups, strict=True)):
            if dup or event_id in seen:
                continue
            seen.add(event_id)
            kept.append(n)
        ids = [page_ids[n] for n in kept]
        files = [page_files[n] for n in kept]
        lines = [page_lines[n] for n in kept]
        places = [[column[n] for n in kept] for column in places]
        projects = {page_projects[n] for n in kept}
        repeats.update(page_files)
        repeats.subtract(files)
    # Seconds around the chunk's created_at range: a server whose created_at
    # is a DateTime (to the second) takes these bounds too.
    check = Check(
        ids,
        sorted(projects),
        _second_text(page[0][1]),
        _second_text(page[-1][1] + 1000),
    )
    return _Prepared(check, len(page), int(page[-1][0]), files, lines, places, repeats)


def _insert_chunk(
    state: ImportState,
    writer: Writer,
    idx: int,
    prepared: _Prepared,
    chunk_rows: int,
    more: int,
) -> _Prepared | None:
    """Chunk `idx` (`prepared`) into ClickHouse and committed; the next chunk, read from
    the state and prepared while this one is inserted (None after the last)."""
    existing = state.chunk_intent(idx)

    def record(present: set[str]) -> None:
        nonlocal existing
        if existing is None:
            existing = present
            state.record_intent(idx, existing)

    following: list[_Prepared] = []

    def meanwhile() -> None:
        page = state.time_page(prepared.end_key, chunk_rows)
        if page:
            following.append(_prepare(page))
            following[0].load(state)

    refused = writer.write(prepared.check, lambda: prepared.load(state), record, meanwhile, more)
    assert existing is not None  # recorded before the insert
    # Per file: [imported, duplicates (in ClickHouse already, or repeats)].
    counts = {file: [0, repeats] for file, repeats in prepared.repeats.items()}
    rejects: list[tuple[int, int, str, str, str]] = []
    if not refused and not existing:
        for file, imported in Counter(prepared.files).items():
            counts.setdefault(file, [0, 0])[0] += imported
    else:
        for n, event_id in enumerate(prepared.check.ids):
            file = prepared.files[n]
            per_file = counts.setdefault(file, [0, 0])
            if event_id in refused:
                reason = f"{REASON_REFUSED}: {refused[event_id]}"
                rejects.append((file, prepared.lines[n], "$", reason, _clip(prepared.rows[n])))
            else:
                per_file[1 if event_id in existing else 0] += 1
    state.chunk_done(idx, prepared.end_key, {f: (c[0], c[1]) for f, c in counts.items()}, rejects)
    return following[0] if following else None


def _second_text(ms: int) -> str:
    """The stored date text of the second holding `ms` (its start)."""
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _clip(row: bytes) -> str:
    text = row.decode("utf-8", "replace")
    return text if len(text) <= RAW_CLIP else text[:RAW_CLIP] + "…"


def _write_isolating(
    sink: Sink,
    ids: list[str],
    rows: list[bytes],
    refused: dict[str, str],
    token: str | None = None,
) -> None:
    """Insert `rows` (of `ids`, in the same order); a part ClickHouse refuses for its data
    (RowRejectedError) is halved until the refused row is alone, which goes into
    `refused` (id -> message) while the rest is inserted, as the flush isolates a bad
    row. Each insert's token is derived from its ids, so a re-run after a crash drives
    the same halves. `token`: `chunk_token(ids)`, when the caller has it already."""
    try:
        _write(sink, rows, token or chunk_token(ids))
    except RowRejectedError as exc:
        if len(rows) == 1:
            refused[ids[0]] = str(exc)
            return
        middle = len(rows) // 2
        _write_isolating(sink, ids[:middle], rows[:middle], refused)
        _write_isolating(sink, ids[middle:], rows[middle:], refused)


class _Opened:
    """`connect()`, retried while ClickHouse is busy or away (RetryableSinkError). Entered
    again while open (`write_chunk` with a sink opened ahead), the same sink; closed by
    the first exit."""

    def __init__(self, connect: Callable[[], AbstractContextManager[Sink]]) -> None:
        self.connect = connect
        self.manager: AbstractContextManager[Sink] | None = None
        self.sink: Sink | None = None

    def __enter__(self) -> Sink:
        if self.sink is not None:
            return self.sink
        delay = 0.5
        for attempt in range(WRITE_ATTEMPTS):
            manager = self.connect()
            try:
                sink = manager.__enter__()
            except RetryableSinkError:
                if attempt == WRITE_ATTEMPTS - 1:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self.manager, self.sink = manager, sink
            return sink
        raise AssertionError("unreachable")

    def __exit__(self, *exc: Any) -> None:
        manager, self.manager, self.sink = self.manager, None, None
        if manager is not None:
            manager.__exit__(*exc)


def _write(sink: Sink, rows: list[bytes], token: str) -> None:
    delay = 0.5
    for attempt in range(WRITE_ATTEMPTS):
        try:
            sink.write(rows, token)
            return
        except RetryableSinkError:
            if attempt == WRITE_ATTEMPTS - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
