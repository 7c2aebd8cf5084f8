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
With `isolate` (embedded ClickHouse) the pass runs in child processes of
`CHUNKS_PER_CHILD` chunks (worker/importer/isolation.py).
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

from worker.importer.import_state import ImportState
from worker.importer.isolation import Child
from worker.importer.options import ImportOptions, Progress
from worker.importer.rows import finish_row
from worker.importer.writer import chunk_token, existing_ids
from worker.sinks import RetryableSinkError, RowRejectedError, Sink

# With `isolate`, a child process inserts this many chunks, then the next one takes over.
CHUNKS_PER_CHILD = 10
# A step that fails as retryable (ClickHouse away, chDB held by a flush) is tried again
# this many times, with backoff, before the import stops (a re-run continues).
WRITE_ATTEMPTS = 8
# The reason of a row ClickHouse refused (after its validation here), in the rejects.
REASON_REFUSED = "refused by ClickHouse"
RAW_CLIP = 2_000


def start_insert(
    state: ImportState,
    options: ImportOptions,
    connect: Callable[[], AbstractContextManager[Sink]],
) -> Child | None:
    """With `isolate`, the insert pass's first child, forked now: it loads chDB while this
    process sorts and walks the durations, and inserts when `insert` lets it."""
    if not options.isolate:
        return None
    return Child(_chunks_in_child(state, options, connect), warm=_load_chdb)


def insert(
    state: ImportState,
    options: ImportOptions,
    connect: Callable[[], AbstractContextManager[Sink]],
    report: Progress,
    first: Child | None = None,
) -> None:
    """The insert pass; with `isolate`, in child processes of `CHUNKS_PER_CHILD` chunks each
    (the first one `first`, when `start_insert` forked it)."""
    if not options.isolate:
        _insert_chunks(state, options, connect, report, None)
        return
    work = _chunks_in_child(state, options, connect)
    child = first
    while not (child or Child(work)).result(report):
        child = None


def _chunks_in_child(
    state: ImportState,
    options: ImportOptions,
    connect: Callable[[], AbstractContextManager[Sink]],
) -> Callable[[Progress], bool]:
    directory = state.directory

    def chunks(progress: Progress) -> bool:
        child_state = ImportState(directory)  # its own connection, never the parent's
        try:
            return _insert_chunks(child_state, options, connect, progress, CHUNKS_PER_CHILD)
        finally:
            child_state.close()

    return chunks


def _load_chdb() -> None:
    importlib.import_module("chdb.session")


def _insert_chunks(
    state: ImportState,
    options: ImportOptions,
    connect: Callable[[], AbstractContextManager[Sink]],
    report: Progress,
    max_chunks: int | None,
) -> bool:
    """Insert chunks from where the state says, `max_chunks` at most; True when all are in."""
    total = state.count("SELECT count() FROM rows")
    progress = state.get("inserted")
    if progress is None:
        idx, after = 0, (-(2**62), "")
    else:
        last = json.loads(progress)
        idx, after = last[0] + 1, (int(last[1]), str(last[2]))
    done = state.count("SELECT coalesce(sum(imported + duplicates), 0) FROM files")
    report("inserting", done, total, "")
    chunks = 0
    while page := state.time_page(after, options.chunk_rows):
        if max_chunks is not None and chunks == max_chunks:
            return False
        chunks += 1
        end_key = (int(page[-1][0]), str(page[-1][1]))
        counts: dict[int, list[int]] = {}
        # id -> (file, line, row as inserted)
        candidates: dict[str, tuple[int, int, bytes]] = {}
        projects: set[str] = set()
        for _ms, event_id, file, line, project, dup, own, dur, sess, row in page:
            per_file = counts.setdefault(file, [0, 0])
            if dup or event_id in candidates:
                per_file[1] += 1
                continue
            candidates[event_id] = (file, line, finish_row(row, own, dur, sess))
            projects.add(project)
        ids = list(candidates)
        existing = state.chunk_intent(idx)
        refused: dict[str, str] = {}
        with _Opened(connect) as sink:
            # Seconds around the chunk's created_at range: a server whose created_at
            # is a DateTime (to the second) takes these bounds too.
            first, end = _second_text(page[0][0]), _second_text(end_key[0] + 1000)
            present = existing_ids(sink, ids, projects, first, end) if ids else set()
            if existing is None:
                existing = present
                state.record_intent(idx, existing)
            todo = [i for i in ids if i not in present]
            if todo:
                _write_isolating(sink, [(i, candidates[i][2]) for i in todo], refused)
        rejects: list[tuple[int, int, str, str, str]] = []
        for event_id, (file, line, row) in candidates.items():
            if event_id in refused:
                reason = f"{REASON_REFUSED}: {refused[event_id]}"
                rejects.append((file, line, "$", reason, _clip(row)))
            else:
                counts[file][1 if event_id in existing else 0] += 1
        state.chunk_done(idx, end_key, {f: (c[0], c[1]) for f, c in counts.items()}, rejects)
        done += len(page)
        report("inserting", done, total, "")
        idx += 1
        after = end_key
    return True


def _second_text(ms: int) -> str:
    """The stored date text of the second holding `ms` (its start)."""
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _clip(row: bytes) -> str:
    text = row.decode("utf-8", "replace")
    return text if len(text) <= RAW_CLIP else text[:RAW_CLIP] + "…"


def _write_isolating(sink: Sink, rows: list[tuple[str, bytes]], refused: dict[str, str]) -> None:
    """Insert (id, row) pairs; a part ClickHouse refuses for its data (RowRejectedError)
    is halved until the refused row is alone, which goes into `refused` (id -> message)
    while the rest is inserted, as the flush isolates a bad row. Each insert's token is
    derived from its ids, so a re-run after a crash drives the same halves."""
    try:
        _write(sink, [row for _, row in rows], chunk_token(i for i, _ in rows))
    except RowRejectedError as exc:
        if len(rows) == 1:
            refused[rows[0][0]] = str(exc)
            return
        middle = len(rows) // 2
        _write_isolating(sink, rows[:middle], refused)
        _write_isolating(sink, rows[middle:], refused)


class _Opened:
    """`connect()`, retried while ClickHouse is busy or away (RetryableSinkError)."""

    def __init__(self, connect: Callable[[], AbstractContextManager[Sink]]) -> None:
        self.connect = connect
        self.manager: AbstractContextManager[Sink] | None = None

    def __enter__(self) -> Sink:
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
            self.manager = manager
            return sink
        raise AssertionError("unreachable")

    def __exit__(self, *exc: Any) -> None:
        if self.manager is not None:
            self.manager.__exit__(*exc)


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
