"""eventbuffer whose flush dies for real in the middle: SIGKILL after the N-th chunk INSERT.

    celery -A tests.support.dying_flush worker -Q flush ...   a worker whose process_buffer dies
    python -m tests.support.dying_flush flush                 an `eventbuffer flush` that dies

With `DIE_AFTER_WRITES=N` in the environment, the sink every flush of the
process opens (`worker.runtime.sink`, a real one from CLICKHOUSE_URL) sends
SIGKILL to the whole process group right after the process's N-th
successful INSERT: the rows of that chunk are in ClickHouse, the claim is
not acknowledged, and the flush lock stays behind with its holder dead (a
worker's main process and its pool alike, as an OOM killer or a lost
container would). Unset or 0: never. Each INSERT is reported on stderr as
one JSON line, {"write": token}.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Sequence

from tests.support.sinks import DelegatingSink
from worker import runtime
from worker.celery import app
from worker.sinks import Sink

__all__ = ["app"]

_real_sink = runtime.sink


class DyingSink(DelegatingSink):
    writes = 0  # in this process, over every sink it opens

    def write(self, rows: Sequence[bytes], token: str) -> None:
        self.inner.write(rows, token)
        DyingSink.writes += 1
        print(json.dumps({"write": token}), file=sys.stderr, flush=True)
        if DyingSink.writes == int(os.environ.get("DIE_AFTER_WRITES") or 0):
            os.killpg(os.getpgrp(), signal.SIGKILL)


def _dying_sink() -> Sink:
    return DyingSink(_real_sink())


runtime.sink = _dying_sink  # what runtime.flusher() builds its flusher with

if __name__ == "__main__":
    from worker.cli import main

    sys.exit(main(sys.argv[1:]))
