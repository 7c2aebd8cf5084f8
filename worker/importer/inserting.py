"""The last pass of an import: rows into ClickHouse by created_at, each chunk exactly once.

For each chunk of `chunk_rows` rows (every copy of one event in the same
chunk) the importer asks ClickHouse which of its ids the table holds
(worker/importer/writer.py), records that answer in the state, inserts the
rest with a token derived from their ids, then commits the chunk with its
counts. A re-run after a crash re-drives the chunk with the recorded answer:
the same rows are counted the same way, the ids that landed are found by the
check, and a block it cannot see yet carries the same token.

ClickHouse is opened for each step and closed right after (a flush worker
gets an embedded ClickHouse between steps). With `isolate` (embedded
ClickHouse) the pass runs in child processes of `CHUNKS_PER_CHILD` chunks
(worker/importer/isolation.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

from worker.importer.import_state import ImportState
from worker.importer.isolation import in_child
from worker.importer.options import ImportOptions, Progress
from worker.importer.rows import finish_row
from worker.importer.writer import chunk_token, existing_ids
from worker.sinks import RetryableSinkError, Sink

# With `isolate`, a child process inserts this many chunks, then the next one takes over.
CHUNKS_PER_CHILD = 10
# A step that fails as retryable (ClickHouse away, chDB held by a flush) is tried again
# this many times, with backoff, before the import stops (a re-run continues).
WRITE_ATTEMPTS = 8


def _ms_text(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:23]


def insert(
    state: ImportState,
    options: ImportOptions,
    connect: Callable[[], AbstractContextManager[Sink]],
    report: Progress,
) -> None:
    """The insert pass; with `isolate`, in child processes of `CHUNKS_PER_CHILD` chunks each."""
    if not options.isolate:
        _insert_chunks(state, options, connect, report, None)
        return
    directory = state.directory
    while True:

        def chunks(progress: Progress) -> bool:
            child_state = ImportState(directory)  # its own connection, never the parent's
            try:
                return _insert_chunks(child_state, options, connect, progress, CHUNKS_PER_CHILD)
            finally:
                child_state.close()

        if in_child(chunks, report):
            return


def _insert_chunks(
    state: ImportState,
    options: ImportOptions,
    connect: Callable[[], AbstractContextManager[Sink]],
    report: Progress,
    max_chunks: int | None,
) -> bool:
    """Insert chunks from where the state says, `max_chunks` at most; True when all are in."""
    imported_at = state.get("imported_at") or ""
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
        candidates: dict[str, tuple[int, bytes, int | None, str | None]] = {}
        projects: set[str] = set()
        for _ms, event_id, file, project, dup, dur, sess, row in page:
            per_file = counts.setdefault(file, [0, 0])
            if dup or event_id in candidates:
                per_file[1] += 1
                continue
            candidates[event_id] = (file, row, dur, sess)
            projects.add(project)
        ids = list(candidates)
        first, last_text = _ms_text(page[0][0]), _ms_text(end_key[0])
        existing = state.chunk_intent(idx)
        with _Opened(connect) as sink:
            present = existing_ids(sink, ids, projects, first, last_text) if ids else set()
        if existing is None:
            existing = present
            state.record_intent(idx, existing)
        todo = [i for i in ids if i not in present]
        if todo:
            rows = [
                finish_row(candidates[i][1], imported_at, candidates[i][2], candidates[i][3])
                for i in todo
            ]
            with _Opened(connect) as sink:
                _write(sink, rows, chunk_token(todo))
            del rows
        for event_id, (file, _row, _dur, _sess) in candidates.items():
            counts[file][1 if event_id in existing else 0] += 1
        state.chunk_done(idx, end_key, {f: (c[0], c[1]) for f, c in counts.items()})
        done += len(page)
        report("inserting", done, total, "")
        idx += 1
        after = end_key
    return True


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
