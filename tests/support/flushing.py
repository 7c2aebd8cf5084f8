"""The flush as production runs it, for tests: `Flusher.process_buffer` and its failures."""

from __future__ import annotations

from typing import TypeVar

from worker.errors import EventBufferError
from worker.flush import Flusher

E = TypeVar("E", bound=EventBufferError)


def flush_error(flusher: Flusher, kind: type[E]) -> E:
    """Run `process_buffer`, which must fail on exactly one shard with a `kind` error."""
    summary = flusher.process_buffer()
    failed = summary.errors
    assert len(failed) == 1, f"expected one failed shard, got {summary.as_dict()}"
    error = failed[0].error
    assert isinstance(error, kind), f"expected {kind.__name__}, got {error!r}"
    return error
