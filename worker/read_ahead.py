"""The next claim's rows, read and decoded while this claim's chunks are inserted.

A flush is a chain of claims: claim, insert its chunks, ack, claim again.
ClickHouse sits idle while the next claim's rows are read from Redis and
their heads decoded, and Redis and Python sit idle during the inserts. So
after each claim the flusher reads the rows queued behind it on a thread
(`Scripts.read_ahead`: one MULTI of HGET + LRANGE) and decodes their heads
there, while the inserts run (chDB and the ClickHouse driver's socket
release the GIL). The next claim takes those rows only if it starts at the
position they were read from (`QueueRows.take`): a row's position names it
for good (claim.lua says why), so rows read ahead are the claim's rows or
are not used at all. A read ahead that fails is dropped: the claim then
reads its rows itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

import msgspec

from worker.events import RowHead, decode_row_head
from worker.keys import ShardKeys
from worker.scripts import Claim, QueueRows, Scripts

log = logging.getLogger(__name__)

Head = RowHead | str  # a row's head, or why the row is not a JSON row


def decode_heads(rows: Sequence[bytes]) -> list[Head]:
    """Each row's head (id, created_at, project_id), or the decoding error's text."""
    heads: list[Head] = []
    for raw in rows:
        try:
            heads.append(decode_row_head(raw))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            heads.append(str(exc))
    return heads


@dataclass(frozen=True)
class Decoded:
    """Rows read ahead, with their heads."""

    rows: QueueRows
    heads: list[Head]

    def heads_of(self, claim: Claim) -> list[Head]:
        """The heads of the claim's first rows, as many as came from these rows."""
        return self.heads[: len(self.rows.take(claim.position, len(claim.rows)))]


class ReadAhead:
    """One shard's read ahead: at most one read in flight, on one thread."""

    def __init__(self, scripts: Scripts, shard: ShardKeys, count: int) -> None:
        self._scripts = scripts
        self._shard = shard
        self._count = count
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"read-ahead-{shard.shard}")
        self._pending: Future[Decoded] | None = None

    def start(self, claim: Claim) -> None:
        """Read the rows queued behind `claim`, replacing any read not taken."""
        self._pending = self._pool.submit(self._read, claim)

    def take(self) -> Decoded | None:
        """The last read started (waiting for it), or None: none started, or it failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            return pending.result()
        except Exception as exc:  # an optimisation only: the claim reads its own rows
            log.info("read ahead of shard %d failed: %s", self._shard.shard, exc)
            return None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _read(self, claim: Claim) -> Decoded:
        rows = self._scripts.read_ahead(self._shard, claim, self._count)
        return Decoded(rows, decode_heads(rows.rows))
