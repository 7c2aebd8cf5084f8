"""The first pass of an import: every file read, validated, kept in the state.

Record by record through the format's reader (worker/importer/readers/) and
the ingest task's validation (worker/importer/rows.py). Valid rows, as they
are inserted (`imported_at` is set here already), are appended to the
file's data file (worker/importer/import_state.py), and what sorting and
the durations need (their session, or the actor whose sessions are derived,
and where the row's bytes are) to the state; a record that is not a valid
event becomes a reject (file, line, field, reason, the record as read).
Both are committed every `BATCH_RECORDS` records with the line reached and
the data file's length (its bytes written first), so a re-run skips what
was read. A gzip file cut short or corrupt is read up to the
damage, which is one reject.

Validation is the pass's cost (Python, per record), so with several files
left and more than one CPU the files are read by up to `READ_WORKERS` forked
worker processes, a file each at a time. A worker appends its file's rows to
that file's data file itself; only this process writes the SQLite state: a
worker sends its file's batches (without the rows' bytes), in order, over a
bounded queue (bounded memory), and this process commits each with the line
and data length it reaches. A worker
dies with the importer (PR_SET_PDEATHSIG): a killed import loses only the
batches not yet committed, which the re-run reads again.
"""

from __future__ import annotations

import marshal
import multiprocessing
import os
import queue
import sqlite3
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from worker.importer.import_state import ImportState, RowRecord, data_path
from worker.importer.isolation import die_with_parent
from worker.importer.options import ImportOptions, Progress
from worker.importer.readers import ReaderOptions, reader_for
from worker.importer.rows import KIND_REGULAR, InvalidEvent, kind_of, limits_for, validate
from worker.importer.sessions import actor_group, session_group
from worker.importer.sources import export_name, open_export
from worker.retention import REASON_PAST_RETENTION, PastRetention, check_retention
from worker.settings import Settings

BATCH_RECORDS = 10_000
RAW_CLIP = 2_000
# At most this many reader processes (never more than the CPUs or the files left).
READ_WORKERS = 4
# Batches in flight from the workers to this process: what bounds the pass's memory.
QUEUE_BATCHES = 4

Reject = tuple[int, int, str, str, str]
# (file, line reached, rows, rejects, done, bytes of the file read, its size, its path,
# the data file's length with the batch's rows)
Batch = tuple[int, int, list[RowRecord], list[Reject], bool, int, int, str, int]


def read_files(
    state: ImportState, options: ImportOptions, settings: Settings, report: Progress
) -> None:
    imported_at = state.get("imported_at") or None
    todo = [info for info in state.files() if not info["done"]]
    workers = min(READ_WORKERS, len(todo), len(os.sched_getaffinity(0)))
    now_ms = int(time.time() * 1000)
    directory = state.directory
    if workers <= 1:
        for info in todo:
            for batch in _read_file(info, directory, options, settings, now_ms, imported_at):
                _commit(state, batch, report)
        return
    for batch in _in_workers(todo, workers, directory, options, settings, now_ms, imported_at):
        _commit(state, batch, report)


def _commit(state: ImportState, batch: Batch, report: Progress) -> None:
    idx, line, rows, rejects, done, position, size, path, data = batch
    state.add_batch(idx, line, rows, rejects, data, done=done)
    report("reading", position, size, path)


def _in_workers(
    todo: list[dict[str, Any]],
    workers: int,
    directory: Path,
    options: ImportOptions,
    settings: Settings,
    now_ms: int,
    imported_at: str | None,
) -> Iterator[Batch]:
    """The batches of every file in `todo`, read by `workers` forked processes; each
    file's batches in order. A worker that fails stops the pass with its error."""
    context = multiprocessing.get_context("fork")
    files: Any = context.Queue()
    batches: Any = context.Queue(QUEUE_BATCHES)
    for info in todo:
        files.put(info)
    for _ in range(workers):
        files.put(None)
    processes = [
        context.Process(
            target=_worker,
            args=(files, batches, directory, options, settings, now_ms, imported_at),
            daemon=True,
        )
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    running = workers
    try:
        while running:
            try:
                message = batches.get(timeout=1.0)
            except queue.Empty:
                if not all(p.is_alive() or p.exitcode == 0 for p in processes):
                    raise OSError("a reader process died") from None
                continue
            if message[0] == "batch":
                yield marshal.loads(message[1])
            elif message[0] == "error":
                raise OSError(message[1])
            else:  # "end"
                running -= 1
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()
        files.close()
        batches.close()


def _worker(
    files: Any,
    batches: Any,
    directory: Path,
    options: ImportOptions,
    settings: Settings,
    now_ms: int,
    imported_at: str | None,
) -> None:
    die_with_parent()
    try:
        while (info := files.get()) is not None:
            for batch in _read_file(info, directory, options, settings, now_ms, imported_at):
                # Marshalled: a batch is builtins only (tuples, lists, str, int),
                # which marshal packs and unpacks in about half pickle's time.
                batches.put(("batch", marshal.dumps(batch)))
    except BaseException as exc:
        batches.put(("error", f"{type(exc).__name__}: {exc}"))
    else:
        batches.put(("end",))
    batches.close()
    batches.join_thread()


def _read_file(
    info: dict[str, Any],
    directory: Path,
    options: ImportOptions,
    settings: Settings,
    now_ms: int,
    imported_at: str | None,
) -> Iterator[Batch]:
    """One file's batches from the line the state has reached, the last one `done`; each
    batch's rows are in the file's data file (written, in the OS's page cache) before it
    is yielded. The data file is at the state's committed length (`ImportState.
    initialise` cut it back): the rows are appended from there."""
    limits = limits_for(settings)
    read = reader_for(options.format)
    idx, path = info["idx"], info["path"]
    size = os.path.getsize(path)
    reader_options = ReaderOptions(options.project_id, export_name(path))
    stream, position = open_export(path)
    rows: list[RowRecord] = []
    rejects: list[Reject] = []
    line = info["line"]
    data = info["data"]  # the data file's length, with the rows of `rows`
    pieces: list[bytes] = []  # the bytes of `rows`, not yet written
    try:
        out = open(data_path(directory, idx), "ab")  # noqa: SIM115 - closed below
    except OSError:
        stream.close()
        raise
    try:
        records = read(stream, reader_options, info["line"])
        try:
            for record in records:
                line = record.number
                if record.error is not None:
                    rejects.append((idx, line, "$", record.error, _clip(record.raw)))
                else:
                    try:
                        valid = validate(record.data, limits, record.default_id, imported_at)
                        # Past the retention (the table's TTL would delete it at once).
                        check_retention(valid.created_ms, now_ms, settings.retention_days)
                    except PastRetention as exc:
                        problem = f"{REASON_PAST_RETENTION}: {exc.problem}"
                        rejects.append((idx, line, exc.field, problem, _clip(record.raw)))
                    except InvalidEvent as exc:
                        rejects.append((idx, line, exc.field, exc.problem, _clip(record.raw)))
                    else:
                        stored = valid.row
                        rows.append(_row_record(valid, record.actor, idx, line, data))
                        pieces.append(stored)
                        data += len(stored)
                if len(rows) + len(rejects) >= BATCH_RECORDS:
                    _append(out, pieces)
                    yield idx, line, rows, rejects, False, position(), size, path, data
                    rows, rejects, pieces = [], [], []
        except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt gzip stream
            rejects.append((idx, line + 1, "$", f"the file cannot be read past here: {exc}", ""))
        _append(out, pieces)
        yield idx, line, rows, rejects, True, size, size, path, data
    finally:
        out.close()
        stream.close()


def _append(out: BinaryIO, pieces: list[bytes]) -> None:
    """The rows' bytes written to the data file (not an OSError: that, inside the loop
    over the records, means the export cannot be read further)."""
    try:
        out.write(b"".join(pieces))
        out.flush()
    except OSError as exc:
        raise sqlite3.OperationalError(f"writing {out.name}: {exc}") from exc


def _row_record(valid: Any, actor: str, file: int, line: int, offset: int) -> RowRecord:
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
        offset,
        len(valid.row),
    )


def _clip(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return text if len(text) <= RAW_CLIP else text[:RAW_CLIP] + "…"
