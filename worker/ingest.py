"""Ingest: validate a batch from a producer, apply the valid events, dead-letter the rest.

The Celery tasks in `tasks/ingest.py` are thin wrappers over `ingest()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from worker.buffer import EventBuffer
from worker.deadletters import REASON_INVALID_EVENT, DeadLetter, encode_dead_letter
from worker.events import Event, InvalidEvent, parse_event


@dataclass
class IngestResult:
    batch_id: str
    accepted: int
    invalid: int
    appended: int
    duplicate: bool
    # The longest queue the batch touched, after it was applied.
    max_queue_length: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "accepted": self.accepted,
            "invalid": self.invalid,
            "appended": self.appended,
            "duplicate": self.duplicate,
        }


def _raw(payload: Any) -> bytes:
    try:
        return msgspec.json.encode(payload)
    except (TypeError, ValueError, OverflowError):
        return repr(payload).encode("utf-8", "backslashreplace")


def ingest(buffer: EventBuffer, payload: Any, batch_id: str) -> IngestResult:
    """Validate `payload` (a list of event objects) and apply it as batch `batch_id`.

    Applying the same batch id twice does nothing the second time, dead
    letters included, so a redelivered task is harmless.
    """
    items = payload if isinstance(payload, list) else [payload]
    events: list[Event] = []
    dead: list[bytes] = []
    now = buffer.clock.now_ms()
    for item in items:
        try:
            events.append(parse_event(item))
        except InvalidEvent as exc:
            header = DeadLetter(
                reason=REASON_INVALID_EVENT,
                error=str(exc),
                field=exc.field,
                source="ingest",
                at=now,
                shard=0,
                claim=batch_id,
            )
            dead.append(encode_dead_letter(header, _raw(item)))
    result = buffer.apply(events, batch_id=batch_id, dead_letters=dead)
    return IngestResult(
        batch_id=batch_id,
        accepted=len(events),
        invalid=len(dead),
        appended=result.appended,
        duplicate=result.duplicate,
        max_queue_length=max(result.queue_lengths.values(), default=0),
    )
