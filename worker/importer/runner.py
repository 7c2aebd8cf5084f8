"""The import, in three passes over its state (worker/importer/import_state.py), each resumable.

1. Read (worker/importer/reading.py): every file, record by record, through
   its format's reader and the ingest task's validation; valid rows are
   appended to the state (their bytes to a data file per export file, cut
   back to its committed length when the state is opened again), bad ones
   recorded as rejects (file, line, reason), committed with the line
   reached. A re-run skips the lines already read.
2. Durations (worker/importer/durations.py): once every file is read, the
   state is sorted and each session walked in `created_at` order. Then the
   rows (where their bytes are, and the durations' fixes) are sorted by
   `created_at` into a table of their own, in one transaction.
3. Insert (worker/importer/inserting.py): that table in order,
   `chunk_rows` at a time, each row's bytes read from its data file and
   the durations applied. For each
   chunk the importer asks ClickHouse which ids it already holds (counted as
   duplicates), records that answer, inserts the rest with a token derived
   from their ids (worker/importer/writer.py), then commits the chunk. A
   crash between the insert and the commit re-inserts the same rows with the
   same token (dropped by ClickHouse, and checked against the table first).

Live state is never touched: no Redis, no active visitors, no last views,
no pub/sub. ClickHouse is reached through `connect()`, opened for each step
of a chunk and closed right after, so an embedded ClickHouse (chDB, one
process at a time) stays available to a flush worker between them.

When the insert pass ends, the rejects are written next to the state
(`rejects.ndjson`), the summary too (`summary.json`), and the state's rows
(and data files) are deleted: running the same import again starts anew, and finds every row
already in ClickHouse.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.errors import EventBufferError
from worker.importer.durations import compute_durations
from worker.importer.import_state import REJECTS_FILE, SUMMARY_FILE, ImportState, data_path
from worker.importer.inserting import Writer, insert, start_insert
from worker.importer.isolation import ChildFailed
from worker.importer.options import DEFAULT_CHUNK_ROWS, ImportOptions, Progress
from worker.importer.readers import NEEDS_PROJECT, reader_for
from worker.importer.reading import read_files
from worker.settings import Settings
from worker.sinks import Sink


class ImportError_(EventBufferError):
    """The import cannot start or go on: `usage` for bad arguments (nothing was done),
    else a failure a re-run of the same command continues after."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


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
    # A state an earlier release left here, not resumed (another layout): where it went.
    set_aside: str = ""
    # Seconds each pass took in this run (a resumed run times only what it did).
    passes: dict[str, float] = field(default_factory=dict)

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
            "state_set_aside": self.set_aside,
            "passes": {name: round(seconds, 3) for name, seconds in self.passes.items()},
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
        if state.set_aside is not None:
            resumed = False
        try:
            summary = _run(state, options, settings, connect, progress, paths, resumed)
            if state.set_aside is not None:
                summary.set_aside = str(state.set_aside)
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
    passes: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now_ = time.perf_counter()
        passes[name] = now_ - clock
        clock = now_

    read_files(state, options, settings, report)
    lap("reading")
    writer = start_insert(options, connect)
    try:
        _passes(state, options, report, lap, writer)
    finally:
        writer.close()  # with chDB: its child processes end
    summary = _summary(state, directory, resumed)
    _finish(state, directory, summary)
    lap("finishing")
    summary.passes = passes
    return summary


def _passes(
    state: ImportState,
    options: ImportOptions,
    report: Progress,
    lap: Callable[[str], None],
    writer: Writer,
) -> None:
    """Sorting, durations, inserting (the passes after reading)."""
    if state.get("sorted") is None:
        report("sorting", 0, 1, "")
        state.sort_by_session()
        state.put("sorted", "1")
        report("sorting", 1, 1, "")
    lap("sorting")
    if state.get("durations") is None:
        total = state.count("SELECT count() FROM rows WHERE grp != ''")
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            report("durations", done[0], total, "")

        compute_durations(state, advance)
        state.put("durations", "1")
    lap("durations")
    if state.get("time_sorted") is None:
        report("sorting by time", 0, 1, "")
        state.sort_by_time()
        report("sorting by time", 1, 1, "")
    lap("sorting by time")
    insert(state, options, writer, report)
    lap("inserting")


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
    # After the state: a data file a kill leaves here, the next run (anew) cuts to nothing.
    for idx in range(len(summary.files)):
        data_path(directory, idx).unlink(missing_ok=True)


__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "ImportError_",
    "ImportOptions",
    "ImportSummary",
    "import_key",
    "run_import",
]
