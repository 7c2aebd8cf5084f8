"""`eventbuffer import [--format F] [--project ID] [--json] FILE...`: history into ClickHouse.

The work is worker/importer's; this module parses the arguments, opens
ClickHouse as every command does (embedded ClickHouse only while a chunk is
written, retried while a flush worker holds it), shows progress on a
terminal and prints the summary (one JSON object with `--json`).
Exit 0 when every file was read to the end (rejected lines included);
anything that stops the import exits 1, and the same command continues it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, TaskID

from worker.cli.common import (
    CliError,
    clickhouse,
    is_embedded,
    progress_bar,
    require_embedded_data,
)
from worker.importer import ImportError_, ImportOptions, run_import
from worker.importer.readers import FORMATS
from worker.settings import Settings
from worker.sinks import Sink

# How long one chunk waits for embedded ClickHouse held by another process (a flush).
BUSY_WAIT_S = 60.0


def add_import_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "import",
        help="import history from export files into ClickHouse (resumable, exactly once)",
        description=(
            "Import events from export files (plain or .gz) straight into ClickHouse, exactly "
            "once: killed and run again with the same arguments, it continues; run again "
            "later, it finds what is there already. State, rejected lines and the summary "
            "are kept in EVENT_BUFFER_IMPORT_DIR/<key>/ (./data/imports by default)."
        ),
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="eventbuffer",
        help="the export's format (eventbuffer: NDJSON lines of ingest events)",
    )
    parser.add_argument(
        "--project", metavar="ID", default=None, help="project_id for formats that carry none"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.add_argument("files", nargs="+", metavar="FILE", help="export files, plain or gzip")
    parser.set_defaults(handler=cmd_import)


class _Bar:
    """The progress callback: one bar per file while reading, then one per pass."""

    LABELS = {
        "reading": "reading",
        "sorting": "sorting",
        "durations": "durations",
        "inserting": "inserting",
    }

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[tuple[str, str], TaskID] = {}

    def __call__(self, phase: str, done: int, total: int, name: str) -> None:
        key = (phase, name)
        task = self.tasks.get(key)
        if task is None:
            label = f"{self.LABELS.get(phase, phase)} {Path(name).name}".rstrip()
            unit = "B" if phase == "reading" else "rows"
            task = self.tasks[key] = self.progress.add_task(label, total=total, unit=unit)
        self.progress.update(task, completed=done, total=max(total, done))


def cmd_import(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    require_embedded_data(settings)
    options = ImportOptions(
        files=args.files,
        format=args.format,
        project_id=args.project,
        chunk_rows=settings.import_chunk_rows,
        state_root=Path(settings.import_dir),
        # Embedded ClickHouse is opened by a child process per step, never by this one.
        isolate=is_embedded(settings),
    )

    @contextmanager
    def connect() -> Iterator[Sink]:
        with clickhouse(settings, wait_s=BUSY_WAIT_S) as sink:
            yield sink

    show = not args.json and console.is_terminal
    try:
        with progress_bar(console, disable=not show) as progress:
            summary = run_import(options, settings, connect, _Bar(progress))
    except ImportError_ as exc:
        raise CliError(str(exc), 2 if exc.usage else 1) from None
    if args.json:
        print(json.dumps(summary.as_json(), ensure_ascii=False))
        return 0
    console.print(
        f"Imported {summary.imported:,} events in {summary.seconds:.1f} s "
        f"({summary.imported / max(summary.seconds, 1e-9):,.0f}/s): "
        f"{summary.duplicates:,} already in ClickHouse, {summary.rejected:,} rejected."
    )
    for counts in summary.files:
        console.print(
            f"  {counts.path}: {counts.lines:,} lines, {counts.imported:,} imported, "
            f"{counts.duplicates:,} duplicates, {counts.rejected:,} rejected"
        )
    if summary.rejected:
        console.print(f"Rejected lines (file, line, reason): {summary.rejects_file}")
    if summary.set_aside:
        console.print(
            f"A state an earlier release left for these files was set aside, not resumed: "
            f"{summary.set_aside}"
        )
    return 0
