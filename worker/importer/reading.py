"""The first pass of an import: every file read, validated, kept in the state.

Record by record through the format's reader (worker/importer/readers/) and
the ingest task's validation (worker/importer/rows.py). Valid rows are
appended to the state with what sorting and the durations need (their
session, or the actor whose sessions are derived); a record that is not a
valid event becomes a reject (file, line, field, reason, the record as read).
Both are committed every `BATCH_RECORDS` records with the line reached, so a
re-run skips what was read. A gzip file cut short or corrupt is read up to
the damage, which is one reject.
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Any

from worker.importer.import_state import ImportState, RowRecord
from worker.importer.options import ImportOptions, Progress
from worker.importer.readers import ReaderOptions, reader_for
from worker.importer.rows import KIND_REGULAR, InvalidEvent, kind_of, limits_for, validate
from worker.importer.sessions import actor_group, session_group
from worker.importer.sources import export_name, open_export
from worker.retention import REASON_PAST_RETENTION, PastRetention, check_retention
from worker.settings import Settings

BATCH_RECORDS = 5_000
RAW_CLIP = 2_000


def read_files(
    state: ImportState, options: ImportOptions, settings: Settings, report: Progress
) -> None:
    limits = limits_for(settings)
    now_ms = int(time.time() * 1000)
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
                            # Past the retention (the table's TTL would delete it at once).
                            check_retention(valid.created_ms, now_ms, settings.retention_days)
                        except PastRetention as exc:
                            problem = f"{REASON_PAST_RETENTION}: {exc.problem}"
                            rejects.append((idx, line, exc.field, problem, _clip(record.raw)))
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
