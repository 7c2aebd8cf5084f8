"""What an import is asked to do, and how it reports progress."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CHUNK_ROWS = 50_000

# (phase, done, total, file): "reading" counts a file's bytes on disk, the passes rows.
Progress = Callable[[str, int, int, str], None]


@dataclass
class ImportOptions:
    files: Sequence[str]
    format: str = "eventbuffer"
    project_id: str | None = None
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    state_root: Path = Path("data/imports")
    # Each ClickHouse step in a child process (embedded ClickHouse: worker/importer/isolation.py).
    isolate: bool = False
