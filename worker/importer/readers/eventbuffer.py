"""`--format eventbuffer`: NDJSON lines of the event objects the ingest task takes.

A line goes to validation as it is (bytes): the same model, the same limits,
the same problems named. An event without an `id` gets one derived from the
export's name, its line number and the line's bytes. With `--project`, an
event without a `project_id` gets that one.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any, BinaryIO

import msgspec

from worker.importer.readers import ReaderOptions, Record, lines
from worker.importer.rows import stable_id


def read(stream: BinaryIO, options: ReaderOptions, skip: int) -> Iterator[Record]:
    name, project = options.name, options.project_id
    for number, line in lines(stream, skip):
        data: Any = line
        if project is not None:
            data = _with_project(line, project)
        yield Record(
            number, data, partial(stable_id, "eventbuffer", name, number, line), "", None, line
        )


def _with_project(line: bytes, project: str) -> Any:
    """The line as a dict with `project_id` filled in; the bytes when it is no JSON object
    (validation then names the problem as the ingest task does)."""
    try:
        obj = msgspec.json.decode(line)
    except (msgspec.DecodeError, RecursionError):
        return line
    if isinstance(obj, dict) and "project_id" not in obj:
        obj["project_id"] = project
        return obj
    return line
