"""The flush: claim a batch, insert it in deduplicated chunks, then acknowledge.

Per shard, under that shard's lock:

1. claim.lua hands back the open claim if a previous flush died (a
   re-drive), else claims the oldest `EVENT_BUFFER_BATCH_SIZE` rows under a
   new id. Claimed rows stay in the queue until step 3.
2. Rows are sorted by (created_at, id, bytes), so a re-drive of the claim
   splits into exactly the same chunks, and each chunk is inserted with the
   token `<claim id>:<chunk index>`. ClickHouse drops a chunk it has seen.
3. ack.lua trims the claimed rows, appends dead letters and publishes
   `events:saved`, in one atomic step, only after every chunk succeeded.

A kill anywhere leaves the claim open; the next flush re-drives it with the
same tokens: nothing is lost and nothing is written twice. The dead
flusher's lock does not hold it up: a holder provably dead is taken over
(`worker.lock`).

Rows that are not valid JSON, and rows ClickHouse rejects (found by halving
a rejected chunk until single rows are left), become dead letters with the
reason; the rest of the batch lands. Each halving is recorded in the claim
before the halves are written, so a re-drive takes the same halves (and
tokens) even if ClickHouse would now take the whole chunk.

The poison guard: when ClickHouse rejects more than
`EVENT_BUFFER_DLQ_MAX_RATIO` of a claim's rows (and at least
`POISON_GUARD_MIN_ROWS`), the rows are not at fault but the table is (a
schema mismatch after a bad deploy): the flush stops with `PoisonGuardError`
before anything is dead-lettered, and the claim stays open for a re-drive
once the cause is fixed.

A hung ClickHouse: every INSERT is bounded by the sink's timeouts
(`EVENT_BUFFER_CLICKHOUSE_*_TIMEOUT_S`), and the flusher tells its lock each
time it makes progress (a claim taken, a chunk inserted or rejected, a batch
acknowledged). A flush without progress for `EVENT_BUFFER_FLUSH_STALL_S`
(an INSERT whose timeout did not fire) has its lock given up by the
watchdog (`worker.lock`): another flusher takes the shard over, and this one
stops at its next lock check.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

import msgspec
from redis.exceptions import OutOfMemoryError, ResponseError

from worker import metrics
from worker.clock import SYSTEM_CLOCK, Clock
from worker.deadletters import (
    REASON_INVALID_JSON,
    REASON_REJECTED,
    DeadLetter,
    encode_dead_letter,
)
from worker.errors import EventBufferError, LockLostError, NotReplicatedError, SinkError
from worker.keys import CHANNEL_SAVED, Keyspace, ShardKeys
from worker.lock import FlushLock
from worker.privacy.tombstones import write_fenced
from worker.read_ahead import ReadAhead, decode_heads
from worker.reorder import release_due
from worker.replication import Replicas
from worker.replies import text
from worker.scripts import AckResult, Scripts
from worker.settings import Settings
from worker.sinks.base import PermanentSinkError, RetryableSinkError, RowRejectedError, Sink
from worker.topology import Client

log = logging.getLogger(__name__)

# The poison guard needs this many rejected rows before it stops a flush, so a
# small claim with a few bad rows still dead-letters them.
POISON_GUARD_MIN_ROWS = 10
# Claim hash fields `split:<token>` mark chunks that were rejected and halved.
SPLIT_FIELD = "split:"


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


@dataclass
class _Inserts:
    """The rows of one claim on their way into ClickHouse, and what was rejected."""

    shard: ShardKeys
    claim_id: str
    rows: Sequence[bytes]
    # Tokens of chunks halved after a rejection, by this flush or an earlier one of the claim.
    split: set[str]
    rejected: set[int] = field(default_factory=set)  # offsets into rows
    dead: list[bytes] = field(default_factory=list)
    first_rejection: RowRejectedError | None = None


@dataclass
class FlushResult:
    """What one flush of one shard did."""

    shard: int
    locked: bool = True  # False: another flusher held the lock; nothing was done
    # "<host:pid>: <why>" when the lock was taken over from a dead holder.
    took_over: str | None = None
    # Seconds left of a back-off after ClickHouse failures; nothing was done.
    backoff_s: float = 0.0
    rows: int = 0  # rows sent to ClickHouse (duplicates of a re-drive are dropped there)
    # Rows queued by releasing held session events first (worker/reorder.py), and how
    # many of those events were late.
    released: int = 0
    late: int = 0
    dead: int = 0
    batches: int = 0
    redriven: int = 0
    claims: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Time spent in each phase, summed over the batches (for metrics and logs).
    claim_seconds: float = 0.0
    insert_seconds: float = 0.0
    ack_seconds: float = 0.0
    # Rows of every chunk inserted, in order.
    chunk_rows: list[int] = field(default_factory=list)
    dead_reasons: Counter[str] = field(default_factory=Counter)
    # Why the flush of this shard stopped (ClickHouse, or the lock lost); None if it did not.
    error: EventBufferError | None = None

    def as_dict(self) -> dict[str, object]:
        shown: dict[str, object] = {"error": str(self.error)} if self.error is not None else {}
        if self.took_over is not None:
            shown["took_over"] = self.took_over
        return {
            **shown,
            "shard": self.shard,
            "locked": self.locked,
            "backoff_s": round(self.backoff_s, 3),
            "rows": self.rows,
            "dead": self.dead,
            "batches": self.batches,
            "redriven": self.redriven,
            "claims": list(self.claims),
            "seconds": round(self.seconds, 4),
            "phases": {
                "claim": round(self.claim_seconds, 4),
                "insert": round(self.insert_seconds, 4),
                "ack": round(self.ack_seconds, 4),
            },
        }


@dataclass
class FlushSummary:
    """One `process_buffer` run: a result per shard, failed shards included."""

    shards: list[FlushResult]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def dead(self) -> int:
        return sum(s.dead for s in self.shards)

    @property
    def errors(self) -> list[FlushResult]:
        return [s for s in self.shards if s.error is not None]

    def as_dict(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "dead": self.dead,
            "locked": all(s.locked for s in self.shards),
            "errors": len(self.errors),
            "shards": [s.as_dict() for s in self.shards],
        }


def flush_fields(result: FlushResult) -> dict[str, object]:
    """The structured fields of a shard's flush line (JSON logs)."""
    return {
        "shard": result.shard,
        "rows": result.rows,
        "dead": result.dead,
        "batches": result.batches,
        "redriven": result.redriven,
        "chunks": len(result.chunk_rows),
        "seconds": round(result.seconds, 4),
        "claim_seconds": round(result.claim_seconds, 4),
        "insert_seconds": round(result.insert_seconds, 4),
        "ack_seconds": round(result.ack_seconds, 4),
    }


class Flusher:
    """Moves rows from the Redis buffer into ClickHouse, one locked shard at a time."""

    def __init__(
        self,
        redis: Client,
        settings: Settings,
        sink_factory: Callable[[], Sink],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.sink_factory = sink_factory
        self.clock = clock
        self.keyspace = Keyspace(settings.key_prefix, settings.shards)
        self.replicas = Replicas.from_settings(settings)
        self.scripts = Scripts(redis, self.replicas)

    def process_buffer(self, max_batches: int | None = None) -> FlushSummary:
        """Flush every shard once, each under its own lock: what `process_buffer` runs.

        A shard whose flush fails (ClickHouse, its lock lost, or its master's
        replicas not confirming a claim or an ack) is reported in its result
        and logged; the other shards still flush, and the failed one is
        retried by the next run (after its back-off, for ClickHouse). Anything
        else (Redis down, a bug) propagates. Every shard's outcome is counted
        in the metrics and logged as one line.
        """
        # A back-pressure request is served by this run, whichever asked for it.
        self.redis.delete(self.keyspace.flush_pending)
        results: list[FlushResult] = []
        for shard in self.keyspace.all():
            try:
                result = self.flush_shard(shard.shard, max_batches)
            except (SinkError, LockLostError, NotReplicatedError) as exc:
                metrics.record_flush_error()
                log.error(
                    "flush of shard %d failed, will retry next run: %s",
                    shard.shard,
                    exc,
                    extra={"shard": shard.shard, "error": str(exc)},
                )
                results.append(FlushResult(shard=shard.shard, error=exc))
                continue
            except Exception:
                metrics.record_flush_error()
                raise
            metrics.record_flush(result)
            results.append(result)
            if result.batches:
                log.info(
                    "flushed shard %d: %d rows, %d dead, %d batches (%d re-driven) in %.3fs "
                    "(claim %.3fs, insert %.3fs, ack %.3fs)",
                    shard.shard,
                    result.rows,
                    result.dead,
                    result.batches,
                    result.redriven,
                    result.seconds,
                    result.claim_seconds,
                    result.insert_seconds,
                    result.ack_seconds,
                    extra=flush_fields(result),
                )
        return FlushSummary(results)

    def flush_shard(
        self, shard_no: int, max_batches: int | None = None, respect_backoff: bool = True
    ) -> FlushResult:
        """Up to `max_batches` batches (default: the setting) of one shard.

        Returns at once with `locked=False` if another flusher holds the lock
        (one provably dead is taken over: `took_over` says from whom), or
        with `backoff_s` set while the shard backs off after ClickHouse
        failed (unless `respect_backoff` is False: an operator's explicit flush).
        """
        shard = self.keyspace.shard(shard_no)
        result = FlushResult(shard=shard_no)
        # Held events whose reorder window has passed join the queue first, whether or
        # not this flush goes on (they must not wait for ClickHouse or the lock).
        self._release(shard, result)
        if respect_backoff:
            left_ms = int(self.redis.pttl(shard.backoff))
            if left_ms > 0:
                result.backoff_s = left_ms / 1000
                return result
        lock = FlushLock(
            self.redis,
            shard.lock,
            self.settings.lock_ttl_s,
            stall_s=self.settings.flush_stall_s,
            clock=self.clock,
            what=f"shard {shard_no}",
            on_stall=metrics.record_flush_stall,
        )
        if not lock.acquire():
            result.locked = False
            return result
        result.took_over = lock.took_over
        started = time.perf_counter()
        # The lock is released whatever fails below (building or closing the
        # sink included): else its watchdog keeps it alive for the life of
        # the process and every later flush of this shard reports it held.
        try:
            sink = self.sink_factory()
            try:
                limit = max_batches or self.settings.max_batches_per_flush
                with ReadAhead(self.scripts, shard, self.settings.batch_size) as ahead:
                    # Between batches too: a long flush must not keep due events waiting.
                    while result.batches < limit and self._flush_one(
                        shard, lock, sink, result, ahead, read_next=result.batches + 1 < limit
                    ):
                        self._release(shard, result)
            finally:
                sink.close()
        except (RetryableSinkError, PoisonGuardError):
            # The guard too: each attempt re-inserts thousands of rows one by
            # one until it trips again, so it should not run every tick.
            self._back_off(shard)
            raise
        finally:
            lock.release()
            result.seconds = time.perf_counter() - started
        self.redis.delete(shard.backoff, shard.failures)
        return result

    def _release(self, shard: ShardKeys, result: FlushResult) -> None:
        """Release the shard's held events that are due (worker/reorder.py), counted in
        `result`; a failure is logged, never raised: a damaged session key must not stop
        the flush of the other rows."""
        try:
            released = release_due(self.scripts, shard, self.settings, self.clock)
        except ResponseError as exc:
            log.error(
                "releasing the held events of shard %d failed: %s",
                shard.shard,
                exc,
                extra={"shard": shard.shard, "error": str(exc)},
            )
            return
        result.released += released.rows
        result.late += released.late
        if released.late:
            metrics.record_late(released.late)

    def _back_off(self, shard: ShardKeys) -> None:
        """After a transient ClickHouse failure, skip this shard for a doubling delay.

        2 s, 4 s, 8 s ... up to EVENT_BUFFER_RETRY_BACKOFF_MAX_S; the count of
        failures in a row outlives the delay so it keeps doubling, and a
        successful flush resets both.
        """
        try:
            failures = int(self.redis.incr(shard.failures))
            self.redis.expire(shard.failures, max(3600, self.settings.retry_backoff_max_s * 4))
            delay_s = min(self.settings.retry_backoff_max_s, 2**failures)
            self.redis.set(shard.backoff, failures, px=int(delay_s * 1000))
        except OutOfMemoryError:
            # A full Redis refuses the back-off's writes: the next run tries again at once,
            # which costs a claim that is already open and one failed connection.
            log.warning("ClickHouse failed for shard %d; Redis is full: no back-off", shard.shard)
            return
        log.warning(
            "ClickHouse failed for shard %d (%d in a row): next try in %d s",
            shard.shard,
            failures,
            delay_s,
        )

    def _flush_one(
        self,
        shard: ShardKeys,
        lock: FlushLock,
        sink: Sink,
        result: FlushResult,
        ahead: ReadAhead,
        read_next: bool,
    ) -> bool:
        """One claim from claim to ack. False when the shard had nothing to claim.

        The claim takes the rows `ahead` read behind the previous one where
        they are its rows; with `read_next` (not for the last claim a run
        may take), the rows behind this claim are read on `ahead`'s thread
        while this claim's chunks are inserted.
        """
        phase = time.perf_counter()
        ready = ahead.take()
        claim = self.scripts.claim(
            shard,
            str(uuid.uuid4()),
            self.settings.batch_size,
            self.clock.now_ms(),
            self.settings.chunk_size,
            ahead=ready.rows if ready is not None else None,
        )
        result.claim_seconds += time.perf_counter() - phase
        if claim is None:
            return False
        lock.progress()
        if claim.redriven:
            log.warning("re-driving unacknowledged claim %s on shard %d", claim.id, shard.shard)
        if read_next:
            ahead.start(claim)

        heads = ready.heads_of(claim) if ready is not None else []
        heads += decode_heads(claim.rows[len(heads) :])
        keyed: list[tuple[str, str, bytes, str]] = []
        dead: list[bytes] = []
        for raw, head in zip(claim.rows, heads, strict=True):
            if isinstance(head, str):
                dead.append(self._dead(REASON_INVALID_JSON, head, raw, shard, claim.id))
                continue
            keyed.append((head.created_at, head.id, raw, head.project_id))
        keyed.sort()
        invalid_json = len(dead)

        rows = [item[2] for item in keyed]
        inserts = _Inserts(shard, claim.id, rows, self._splits(shard, claim.redriven), dead=dead)
        size = claim.chunk_size  # the claim's, not this flusher's: same chunks, same tokens
        phase = time.perf_counter()
        try:
            for index, start in enumerate(range(0, len(rows), size)):
                lock.check()
                offsets = list(range(start, min(start + size, len(rows))))
                self._write(sink, inserts, offsets, f"{claim.id}:{index}", lock)
                result.chunk_rows.append(len(offsets))
        finally:
            result.insert_seconds += time.perf_counter() - phase
        lock.check()
        rejected = inserts.rejected

        if rejected:
            projects = Counter(item[3] for n, item in enumerate(keyed) if n not in rejected)
        else:
            projects = Counter(map(itemgetter(3), keyed))
        inserted = len(rows) - len(rejected)
        notice = msgspec.json.encode(
            {"shard": shard.shard, "claim": claim.id, "rows": inserted, "projects": projects}
        )
        phase = time.perf_counter()
        outcome = self.scripts.ack(
            shard,
            lock_token=lock.token,
            claim_id=claim.id,
            now_ms=self.clock.now_ms(),
            rows_inserted=inserted,
            dead_letters=dead,
            saved=(CHANNEL_SAVED, notice),
        )
        result.ack_seconds += time.perf_counter() - phase
        if outcome == AckResult.LOCK_HELD_BY_OTHER:
            raise LockLostError(f"claim {claim.id}: the lock is held by another flusher")
        lock.progress()
        if outcome == AckResult.ALREADY_ACKED:
            # Its rows were counted by the flusher that acknowledged it.
            log.info("claim %s was acknowledged by another flusher", claim.id)
            return True
        result.batches += 1
        result.redriven += int(claim.redriven)
        result.rows += inserted
        result.dead += len(dead)
        result.dead_reasons[REASON_INVALID_JSON] += invalid_json
        result.dead_reasons[REASON_REJECTED] += len(rejected)
        result.claims.append(claim.id)
        return True

    def _splits(self, shard: ShardKeys, redriven: bool) -> set[str]:
        """Tokens of the open claim's chunks that an earlier flush halved."""
        if not redriven:
            return set()  # a new claim: nothing of it was written yet
        names = (text(n) for n in self.redis.hkeys(shard.claim))
        return {n[len(SPLIT_FIELD) :] for n in names if n.startswith(SPLIT_FIELD)}

    def _write(
        self, sink: Sink, inserts: _Inserts, offsets: list[int], token: str, lock: FlushLock
    ) -> None:
        """Insert rows[offsets]; on a row-level rejection, halve until the bad rows are alone.

        The halves get tokens derived from the parent's. A halved chunk is
        recorded in the claim before its halves are written, and a re-drive
        goes straight to the halves of a recorded chunk: had it retried the
        whole chunk and ClickHouse now took it (the table was fixed), the
        rows its halves had written would land a second time, under a token
        ClickHouse has not seen.
        """
        if token not in inserts.split:
            try:
                write_fenced(
                    sink, self.redis, self.keyspace, [inserts.rows[i] for i in offsets], token
                )
                lock.progress()
                return
            except RowRejectedError as exc:
                lock.progress()  # ClickHouse answered: not a hung insert
                if len(offsets) == 1:
                    self._reject(inserts, offsets[0], exc)
                    return
            lock.check()
            claim = inserts.shard.claim
            self.replicas.run(
                self.redis,
                claim,
                lambda target: target.hset(claim, SPLIT_FIELD + token, 1),
                f"the halving of chunk {token}",
            )
            inserts.split.add(token)
        middle = len(offsets) // 2
        for part, half in enumerate((offsets[:middle], offsets[middle:])):
            self._write(sink, inserts, half, f"{token}.{part}", lock)

    def _reject(self, inserts: _Inserts, offset: int, exc: RowRejectedError) -> None:
        """Dead-letter a row ClickHouse refused, unless most of the claim is refused."""
        inserts.rejected.add(offset)
        if inserts.first_rejection is None:
            inserts.first_rejection = exc
        # Out of the rows sent to ClickHouse: rows that are not JSON never reach
        # it, and are not what a schema mismatch makes fail.
        rejected, total = len(inserts.rejected), len(inserts.rows)
        ratio = self.settings.dlq_max_ratio
        # Checked at every rejected row, so the flush stops as soon as the
        # share is certain, without halving the rest of the claim.
        if rejected >= POISON_GUARD_MIN_ROWS and rejected > ratio * total:
            first = " ".join(str(inserts.first_rejection).split())[:500]
            # What to check first, then the evidence: the CLI cuts long lines.
            message = (
                f"{rejected} of {total} rows rejected by ClickHouse on shard "
                f"{inserts.shard.shard} (over EVENT_BUFFER_DLQ_MAX_RATIO={ratio:g}): schema "
                "mismatch? Stopped without dead-lettering; the claim stays open and is "
                f"re-driven once fixed. First error: {first} (claim {inserts.claim_id})"
            )
            raise PoisonGuardError(
                message,
                rejected=rejected,
                rows=total,
                first_error=first,
                code=inserts.first_rejection.code,
            )
        inserts.dead.append(
            self._dead(
                REASON_REJECTED, str(exc), inserts.rows[offset], inserts.shard, inserts.claim_id
            )
        )

    def _dead(self, reason: str, error: str, raw: bytes, shard: ShardKeys, claim: str) -> bytes:
        header = DeadLetter(
            reason=reason,
            error=error,
            source="flush",
            at=self.clock.now_ms(),
            shard=shard.shard,
            claim=claim,
        )
        return encode_dead_letter(header, raw)
