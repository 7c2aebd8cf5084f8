"""One reader per export format: records of a file, mapped to eventbuffer events.

A reader turns an open export into `Record`s, numbered from 1 in the file
(lines for NDJSON, rows for CSV), skipping the first `skip` of them (an
import resumed after a crash). A record holds what the importer validates
with the ingest task's model (worker/importer/rows.py): the event as JSON
bytes or a dict, the id it gets when it has none (derived from the source's
own id, else from its content and place), and, for sources without
sessions, the actor (device or profile) whose sessions are derived by a
30-minute gap. A record that cannot be mapped carries the reason instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple, Protocol

from worker.importer.sources import iter_lines


class Record(NamedTuple):
    number: int  # 1-based, the line (NDJSON) or data row (CSV) in its file
    data: Any  # JSON bytes or a dict for worker/importer/rows.validate; None with `error`
    default_id: Callable[[], str] | None  # the id when the event carries none
    actor: str  # "" or the device/profile whose sessions are derived by gap
    error: str | None  # why the record could not be mapped (it is rejected)
    raw: bytes | str  # the record as read, for the rejects file


@dataclass(frozen=True)
class ReaderOptions:
    project_id: str | None  # --project
    name: str  # the export's name for derived ids (worker/importer/sources.export_name)


class Reader(Protocol):
    def __call__(self, stream: BinaryIO, options: ReaderOptions, skip: int) -> Iterator[Record]: ...


FORMATS = ("eventbuffer", "mixpanel", "amplitude", "umami")
# Formats whose records carry no project: --project is required.
NEEDS_PROJECT = frozenset({"mixpanel", "amplitude"})


def reader_for(name: str) -> Reader:
    """The `read` function of worker/importer/readers/<name>.py."""
    if name not in FORMATS:
        raise ValueError(f"unknown import format {name!r}; one of {', '.join(FORMATS)}")
    module = importlib.import_module(f"worker.importer.readers.{name}")
    read: Reader = module.read
    return read


def lines(stream: BinaryIO, skip: int) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines of an NDJSON stream with their numbers, after the first `skip` lines."""
    for number, line in enumerate(iter_lines(stream), 1):
        if number <= skip:
            continue
        stripped = line.strip()
        if stripped:
            yield number, stripped
