"""The flush as production runs it, for tests: `Flusher.process_buffer` and its failures,
and `eventbuffer flush` in a process of its own."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from worker.errors import EventBufferError
from worker.flusher import Flusher

E = TypeVar("E", bound=EventBufferError)
ROOT = Path(__file__).resolve().parents[2]


def flush_error(flusher: Flusher, kind: type[E]) -> E:
    """Run `process_buffer`, which must fail on exactly one shard with a `kind` error."""
    summary = flusher.process_buffer()
    failed = summary.errors
    assert len(failed) == 1, f"expected one failed shard, got {summary.as_dict()}"
    error = failed[0].error
    assert isinstance(error, kind), f"expected {kind.__name__}, got {error!r}"
    return error


def eventbuffer_flush(
    env: Mapping[str, str], module: str = "worker.cli"
) -> tuple[subprocess.CompletedProcess[str], float]:
    """`eventbuffer flush` of this checkout (or `python -m <module> flush`) in a process
    and process group of its own, as an operator runs it; and how long it took.

    `env` must put this checkout on PYTHONPATH (tests.support.celery_procs.project_env does).
    """
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", module, "flush"],
        env={**env, "COLUMNS": "200"},  # rich: no wrapping in the captured output
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # a SIGKILL to its own group takes only it
    )
    return done, time.monotonic() - started
