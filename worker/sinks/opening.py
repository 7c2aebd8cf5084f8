"""A sink opened on a thread while the flusher reads a claim's rows.

Opening an embedded ClickHouse session costs ~30 ms of chDB's own work, with
the GIL released; reading a claim's rows from Redis, decoding their heads
and sorting them is Python's work. A run's first claim used to do both one
after the other; now the sink opens beside the read. Only once a claim was
made: a tick with nothing to flush leaves the sink closed (on chDB, the
directory free for another process).

The open on the thread is an optimisation only: whatever it raises is
logged and dropped, and the first write opens the sink itself (raising what
it always did). The opening is waited for before the sink is closed, so no
session is opened after its close.
"""

from __future__ import annotations

import logging
import threading

from worker.sinks.base import Sink

log = logging.getLogger(__name__)


class Opening:
    """At most one open of `sink` on a thread, started by `start`, awaited by `join`."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Open the sink on a thread (once; later calls do nothing)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._open, name="sink-open", daemon=True)
            self._thread.start()

    def join(self) -> None:
        """Wait for the open started, if any (before the sink is closed)."""
        if self._thread is not None:
            self._thread.join()

    def _open(self) -> None:
        try:
            self._sink.open()
        except Exception as exc:  # the first write opens it again and raises
            log.info("opening the sink ahead of its first write failed: %s", exc)
