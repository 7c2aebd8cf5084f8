"""The import, in three passes over its state (worker/importer/state.py), each resumable.

1. Read: every file, record by record, through its format's reader and the
   ingest task's validation; valid rows are appended to the state, bad ones
   recorded as rejects (file, line, reason), committed every `BATCH_RECORDS`
   with the line reached. A re-run skips the lines already read.
2. Durations (worker/importer/durations.py): once every file is read, the
   state is sorted and each session walked in `created_at` order.
3. Insert: rows in `created_at` order, `chunk_rows` at a time. For each
   chunk the importer asks ClickHouse which ids it already holds (counted as
   duplicates), records that answer, inserts the rest with a token derived
   from their ids (worker/importer/writer.py), then commits the chunk. A
   crash between the insert and the commit re-inserts the same rows with the
   same token (dropped by ClickHouse, and checked against the table first).

Live state is never touched: no Redis, no active visitors, no last views,
no pub/sub. ClickHouse is reached through `connect()`, opened for each chunk
and closed right after, so an embedded ClickHouse (chDB, one process at a
time) stays available to a flush worker between chunks.

When the insert pass ends, the rejects are written next to the state
(`rejects.ndjson`), the summary too (`summary.json`), and the state's rows
are deleted: running the same import again starts anew, and finds every row
already in ClickHouse.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.errors import EventBufferError
from worker.importer.durations import compute_durations
from worker.importer.isolation import ChildFailed, in_child
from worker.importer.readers import NEEDS_PROJECT, ReaderOptions, reader_for
from worker.importer.rows import (
    KIND_REGULAR,
    InvalidEvent,
    finish_row,
    kind_of,
    limits_for,
    validate,
)
from worker.importer.sessions import actor_group, session_group
from worker.importer.sources import export_name, open_export
from worker.importer.state import REJECTS_FILE, SUMMARY_FILE, ImportState, RowRecord
from worker.importer.writer import chunk_token, existing_ids
from worker.settings import Settings
from worker.sinks import RetryableSinkError, Sink

BATCH_RECORDS = 5_000
# With `isolate`, a child process inserts this many chunks, then the next one takes over.
CHUNKS_PER_CHILD = 10
DEFAULT_CHUNK_ROWS = 50_000
# A chunk whose insert fails as retryable (ClickHouse away, chDB held by a flush) is
# tried again this many times, with backoff, before the import stops (a re-run continues).
WRITE_ATTEMPTS = 8
RAW_CLIP = 2_000

Progress = Callable[[str, int, int, str], None]


class ImportError_(EventBufferError):
    """The import cannot start or go on: `usage` for bad arguments (nothing was done),
    else a failure a re-run of the same command continues after."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


@dataclass
class ImportOptions:
    files: Sequence[str]
    format: str = "eventbuffer"
    project_id: str | None = None
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    state_root: Path = Path("data/imports")
    # Each ClickHouse step in a child process (embedded ClickHouse: worker/importer/isolation.py).
    isolate: bool = False


@dataclass
class FileCounts:
    path: str
    lines: int = 0
    valid: int = 0
    rejected: int = 0
    imported: int = 0
    duplicates: int = 0


@dataclass
class ImportSummary:
    imported: int = 0
    duplicates: int = 0
    rejected: int = 0
    files: list[FileCounts] = field(default_factory=list)
    state: str = ""
    rejects_file: str = ""
    seconds: float = 0.0
    resumed: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "files": {
                f.path: {k: v for k, v in vars(f).items() if k != "path"} for f in self.files
            },
            "state": self.state,
            "rejects_file": self.rejects_file,
            "seconds": round(self.seconds, 3),
            "resumed": self.resumed,
        }


def import_key(options: ImportOptions, settings: Settings) -> tuple[str, list[str]]:
    """The state's key (a hash of the arguments) and the files' absolute paths."""
    paths = [os.path.abspath(p) for p in options.files]
    described = []
    for path in paths:
        stat = os.stat(path)
        described.append([path, stat.st_size, stat.st_mtime_ns])
    material = json.dumps(
        {
            "format": options.format,
            "project": options.project_id,
            "clickhouse": settings.clickhouse_url,
            "table": settings.clickhouse_table,
            "files": sorted(described),
            "chunk_rows": options.chunk_rows,
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:20], paths


def run_import(
    options: ImportOptions,
    settings: Settings,
    connect: Callable[[], AbstractContextManager[Sink]],
    progress: Progress | None = None,
) -> ImportSummary:
    if options.format in NEEDS_PROJECT and not options.project_id:
        raise ImportError_(
            f"--format {options.format} needs --project ID (its export has none)", usage=True
        )
    reader_for(options.format)  # an unknown format fails before any state is made
    for path in options.files:
        if not os.path.isfile(path):
            raise ImportError_(f"{path}: no such file", usage=True)
    started = time.perf_counter()
    key, paths = import_key(options, settings)
    directory = (options.state_root / key).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with _only_run(directory):
        resumed = (directory / "state.sqlite").exists()
        try:
            state = ImportState(directory)
        except sqlite3.Error as exc:
            raise ImportError_(f"the import's state in {directory}: {exc}") from exc
        try:
            summary = _run(state, options, settings, connect, progress, paths, resumed)
        except sqlite3.Error as exc:
            raise ImportError_(f"the import's state in {directory}: {exc}") from exc
        except ChildFailed as exc:
            raise ImportError_(f"writing to ClickHouse: {exc}") from exc
        finally:
            state.close()
    summary.seconds = time.perf_counter() - started
    return summary


@contextmanager
def _only_run(directory: Path) -> Iterator[None]:
    """One process per import (per state directory) at a time."""
    with open(directory / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ImportError_(
                f"an import with these arguments is running already (its state: {directory})"
            ) from None
        yield


def _run(
    state: ImportState,
    options: ImportOptions,
    settings: Settings,
    connect: Callable[[], AbstractContextManager[Sink]],
    progress: Progress | None,
    paths: list[str],
    resumed: bool,
) -> ImportSummary:
    directory = state.directory
    report = progress or (lambda phase, done, total, name: None)
    now = datetime.now(UTC).replace(microsecond=0)
    state.initialise(
        paths,
        {
            "imported_at": now.strftime("%Y-%m-%d %H:%M:%S.000"),
            "format": options.format,
            "project": options.project_id or "",
        },
    )
    _read_files(state, options, settings, report)
    if state.get("sorted") is None:
        report("sorting", 0, 1, "")
        state.sort_by_session()
        state.put("sorted", "1")
        report("sorting", 1, 1, "")
    if state.get("durations") is None:
        total = _count(state, "SELECT count() FROM rows WHERE grp != ''")
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            report("durations", done[0], total, "")

        compute_durations(state, advance)
        state.put("durations", "1")
    if state.get("time_sorted") is None:
        report("sorting by time", 0, 1, "")
        state.sort_by_time()
        state.put("time_sorted", "1")
        report("sorting by time", 1, 1, "")
    _insert(state, options, connect, report)
    summary = _summary(state, directory, resumed)
    _finish(state, directory, summary)
    return summary


def _count(state: ImportState, sql: str) -> int:
    return int(state.db.execute(sql).fetchone()[0])


def _read_files(
    state: ImportState, options: ImportOptions, settings: Settings, report: Progress
) -> None:
    limits = limits_for(settings)
    read = reader_for(options.format)
    for info in state.files():
        if info["done"]:
            continue
        idx, path = info["idx"], info["path"]
        size = os.path.getsize(path)
        reader_options = ReaderOptions(options.project_id, export_name(path))
        stream, position = open_export(path)
        rows: list[RowRecord] = []
        rejects: list[tuple[int, int, str, str, str]] = []
        line = info["line"]
        try:
            records = read(stream, reader_options, info["line"])
            try:
                for record in records:
                    line = record.number
                    if record.error is not None:
                        rejects.append((idx, line, "$", record.error, _clip(record.raw)))
                    else:
                        try:
                            valid = validate(record.data, limits, record.default_id)
                        except InvalidEvent as exc:
                            rejects.append((idx, line, exc.field, exc.problem, _clip(record.raw)))
                        else:
                            rows.append(_row_record(valid, record.actor, idx, line))
                    if len(rows) + len(rejects) >= BATCH_RECORDS:
                        state.add_batch(idx, line, rows, rejects)
                        rows, rejects = [], []
                        report("reading", position(), size, path)
            except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt gzip stream
                rejects.append(
                    (idx, line + 1, "$", f"the file cannot be read past here: {exc}", "")
                )
            state.add_batch(idx, line, rows, rejects, done=True)
            report("reading", size, size, path)
        finally:
            stream.close()


def _row_record(valid: Any, actor: str, file: int, line: int) -> RowRecord:
    kind = kind_of(valid.name)
    if actor and not valid.session_id:
        group = actor_group(valid.project_id, actor)
    elif valid.session_id and kind != KIND_REGULAR:
        group = session_group(valid.session_id)
    else:
        group = ""
    return (
        group,
        valid.created_ms,
        valid.id,
        kind,
        file,
        line,
        valid.project_id,
        valid.duration,
        valid.row,
    )


def _clip(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return text if len(text) <= RAW_CLIP else text[:RAW_CLIP] + "…"


def _ms_text(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:23]


def _insert(
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
    total = _count(state, "SELECT count() FROM rows")
    progress = state.get("inserted")
    if progress is None:
        idx, after = 0, (-(2**62), "")
    else:
        last = json.loads(progress)
        idx, after = last[0] + 1, (int(last[1]), str(last[2]))
    done = _count(state, "SELECT coalesce(sum(imported + duplicates), 0) FROM files")
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


def _summary(state: ImportState, directory: Path, resumed: bool) -> ImportSummary:
    summary = ImportSummary(state=str(directory), resumed=resumed)
    for info in state.files():
        counts = FileCounts(
            info["path"],
            lines=info["line"],
            valid=info["valid"],
            rejected=info["rejected"],
            imported=info["imported"],
            duplicates=info["duplicates"],
        )
        summary.files.append(counts)
        summary.imported += counts.imported
        summary.duplicates += counts.duplicates
        summary.rejected += counts.rejected
    return summary


def _finish(state: ImportState, directory: Path, summary: ImportSummary) -> None:
    """Rejects and summary next to the state; the state's rows go (a re-run starts anew)."""
    rejects = directory / REJECTS_FILE
    partial = rejects.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as out:
        for path, line, field_name, reason, raw in state.rejects():
            out.write(
                json.dumps(
                    {"file": path, "line": line, "field": field_name, "reason": reason, "raw": raw},
                    ensure_ascii=False,
                )
                + "\n"
            )
    os.replace(partial, rejects)
    summary.rejects_file = str(rejects)
    (directory / SUMMARY_FILE).write_text(json.dumps(summary.as_json(), indent=2) + "\n")
    state.close()  # the last connection: SQLite checkpoints and removes its WAL
    for name in ("state.sqlite-wal", "state.sqlite-shm", "state.sqlite"):
        (directory / name).unlink(missing_ok=True)


__all__ = [
    "ImportError_",
    "ImportOptions",
    "ImportSummary",
    "import_key",
    "run_import",
]
