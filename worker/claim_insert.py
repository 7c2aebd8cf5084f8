"""A claim's rows into ClickHouse: chunks with dedup tokens, rejected chunks halved, the
poison guard.

Chunk *i* of a claim is inserted with the token `<claim id>:<i>`. A chunk
ClickHouse rejects for its data is halved, the halves getting tokens derived
from the parent's (`<token>.0`, `<token>.1`), until the bad rows stand alone
and become dead letters. The halving is recorded in the claim before the
halves are written (worker/claims.py), and a re-drive goes straight to the
halves of a recorded chunk: had it retried the whole chunk and ClickHouse now
took it (the table was fixed), the rows its halves had written would land a
second time, under a token ClickHouse has not seen.

The poison guard: when ClickHouse rejects more than
`EVENT_BUFFER_DLQ_MAX_RATIO` of a claim's rows (and at least
`POISON_GUARD_MIN_ROWS`), the rows are not at fault but the table is (a
schema mismatch after a bad deploy): the insert stops with
`PoisonGuardError` before anything is dead-lettered, and the claim stays
open for a re-drive once the cause is fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from worker.claims import Claims
from worker.keys import ShardKeys
from worker.lock import FlushLock
from worker.sinks.base import PermanentSinkError, RowRejectedError, Sink

# The poison guard needs this many rejected rows before it stops a flush, so a
# small claim with a few bad rows still dead-letters them.
POISON_GUARD_MIN_ROWS = 10


class PoisonGuardError(PermanentSinkError):
    """ClickHouse rejected most of a claim: stop instead of dead-lettering it.

    Raised before any dead letter is written; the claim stays open. Rows of
    the claim already inserted stay in ClickHouse: the re-drive takes the
    same chunks, halves and tokens, so ClickHouse drops them as duplicates.
    """

    def __init__(
        self, message: str, *, rejected: int, rows: int, first_error: str, code: int | None
    ) -> None:
        super().__init__(message, code)
        self.rejected = rejected
        self.rows = rows
        self.first_error = first_error


# (row, why ClickHouse refused it) -> a dead letter's bytes
DeadLetterer = Callable[[bytes, str], bytes]
# (rows, dedup token) -> rows dropped instead of inserted (None: none): the INSERT of a
# chunk (the flusher's is fenced: the rows of forgotten people are dropped right before
# it, worker/privacy)
ChunkWriter = Callable[[Sequence[bytes], str], int | None]


class ClaimInsert:
    """The rows of one claim on their way into ClickHouse, and what was rejected."""

    def __init__(
        self,
        *,
        sink: Sink,
        claims: Claims,
        shard: ShardKeys,
        claim_id: str,
        rows: Sequence[bytes],
        split: set[str],
        lock: FlushLock,
        dlq_max_ratio: float,
        dead_letter: DeadLetterer,
        write: ChunkWriter | None = None,
    ) -> None:
        self.sink = sink
        self.write = write if write is not None else sink.write
        # A sink that can prepare a chunk (ChdbSink: its file) while another is inserted.
        self.prepare: Callable[..., None] | None = getattr(sink, "prepare", None)
        self.claims = claims
        self.shard = shard
        self.claim_id = claim_id
        self.rows = rows
        # Tokens of chunks halved after a rejection, by this flush or an earlier one of the claim.
        self.split = split
        self.lock = lock
        self.dlq_max_ratio = dlq_max_ratio
        self.dead_letter = dead_letter
        self.rejected: set[int] = set()  # offsets into rows
        self.dead: list[bytes] = []  # dead letters of the rejected rows
        self.first_rejection: RowRejectedError | None = None
        self.fenced = 0  # rows the writer dropped (a forgotten person's) instead of inserting

    def chunk(self, index: int, offsets: range, following: range | None = None) -> None:
        """Insert chunk `index`, the rows at `offsets`; the sink prepares the chunk
        `following` (the rows of chunk `index + 1`) meanwhile, where it can."""
        if following:
            self.ahead(following, index + 1)
        self._write(offsets, f"{self.claim_id}:{index}")

    def ahead(self, offsets: range, index: int, *, now: bool = False) -> None:
        """Chunk `index`, the rows at `offsets`, will be inserted soon: the sink prepares it
        on its thread (`now`: on this one, before returning), where it can (not a chunk
        a flush halved: it is not written whole)."""
        if self.prepare is not None and f"{self.claim_id}:{index}" not in self.split:
            rows = self.rows[offsets.start : offsets.stop]
            if now:
                self.prepare(rows, now=True)
            else:
                self.prepare(rows)

    def _write(self, offsets: range, token: str) -> None:
        """Insert rows[offsets]; on a row-level rejection, halve until the bad rows are alone."""
        if token not in self.split:
            try:
                self.fenced += self.write(self.rows[offsets.start : offsets.stop], token) or 0
                self.lock.progress()
                return
            except RowRejectedError as exc:
                self.lock.progress()  # ClickHouse answered: not a hung insert
                if len(offsets) == 1:
                    self._reject(offsets[0], exc)
                    return
            self.lock.check()
            self.claims.record_split(self.shard, token)
            self.split.add(token)
        middle = len(offsets) // 2
        for part, half in enumerate((offsets[:middle], offsets[middle:])):
            self._write(half, f"{token}.{part}")

    def _reject(self, offset: int, exc: RowRejectedError) -> None:
        """Dead-letter a row ClickHouse refused, unless most of the claim is refused."""
        self.rejected.add(offset)
        if self.first_rejection is None:
            self.first_rejection = exc
        # Out of the rows sent to ClickHouse: rows that are not JSON never reach
        # it, and are not what a schema mismatch makes fail.
        rejected, total = len(self.rejected), len(self.rows)
        ratio = self.dlq_max_ratio
        # Checked at every rejected row, so the flush stops as soon as the
        # share is certain, without halving the rest of the claim.
        if rejected >= POISON_GUARD_MIN_ROWS and rejected > ratio * total:
            first = " ".join(str(self.first_rejection).split())[:500]
            # What to check first, then the evidence: the CLI cuts long lines.
            message = (
                f"{rejected} of {total} rows rejected by ClickHouse on shard "
                f"{self.shard.shard} (over EVENT_BUFFER_DLQ_MAX_RATIO={ratio:g}): schema "
                "mismatch? Stopped without dead-lettering; the claim stays open and is "
                f"re-driven once fixed. First error: {first} (claim {self.claim_id})"
            )
            raise PoisonGuardError(
                message,
                rejected=rejected,
                rows=total,
                first_error=first,
                code=self.first_rejection.code,
            )
        self.dead.append(self.dead_letter(self.rows[offset], str(exc)))
