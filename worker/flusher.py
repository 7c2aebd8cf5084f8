"""The flush: claim a batch, insert it in deduplicated chunks, then acknowledge.

One sink serves a whole `process_buffer` run (on chDB, one session per
run). Per shard, under that shard's lock (the claim protocol itself, with
its read-ahead, is worker/claims.py's):

1. The claim: the open claim if a previous flush died (a re-drive), else
   the oldest `EVENT_BUFFER_BATCH_SIZE` rows under a new id. Claimed rows
   stay in the queue until step 3.
2. Rows are sorted by (created_at, id, bytes) and cut into chunks of the
   claim's recorded chunk size, so a re-drive of the claim splits into
   exactly the same chunks; each chunk is inserted with the token
   `<claim id>:<chunk index>`. ClickHouse drops a chunk it has seen.
3. The ack trims the claimed rows, appends dead letters and publishes
   `events:saved`, in one atomic step, only after every chunk succeeded.

A kill anywhere leaves the claim open; the next flush re-drives it with the
same tokens: nothing is lost and nothing is written twice. The dead
flusher's lock does not hold it up: a holder provably dead is taken over
(`worker.lock`).

Rows that are not valid JSON, and rows ClickHouse rejects, become dead
letters with the reason; the rest of the batch lands. Halving a rejected
chunk and the poison guard (most of a claim rejected: a schema mismatch,
not bad rows) are worker/claim_insert.py's.

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
from functools import partial

import msgspec
from redis.exceptions import OutOfMemoryError, ResponseError

from worker import metrics
from worker.claim_insert import POISON_GUARD_MIN_ROWS, ClaimInsert, PoisonGuardError
from worker.claims import SPLIT_FIELD, AckResult, Claims, Ordered, ReadAhead, ordered_rows
from worker.clock import SYSTEM_CLOCK, Clock
from worker.deadletters import (
    REASON_INVALID_JSON,
    REASON_REJECTED,
    DeadLetter,
    encode_dead_letter,
)
from worker.errors import (
    FlushError,
    LockLostError,
    NotReplicatedError,
    SinkError,
)
from worker.flush_report import FlushResult, FlushSummary, log_failed, log_flushed
from worker.keys import CHANNEL_SAVED, Keyspace, ShardKeys
from worker.lock import FlushLock
from worker.privacy.tombstones import write_fenced
from worker.reorder import release_due
from worker.replication import Replicas
from worker.scripts import Scripts
from worker.settings import Settings
from worker.sinks.base import RetryableSinkError, Sink
from worker.topology import Client

__all__ = [
    "POISON_GUARD_MIN_ROWS",
    "SPLIT_FIELD",
    "FlushResult",
    "FlushSummary",
    "Flusher",
    "PoisonGuardError",
]

log = logging.getLogger(__name__)


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
        self.scripts = Scripts(redis)
        self.claims = Claims(redis, self.replicas)

    def process_buffer(self, max_batches: int | None = None) -> FlushSummary:
        """Flush every shard once, each under its own lock: what `process_buffer` runs.

        One sink serves every shard of the run (on chDB, one session per run,
        not one per shard), opened on the first insert and closed at the end.
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
        sink = self.sink_factory()
        try:
            for shard in self.keyspace.all():
                try:
                    result = self.flush_shard(shard.shard, max_batches, sink=sink)
                except (SinkError, LockLostError, NotReplicatedError) as exc:
                    metrics.record_flush_error()
                    log_failed(shard.shard, exc)
                    results.append(FlushResult(shard=shard.shard, error=exc))
                    continue
                except Exception:
                    metrics.record_flush_error()
                    raise
                metrics.record_flush(result)
                results.append(result)
                log_flushed(result)
        finally:
            sink.close()
        return FlushSummary(results)

    def flush_shard(
        self,
        shard_no: int,
        max_batches: int | None = None,
        respect_backoff: bool = True,
        sink: Sink | None = None,
    ) -> FlushResult:
        """Up to `max_batches` batches (default: the setting) of one shard.

        Returns at once with `locked=False` if another flusher holds the lock
        (one provably dead is taken over: `took_over` says from whom), or
        with `backoff_s` set while the shard backs off after ClickHouse
        failed (unless `respect_backoff` is False: an operator's explicit flush).
        Writes through `sink`, left open; without one, opens and closes its own.
        A `FlushError` raised (the lock lost) names the shard and its lock.
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
            own = sink is None
            writer = self.sink_factory() if sink is None else sink
            try:
                limit = max_batches or self.settings.max_batches_per_flush
                with ReadAhead(
                    self.claims, shard, self.settings.batch_size, self._first_chunk(writer)
                ) as ahead:
                    # Between batches too: a long flush must not keep due events waiting.
                    while result.batches < limit and self._flush_one(
                        shard, lock, writer, result, ahead, read_next=result.batches + 1 < limit
                    ):
                        self._release(shard, result)
                    # Stopped by the limit, not by an empty queue, after a full claim:
                    # the rows behind it should not wait for Beat's next tick
                    # (tasks/flush.py asks for another run at once).
                    result.more = result.more and result.batches >= limit
            finally:
                if own:
                    writer.close()
        except (RetryableSinkError, PoisonGuardError):
            # The guard too: each attempt re-inserts thousands of rows one by
            # one until it trips again, so it should not run every tick.
            self._back_off(shard)
            raise
        except FlushError as exc:
            if exc.shard is None:
                exc.shard = shard_no
            if exc.lock is None:
                exc.lock = shard.lock
            raise
        finally:
            lock.release()
            result.seconds = time.perf_counter() - started
        self.redis.delete(shard.backoff, shard.failures)
        return result

    def _first_chunk(self, sink: Sink) -> Callable[[Ordered], None] | None:
        """For the read-ahead: the sink prepares the first chunk of the rows read ahead
        (as a new claim of them cuts it) while the claim before them is inserted."""
        prepare: Callable[[Sequence[bytes]], None] | None = getattr(sink, "prepare", None)
        if prepare is None:
            return None
        size = self.settings.chunk_size
        return lambda ordered: prepare(ordered.rows[:size])

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
        they are its rows (a run's first claim reads its own); with
        `read_next` (not for the last claim a run may take), the rows behind
        this claim are read on `ahead`'s thread while this claim's chunks
        are inserted.
        """
        phase = time.perf_counter()
        head = self.claims.claim_head(
            shard,
            str(uuid.uuid4()),
            self.settings.batch_size,
            self.clock.now_ms(),
            self.settings.chunk_size,
        )
        if head is None:
            result.claim_seconds += time.perf_counter() - phase
            return False
        result.more = head.count >= self.settings.batch_size  # a full claim: maybe more behind
        lock.progress()
        # Rows to write: a sink that opens slowly (chDB's session) opens while they are read.
        open_ahead: Callable[[], None] | None = getattr(sink, "open_ahead", None)
        if open_ahead is not None:
            open_ahead()
        ready = ahead.take()
        claim = self.claims.claim_rows(shard, head, ready.rows if ready is not None else None)
        result.claim_seconds += time.perf_counter() - phase
        if claim.redriven:
            log.warning("re-driving unacknowledged claim %s on shard %d", claim.id, shard.shard)
        if read_next:
            ahead.start(claim)

        ordered = ordered_rows(claim, ready)
        dead = [
            self._dead(REASON_INVALID_JSON, why, raw, shard, claim.id)
            for raw, why in ordered.invalid
        ]
        invalid_json = len(dead)
        rows = ordered.rows
        inserts = ClaimInsert(
            sink=sink,
            claims=self.claims,
            shard=shard,
            claim_id=claim.id,
            rows=rows,
            # Chunks an earlier flush of the claim halved (a new claim has none yet).
            split=self.claims.splits(shard) if claim.redriven else set(),
            lock=lock,
            dlq_max_ratio=self.settings.dlq_max_ratio,
            dead_letter=lambda raw, why: self._dead(REASON_REJECTED, why, raw, shard, claim.id),
            write=partial(self._write, sink, ahead),
        )
        size = claim.chunk_size  # the claim's, not this flusher's: same chunks, same tokens
        if ready is None or ordered is not ready.ordered:
            # Not read ahead (a run's first claim): its first chunk was not prepared either.
            # Prepared here, before the read ahead of the next claim begins (with the INSERT).
            inserts.ahead(range(0, min(size, len(rows))), 0, now=True)
        phase = time.perf_counter()
        try:
            for index, start in enumerate(range(0, len(rows), size)):
                lock.check()
                offsets = range(start, min(start + size, len(rows)))
                # The sink prepares the next chunk while this one is inserted.
                following = range(offsets.stop, min(offsets.stop + size, len(rows)))
                inserts.chunk(index, offsets, following)
                result.chunk_rows.append(len(offsets))
        finally:
            result.insert_seconds += time.perf_counter() - phase
        lock.check()
        rejected = inserts.rejected
        dead += inserts.dead

        projects = ordered.counts
        if rejected:
            projects = Counter(p for n, p in enumerate(ordered.projects) if n not in rejected)
        # Rows the forget fence dropped are neither inserted nor saved.
        inserted = len(rows) - len(rejected) - inserts.fenced
        notice = msgspec.json.encode(
            {"shard": shard.shard, "claim": claim.id, "rows": inserted, "projects": projects}
        )
        phase = time.perf_counter()
        outcome = self.claims.ack(
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
            raise LockLostError(
                f"claim {claim.id}: the lock is held by another flusher",
                shard=shard.shard,
                lock=shard.lock,
            )
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

    def _write(self, sink: Sink, ahead: ReadAhead, rows: Sequence[bytes], token: str) -> int:
        """A chunk's INSERT, fenced (worker/privacy); the read ahead begins after the
        fence's Redis read (a read of thousands of rows would hold it up in Redis)."""
        return write_fenced(sink, self.redis, self.keyspace, rows, token, fenced=ahead.go)

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
