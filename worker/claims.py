"""The claim protocol, in one place: claim, rows by position, read-ahead, halvings, ack.

A shard's queue is drained one claim at a time, by whoever holds its flush
lock (worker/lock.py):

1. **Claim** (lua_scripts/claim.lua). The shard's open claim, if a flusher
   died with one (a re-drive: same id, same rows, same chunk size), else the
   first `max_rows` rows of the queue under a new id. The claim records its
   chunk size, so every flusher re-driving it cuts the same chunks and sends
   the same dedup tokens, whatever its own setting. The rows stay in the
   queue until the ack.
2. **Rows by position.** claim.lua returns how many rows the claim holds
   and its position: `removed_total`, the rows ever taken off the queue's
   head. Only the ack trims the queue, always from the head, adding what it
   trimmed to `removed_total`; rows are only appended at the tail. So a
   row's position (removed_total + its index) names it for good, and the
   claim's rows are read with LRANGE between two reads of removed_total
   (one round trip; not a MULTI, which Redis refuses at maxmemory even to
   read, and the flush must drain a full Redis). A head that moved in
   between means another flusher acknowledged a claim: `QueueMovedError`.
3. **Read-ahead.** While a claim's chunks are inserted, the rows queued
   behind it are read and their heads decoded on a thread (`ReadAhead`;
   chDB and the ClickHouse driver's socket release the GIL). The next claim
   takes them only if it starts at the position they were read from
   (`QueueRows.take`): rows read ahead are the claim's rows or not used at
   all. The thread also puts them in insert order (`Ordered`: sorted by
   created_at, id and bytes, so a chunk holds mostly one month's partition,
   and a re-drive, which gets the same rows by position, cuts the same
   chunks). A read-ahead that fails is dropped; the claim then reads its rows.
4. **Halvings.** A chunk ClickHouse rejects is halved until the bad rows
   are alone; each halving is recorded in the claim (`split:<token>`)
   before the halves are written, so a re-drive takes the same halves and
   tokens even if ClickHouse would now take the whole chunk.
5. **Ack** (lua_scripts/ack.lua). Trims the claimed rows, appends the
   claim's dead letters and publishes the saved notice in one atomic step,
   only for the claim's own id and only while the caller holds the lock.

The claim and the ack are followed by a WAIT for replicas when
`EVENT_BUFFER_MIN_REPLICAS` asks for it (worker/replication.py).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from operator import eq
from types import TracebackType
from typing import cast

import msgspec

from worker.errors import QueueMovedError
from worker.events import RowHead, decode_row_head, decode_row_heads
from worker.keys import ShardKeys
from worker.replication import Replicas
from worker.replies import number, text
from worker.scripts import script
from worker.topology import Client, Node, on_node

log = logging.getLogger(__name__)

# Claim hash fields `split:<token>` mark chunks that were rejected and halved.
SPLIT_FIELD = "split:"

Head = RowHead | str  # a row's head, or why the row is not a JSON row


@dataclass(frozen=True)
class ClaimHead:
    """What claim.lua hands back: a claim without its rows."""

    id: str
    redriven: bool
    chunk_size: int
    count: int  # rows claimed: the first `count` rows of the queue
    position: int  # rows taken off the queue's head before the claim's first, ever


@dataclass(frozen=True)
class Claim:
    """A batch handed to a flusher: the head of a shard's queue."""

    id: str
    redriven: bool
    chunk_size: int  # fixed when the claim was made, so every re-drive cuts the same chunks
    rows: list[bytes]
    position: int = 0  # rows taken off the queue's head before this claim's first, ever


@dataclass(frozen=True)
class QueueRows:
    """Rows read from a shard's queue, named by the position of the first."""

    position: int
    rows: list[bytes]

    def take(self, position: int, count: int) -> list[bytes]:
        """The first `count` rows from `position` that these hold (maybe fewer, maybe none)."""
        if position != self.position:
            return []
        return self.rows[:count]


class AckResult(IntEnum):
    """What ack.lua returns."""

    ACKED = 1
    ALREADY_ACKED = 0  # that claim is no longer open: another flusher acknowledged it
    LOCK_HELD_BY_OTHER = -1


def decode_heads(rows: Sequence[bytes]) -> list[Head]:
    """Each row's head (id, created_at, project_id), or the decoding error's text."""
    try:
        return list(decode_row_heads(rows))  # every row a JSON row: the usual claim
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass  # one row at a time, to tell which
    heads: list[Head] = []
    for raw in rows:
        try:
            heads.append(decode_row_head(raw))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            heads.append(str(exc))
    return heads


@dataclass(frozen=True)
class Ordered:
    """A claim's rows in the order they are inserted, and the rows that are not JSON rows."""

    rows: list[bytes]  # sorted by (created_at, id, bytes)
    projects: list[str]  # the project_id of each of `rows`
    counts: Counter[str]  # rows per project
    invalid: list[tuple[bytes, str]]  # (row, why it is not a JSON row), in queue order


def order(rows: Sequence[bytes], heads: Sequence[Head]) -> Ordered:
    """`rows` (with their `heads`) in insert order: by (created_at, id, bytes).

    Sorted by one string per row, `created_at NUL id`, which orders exactly as
    the pair does when neither holds a NUL (the usual rows): no tuple per row
    (the garbage collector's work), and strings compare faster than tuples.
    Rows whose pairs tie (the same event twice) are then ordered by their
    bytes; a NUL in either string, by the full key.
    """
    if len(rows) != len(heads):
        raise ValueError(f"{len(rows)} rows, {len(heads)} heads")
    kept: Sequence[bytes] = rows
    valid = cast("Sequence[RowHead]", heads)
    invalid: list[tuple[bytes, str]] = []
    if str in set(map(type, heads)):  # rows that are not JSON rows (else none to set apart)
        kept, valid = [], []
        for raw, head in zip(rows, heads, strict=True):
            if isinstance(head, str):
                invalid.append((raw, head))
            else:
                kept.append(raw)
                valid.append(head)
    keys = [f"{head.created_at}\0{head.id}" for head in valid]
    index = sorted(range(len(keys)), key=keys.__getitem__)
    if "".join(keys).count("\0") != len(keys):
        index.sort(key=lambda i: (valid[i].created_at, valid[i].id, kept[i]))
    else:
        ordered = [keys[i] for i in index]
        if any(map(eq, ordered, ordered[1:])):
            index.sort(key=lambda i: (keys[i], kept[i]))
    projects = [valid[i].project_id for i in index]
    return Ordered([kept[i] for i in index], projects, Counter(projects), invalid)


@dataclass(frozen=True)
class Decoded:
    """Rows read ahead, with their heads, in insert order."""

    rows: QueueRows
    heads: list[Head]
    ordered: Ordered

    def heads_of(self, claim: Claim) -> list[Head]:
        """The heads of the claim's first rows, as many as came from these rows."""
        return self.heads[: len(self.rows.take(claim.position, len(claim.rows)))]


def ordered_rows(claim: Claim, ready: Decoded | None) -> Ordered:
    """The claim's rows in insert order, using what `ready` read ahead where it holds them."""
    if ready is None:
        return order(claim.rows, decode_heads(claim.rows))
    if ready.rows.position == claim.position and len(ready.rows.rows) == len(claim.rows):
        return ready.ordered  # the usual case: the claim is exactly the rows read ahead
    heads = ready.heads_of(claim)
    heads += decode_heads(claim.rows[len(heads) :])
    return order(claim.rows, heads)


class Claims:
    """The claim protocol's calls on one client (a server or a cluster)."""

    def __init__(self, redis: Client, replicas: Replicas | None = None) -> None:
        self.redis = redis
        self.replicas = replicas or Replicas()
        self._claim = script("claim")
        self._ack = script("ack")

    def claim(
        self,
        shard: ShardKeys,
        new_id: str,
        max_rows: int,
        now_ms: int,
        chunk_size: int,
        ahead: QueueRows | None = None,
    ) -> Claim | None:
        """The shard's open claim, else a new one of up to `max_rows`; None if empty.

        `claim_head`, then `claim_rows`: see both.
        """
        head = self.claim_head(shard, new_id, max_rows, now_ms, chunk_size)
        return None if head is None else self.claim_rows(shard, head, ahead)

    def claim_head(
        self, shard: ShardKeys, new_id: str, max_rows: int, now_ms: int, chunk_size: int
    ) -> ClaimHead | None:
        """claim.lua: the shard's open claim, else a new one of up to `max_rows`; None if
        the queue is empty. Raises NotReplicatedError when the claim is on the master
        only: its rows must not be inserted then (see worker/replication.py)."""
        reply = self.replicas.run(
            self.redis,
            shard.claim,
            lambda target: self._claim(
                keys=[shard.queue, shard.claim, shard.stats],
                args=[new_id, max_rows, now_ms, chunk_size],
                client=target,
            ),
            f"the claim of shard {shard.shard}",
            wrote=bool,  # an empty reply: nothing to claim, nothing written
        )
        if not reply:
            return None
        return ClaimHead(
            id=text(reply[0]),
            redriven=int(reply[1]) == 1,
            chunk_size=int(reply[3]),
            count=int(reply[4]),
            position=int(reply[5]),
        )

    def claim_rows(self, shard: ShardKeys, head: ClaimHead, ahead: QueueRows | None) -> Claim:
        """The claim with its rows: from `ahead` (read before) where those are the claim's,
        the rest read from the queue. Raises QueueMovedError when the queue's head moved
        before the rows were read."""
        claim_id, count, position = head.id, head.count, head.position
        rows = ahead.take(position, count) if ahead is not None else []
        if len(rows) < count:
            now_at, more = self.rows(shard, len(rows), count - len(rows))
            if now_at != position:
                raise QueueMovedError(
                    f"claim {claim_id} of shard {shard.shard}: the queue's head moved "
                    f"(from {position} to {now_at} rows removed) before its rows were "
                    "read: another flusher acknowledged a claim",
                    shard=shard.shard,
                    lock=shard.lock,
                )
            rows += more
        if len(rows) != count:
            raise QueueMovedError(
                f"claim {claim_id} of shard {shard.shard}: {count} rows claimed, "
                f"{len(rows)} in the queue",
                shard=shard.shard,
                lock=shard.lock,
            )
        return Claim(
            id=claim_id,
            redriven=head.redriven,
            chunk_size=head.chunk_size,
            rows=rows,
            position=position,
        )

    def read_ahead(self, shard: ShardKeys, claim: Claim, count: int) -> QueueRows:
        """Up to `count` rows queued behind `claim`: the next claim's, once it is acknowledged."""
        head, rows = self.rows(shard, len(claim.rows), count)
        return QueueRows(head + len(claim.rows), rows)

    def rows(self, shard: ShardKeys, start: int, count: int) -> tuple[int, list[bytes]]:
        """Rows `start` to `start + count - 1` of the queue, and the position of its head.

        Read in one round trip on the shard's master between two reads of the
        head's position: the same position both times means the rows are those
        behind it; else read again.
        """

        def read(node: Node) -> tuple[int, list[bytes]]:
            while True:
                with node.redis.pipeline(transaction=False) as pipe:
                    pipe.hget(shard.stats, "removed_total")
                    pipe.lrange(shard.queue, start, start + count - 1)
                    pipe.hget(shard.stats, "removed_total")
                    before, rows, after = pipe.execute()
                if before == after:
                    return (0 if before is None else number(before)), list(rows)

        return on_node(self.redis, shard.queue, read)

    def splits(self, shard: ShardKeys) -> set[str]:
        """Tokens of the open claim's chunks that a flush halved."""
        names = (text(n) for n in self.redis.hkeys(shard.claim))
        return {n[len(SPLIT_FIELD) :] for n in names if n.startswith(SPLIT_FIELD)}

    def record_split(self, shard: ShardKeys, token: str) -> None:
        """Record in the open claim that chunk `token` is halved (before its halves go out)."""
        self.replicas.run(
            self.redis,
            shard.claim,
            lambda target: target.hset(shard.claim, SPLIT_FIELD + token, 1),
            f"the halving of chunk {token}",
        )

    def ack(
        self,
        shard: ShardKeys,
        *,
        lock_token: bytes,
        claim_id: str,
        now_ms: int,
        rows_inserted: int,
        dead_letters: Sequence[bytes],
        saved: tuple[str, bytes] | None,
    ) -> AckResult:
        """Remove an acknowledged claim.

        Raises NotReplicatedError when the ack is on the master only (it has
        been made all the same: see worker/replication.py).
        """
        channel, payload = saved if saved else ("", b"")
        reply = self.replicas.run(
            self.redis,
            shard.claim,
            lambda target: self._ack(
                keys=[shard.lock, shard.claim, shard.queue, shard.dead, shard.stats],
                args=[lock_token, claim_id, now_ms, rows_inserted, channel, payload, *dead_letters],
                client=target,
            ),
            f"the ack of claim {claim_id} (shard {shard.shard})",
            wrote=lambda reply: int(reply) == AckResult.ACKED,  # else nothing was done
        )
        return AckResult(int(reply))


class ReadAhead:
    """One shard's read-ahead: at most one read in flight, on one thread."""

    def __init__(
        self,
        claims: Claims,
        shard: ShardKeys,
        count: int,
        on_ordered: Callable[[Ordered], None] | None = None,
    ) -> None:
        """`on_ordered`: called on the thread with each read's rows in insert order (the
        flusher has the sink prepare their first chunk)."""
        self._claims = claims
        self._shard = shard
        self._count = count
        self._on_ordered = on_ordered
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"read-ahead-{shard.shard}")
        self._pending: Future[Decoded] | None = None
        self._go = threading.Event()
        self._closed = False

    def start(self, claim: Claim) -> None:
        """Read the rows queued behind `claim`, replacing any read not taken; the read
        waits for `go` (or `take`, or `close`) to begin."""
        self._go.set()  # a read not taken: let it run out
        self._go = threading.Event()
        self._pending = self._pool.submit(self._read, claim, self._go)

    def go(self) -> None:
        """Let the read started begin: the flusher calls it as its claim's first INSERT
        goes out. Until then the claim's own work (its rows decoded and sorted, its
        first chunk prepared) holds the GIL, and a read beside it would only slow it
        down; once chDB inserts (the GIL released) the read has the interpreter."""
        self._go.set()

    def take(self) -> Decoded | None:
        """The last read started (waiting for it), or None: none started, or it failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        self._go.set()
        try:
            return pending.result()
        except Exception as exc:  # an optimisation only: the claim reads its own rows
            log.info("read ahead of shard %d failed: %s", self._shard.shard, exc)
            return None

    def close(self) -> None:
        self._closed = True  # a read still waiting for `go` is not made
        self._go.set()
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

    def _read(self, claim: Claim, go: threading.Event) -> Decoded:
        go.wait()
        if self._closed:
            raise CancelledError
        decoded = self._decoded(self._claims.read_ahead(self._shard, claim, self._count))
        if self._on_ordered is not None and decoded.ordered.rows:
            try:
                self._on_ordered(decoded.ordered)
            except Exception as exc:  # an optimisation too: the rows read stand
                log.info("preparing ahead on shard %d failed: %s", self._shard.shard, exc)
        return decoded

    @staticmethod
    def _decoded(rows: QueueRows) -> Decoded:
        heads = decode_heads(rows.rows)
        return Decoded(rows, heads, order(rows.rows, heads))
