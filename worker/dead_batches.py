"""A batch that cannot be applied: kept whole as one dead letter, or retried if even that fails.

The one failure policy for "cannot apply" (an ingest task that failed
`UNEXPECTED_ATTEMPTS` times, tasks/ingest.py; a message no task can run,
worker/consumer.py): the raw batch (or task body) becomes one dead letter
(`eventbuffer dlq list`; `dlq replay` once the cause is fixed). When Redis
refuses to store it (`RETRY_FAILURES`: away, full, failing over), nothing is
dropped: the caller is told to try again later, and waits the way its
context allows (a task waits in place; the consumer's event loop must not
block, so it uses its timer, and parks the message after `RETRY_ATTEMPTS`).
Any other failure to store it is `failed`: the caller keeps the message
some other way (the consumer parks it in the broker) or lets it fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from worker import metrics
from worker.bodies import batch_key
from worker.buffer import EventBuffer
from worker.deadletters import DeadLetter
from worker.redis_errors import REDIS_FAILURES

#: Failures to store a dead letter that heal by waiting: the buffer's Redis away.
RETRY_FAILURES: tuple[type[Exception], ...] = (*REDIS_FAILURES, OSError)


@dataclass(frozen=True)
class Kept:
    """What became of a batch to keep.

    `stored`: a new dead letter (False with no error: it was kept before);
    `retry`: Redis refused it, try again later; `failed`: it cannot be
    stored (a body the dead letter cannot hold, a bug)."""

    stored: bool = False
    retry: Exception | None = None
    failed: Exception | None = None

    @property
    def kept(self) -> bool:
        return self.retry is None and self.failed is None


def keep_batch(
    buffer: Callable[[], EventBuffer],
    raw: bytes,
    batch_id: str,
    *,
    reason: str,
    error: str,
    task: str,
) -> Kept:
    """Keep `raw` as one dead letter (`dead_letter_batch`), counted in the metrics once;
    never raises for a failure to store it (the buffer's making included): says whether
    to retry."""
    try:
        stored = dead_letter_batch(buffer(), raw, batch_id, reason=reason, error=error, task=task)
    except RETRY_FAILURES as exc:
        return Kept(retry=exc)
    except Exception as exc:
        return Kept(failed=exc)
    if stored:
        metrics.record_batch_dead_lettered(reason)
    return Kept(stored=stored)


def dead_letter_batch(
    buffer: EventBuffer,
    raw: bytes,
    batch_id: str,
    *,
    reason: str,
    error: str,
    task: str,
) -> bool:
    """Keep a whole batch (or task body) that could not be applied as one dead letter.

    Stored under a marker of its own (`dead:<batch id>`), so a redelivered
    task that fails again adds nothing; the batch id itself stays free for a
    replay. Returns False when it had been stored before. A batch over
    EVENT_BUFFER_MAX_MESSAGE_BYTES is cut to its first that many bytes (the
    error says so): a dead letter never holds more than one message may.
    """
    limit = buffer.settings.message_limit_bytes
    if len(raw) > limit:
        error += f" (raw batch of {len(raw)} bytes cut to its first {limit})"
        raw = raw[:limit]
    header = DeadLetter(
        reason=reason,
        error=" ".join(error.split()),
        source="ingest",
        at=buffer.clock.now_ms(),
        shard=0,
        claim=batch_id,
        task=task,
    )
    # The marker holds the digest of `raw`: another batch or body under the same id
    # (ids reused by a producer) is kept too, once (under its conflict key).
    result = buffer.apply(
        [],
        batch_id=f"dead:{batch_key(batch_id)}",
        dead_letters=[(header, raw)],
        keep_conflict=lambda applied, stored: (header, raw),
    )
    return not result.duplicate
