"""Ingest: validate a batch from a producer, apply the valid events, dead-letter the rest.

The Celery tasks in `tasks/ingest.py` are thin wrappers over `ingest()`.

Task arguments are untrusted JSON of any shape, so `ingest()` never raises
for bad data (a task that raised would fail or, for a Redis error, be
retried forever): a payload that is not a list is one item; every item
that is not a valid event object becomes a dead letter with the reason and
the field, stored atomically with the batch; the valid rest is applied.
Only a Redis failure escapes, and the task retries it.

An event sent without an id gets one derived from the batch id and its
position, so a redelivered batch is routed to the same shards as the first
delivery and skipped there by the batch markers.

The markers hold a digest of the batch's content (`batch_digest`): the
valid events' rows and the invalid items, in order, so a redelivery matches
whatever JSON formatting its body was re-sent with. The same batch id with
other content (a producer reusing ids) is not skipped: nothing of it is
applied and the batch is kept whole as one `batch_id_conflict` dead letter,
which `eventbuffer dlq replay` applies under a new batch id.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec

from worker import bodies
from worker.apply import content_digest
from worker.bodies import batch_bytes, batch_id_problem, batch_key, item_json, json_type
from worker.buffer import EventBuffer
from worker.dead_batches import dead_letter_batch as dead_letter_batch  # re-exported
from worker.deadletters import (
    REASON_BATCH_ID_CONFLICT,
    REASON_INVALID_EVENT,
    REASON_UNDELIVERABLE,
    DeadLetter,
)
from worker.errors import InvalidEvent
from worker.events import Event, Limits, encode_event, parse_event, parse_events
from worker.names import TASK_INGEST_EVENTS
from worker.privacy.tombstones import drop_forgotten_events
from worker.retention import PastRetention, check_retention, retention_cutoff_ms

log = logging.getLogger(__name__)

# A dead letter keeps the raw item, cut to this many bytes at most (an
# oversized event's first part is enough to tell what it was).
MIN_DEAD_PAYLOAD_BYTES = 1 << 20
# Ids of events sent without one are derived from the batch id in this namespace.
_ID_NAMESPACE = uuid.UUID("5f0c1e7a-3b0e-4c55-9c1e-6e7665b2f0a1")


def derived_ids(batch_id: str) -> Callable[[int], str]:
    """The id of the batch's event at a position, for events sent without one.

    One uuid5 of the batch id per batch; each position is mixed into its
    node field (the last 48 bits: version and variant bits stay those of a
    uuid5). Same batch, same position, same id: a redelivered batch routes
    its events to the same shards, whose batch markers skip them.
    """
    h = f"{uuid.uuid5(_ID_NAMESPACE, batch_id).int:032x}"
    # Only the node field changes with the position: the rest is formatted once. A
    # position below 4096 changes only its last three digits: those come from a table.
    head, node = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-", int(h[20:], 16)
    fixed, low = head + h[20:29], int(h[29:], 16)
    digits = _THREE_DIGITS

    def derive(index: int) -> str:
        if 0 <= index < 4096:
            return fixed + digits[low ^ index]
        return f"{head}{node ^ (index & 0xFFFF_FFFF_FFFF):012x}"

    return derive


# Three hex digits of each number below 4096, for `derived_ids`.
_THREE_DIGITS = [f"{n:03x}" for n in range(4096)]


@dataclass
class IngestResult:
    batch_id: str
    accepted: int
    invalid: int
    appended: int
    duplicate: bool
    # The longest queue the batch touched, after it was applied.
    max_queue_length: int
    # Events applied by kind ("regular", "screen_view", "session_end"); empty for a duplicate.
    kinds: dict[str, int] = field(default_factory=dict)
    # The batch id had been applied with other content: this batch became a
    # batch_id_conflict dead letter (nothing of it was applied by this call).
    conflict: bool = False
    # The batch id was no string: the batch was kept as an undeliverable_task dead letter.
    undeliverable: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = {
            "batch_id": self.batch_id,
            "accepted": self.accepted,
            "invalid": self.invalid,
            "appended": self.appended,
            "duplicate": self.duplicate,
        }
        if self.conflict:
            out["batch_id_conflict"] = True
        if self.undeliverable:
            out["undeliverable"] = True
        return out


_ANY = msgspec.json.Decoder()
_JSON_TYPES = {ord("["): "array", ord('"'): "string", ord("t"): "boolean", ord("f"): "boolean",
               ord("n"): "null"}  # fmt: skip


def _not_an_object(item: bytes) -> str | None:
    """The JSON type of an item that is not an object (an event must be one), or None."""
    text = item.lstrip()
    if text.startswith(b"{"):
        return None
    if not text:
        return "nothing"
    return _JSON_TYPES.get(text[0], "number")


def _validate_array(
    payload: Any, limits: Limits, derive: Callable[[int], str] | None
) -> list[Event | InvalidEvent] | None:
    """Each event of a batch that decodes whole as a list of events, or None."""
    batch = bodies.event_array(payload)
    return None if batch is None else parse_events(batch, limits, derive)


def _validate_item(
    item: Any, index: int, limits: Limits, derive: Callable[[int], str] | None
) -> Event | InvalidEvent:
    """One item of a batch: its Event, or the InvalidEvent saying why it is none."""
    try:
        if isinstance(item, bytes):  # JSON bytes: from a JSON text or a lazy task body
            kind = _not_an_object(item)
            if kind is not None:
                raise InvalidEvent("$", f"an event must be an object, got {kind}")
        elif not isinstance(item, dict):
            # JSON text is no event object here: only dicts come from producers.
            raise InvalidEvent("$", f"an event must be an object, got {json_type(item)}")
        return parse_event(item, limits, partial(derive, index) if derive else None)
    except InvalidEvent as exc:
        return exc


def ingest(
    buffer: EventBuffer, payload: Any, batch_id: str | None, limits: Limits | None = None
) -> IngestResult:
    """Validate `payload` (a list of event objects) and apply it as batch `batch_id`.

    Applying the same batch id twice does nothing the second time, dead
    letters included, so a redelivered task is harmless. The same batch id
    with other content is kept whole as a `batch_id_conflict` dead letter
    (logged at ERROR; the result's `conflict`). A `batch_id` that is not a
    string (a task run without the consumer's check, worker/consumer.py) is
    no id: the batch and it are kept as an `undeliverable_task` dead letter
    (the result's `undeliverable`). `limits` default to the buffer's
    settings and clock.
    """
    if batch_id is None:
        batch_id = ""  # a fresh id
    if not isinstance(batch_id, str):
        return _undeliverable(buffer, payload, batch_id)
    if limits is None:
        limits = Limits.from_settings(buffer.settings, buffer.clock)
    batch_id = batch_key(batch_id)
    events: list[Event] = []
    positions: list[int] = []  # of each valid event in the batch
    invalid: list[int] = []  # positions of the items dead-lettered
    dead: list[tuple[DeadLetter, bytes]] = []
    now = buffer.clock.now_ms()
    max_dead_bytes = max(MIN_DEAD_PAYLOAD_BYTES, 2 * limits.max_event_bytes)
    # The id of an event sent without one follows from the batch id and its
    # position: a redelivered batch routes it to the same shard, whose batch
    # marker skips it (a random id could land on another shard).
    derive = derived_ids(batch_id) if batch_id else None
    # The whole batch in one decode when it is a JSON array of event objects of the
    # right types (the common case); else item by item, each judged on its own.
    results = _validate_array(payload, limits, derive)
    sliced: list[Any] | None = None

    def items_of() -> list[Any]:
        """The batch's items (each a dict, or the JSON bytes of one), cut once, if needed."""
        nonlocal sliced
        if sliced is None:
            sliced = bodies.items(payload)
        return sliced

    if results is None:
        results = [_validate_item(item, n, limits, derive) for n, item in enumerate(items_of())]
    retention_days = buffer.settings.retention_days
    cutoff = retention_cutoff_ms(now, retention_days)
    for index, outcome in enumerate(results):
        if not isinstance(outcome, InvalidEvent):
            if cutoff is None or outcome.created_ms >= cutoff:  # within: no call each
                events.append(outcome)
                positions.append(index)
                continue
            try:
                check_retention(outcome.created_ms, now, retention_days)
            except PastRetention as exc:
                outcome = exc
            else:
                events.append(outcome)
                positions.append(index)
                continue
        invalid.append(index)
        item = items_of()[index]
        raw = item_json(item)
        error = str(outcome)
        if len(raw) > max_dead_bytes:
            error += f" (raw payload of {len(raw)} bytes cut to {max_dead_bytes})"
            raw = raw[:max_dead_bytes]
        header = DeadLetter(
            reason=getattr(outcome, "reason", REASON_INVALID_EVENT),  # or past_retention
            error=error,
            field=outcome.field,
            source="ingest",
            at=now,
            shard=0,  # set to the shard that stores it, by EventBuffer.apply
            claim=batch_id,
        )
        dead.append((header, raw))
    # Each valid event's row, encoded once: for the digest and for the apply.
    rows: list[bytes] | None = [encode_event(event) for event in events]
    digest = batch_digest(items_of() if invalid else [], events, positions, invalid, rows)

    def keep(applied: frozenset[int], stored: str) -> tuple[DeadLetter, bytes]:
        """The conflict's dead letter: the batch as sent; or, when an earlier delivery
        of this very batch had applied some shards (only on a Redis Cluster), the
        items it had not (a replay must not apply the others twice)."""
        raw = batch_bytes(payload)
        if applied:
            first = buffer.shard_of(events[0]) if events else 0
            left = [n for n, event in zip(positions, events, strict=True)
                    if buffer.shard_of(event) not in applied]  # fmt: skip
            if first not in applied:  # the invalid items' dead letters were not stored
                left = sorted(left + invalid)
            raw = b"[" + b",".join(_item_bytes(items_of()[n]) for n in left) + b"]"
        error = (
            f"batch id {batch_id} was applied before with other content (digest {stored}; "
            f"this batch: {digest}): nothing of this batch was applied; "
            "`eventbuffer dlq replay` applies it under a new batch id"
        )
        if applied:
            error += f" (shards {sorted(applied)} held this batch already: left out)"
        header = DeadLetter(
            reason=REASON_BATCH_ID_CONFLICT,
            error=error,
            source="ingest",
            at=now,
            shard=0,  # set to the shard that stores it, by EventBuffer.apply
            claim=batch_id,
        )
        return header, raw

    # A forgotten person's events, created up to their request, are dropped (worker/privacy).
    kept, positions = drop_forgotten_events(
        buffer.redis, buffer.keyspace, events, positions, buffer.clock
    )
    if kept is not events:  # some were dropped: the apply encodes the rest's rows
        events, rows = kept, None
    result = buffer.apply(
        events, batch_id=batch_id, dead_letters=dead, digest=digest, keep_conflict=keep, rows=rows
    )
    if result.conflict is not None:
        log.error(
            "batch %s: this batch id was applied before with other content "
            "(digest %s, this batch %s): kept whole as a %s dead letter, nothing applied "
            "(eventbuffer dlq list; dlq replay applies it under a new batch id)",
            result.batch_id,
            result.conflict.stored,
            digest,
            REASON_BATCH_ID_CONFLICT,
        )
    return IngestResult(
        batch_id=result.batch_id,
        accepted=len(events),
        # A conflict keeps its invalid items in its own dead letter, not as invalid_event.
        invalid=0 if result.conflict is not None else len(dead),
        appended=result.appended,
        duplicate=result.duplicate,
        max_queue_length=max(result.queue_lengths.values(), default=0),
        kinds=dict(result.kinds),
        conflict=result.conflict is not None,
    )


def _undeliverable(buffer: EventBuffer, payload: Any, batch_id: Any) -> IngestResult:
    """Keep a batch whose batch id is no string as the task body that would carry it.

    The body is `[[events, batch_id], {}, {}]` for `ingest_events`, so a replay
    applies the events and keeps the would-be id as one more item
    (`body_batch`); stored once per content.
    """
    body = b"[[" + batch_bytes(payload) + b"," + _json_bytes(batch_id) + b"],{},{}]"
    key = "sha256:" + hashlib.sha256(body).hexdigest()
    shown = batch_id
    if isinstance(batch_id, msgspec.Raw):
        try:
            shown = _ANY.decode(batch_id)
        except msgspec.DecodeError:
            shown = bytes(batch_id)
    error = f"InvalidTaskError: {batch_id_problem(shown)}"
    stored = dead_letter_batch(
        buffer, body, key, reason=REASON_UNDELIVERABLE, error=error, task=TASK_INGEST_EVENTS
    )
    log.error(
        "a batch whose batch_id is no batch id (%s): kept as an %s dead letter "
        "(eventbuffer dlq list)",
        error,
        REASON_UNDELIVERABLE,
    )
    return IngestResult(
        batch_id=key,
        accepted=0,
        invalid=0,
        appended=0,
        duplicate=not stored,
        max_queue_length=0,
        undeliverable=True,
    )


def _json_bytes(value: Any) -> bytes:
    """A value as JSON text: an undecoded argument as it was sent."""
    return bytes(value) if isinstance(value, msgspec.Raw) else item_json(value)


def batch_digest(
    items: list[Any],
    events: list[Event],
    positions: list[int],
    invalid: list[int],
    rows: list[bytes] | None = None,
) -> str:
    """The digest of a batch's content, which its batch markers hold.

    Of the valid events' rows (canonical JSON, derived ids included) and
    the invalid items in a canonical form (keys sorted, compact), in the
    batch's order: a redelivery matches even when its body was re-encoded
    on the way (a Celery retry re-sends the arguments as Python's JSON).
    `rows` are the events' rows when already encoded; `items` are read only
    at the `invalid` positions.
    """
    if rows is None:
        rows = [encode_event(event) for event in events]
    if not invalid:  # every item is an event, in order: the parts are the rows
        return content_digest(rows)
    parts: list[bytes] = [b""] * (len(events) + len(invalid))
    for n, row in zip(positions, rows, strict=True):
        parts[n] = row
    for n in invalid:
        parts[n] = b"!" + _canonical(items[n])
    return content_digest(parts)


def _canonical(item: Any) -> bytes:
    """An invalid item as canonical JSON (keys sorted), or its raw bytes when it is no JSON."""
    try:
        value = _ANY.decode(item) if isinstance(item, bytes) else item
        return msgspec.json.encode(value, order="sorted")
    except (msgspec.DecodeError, TypeError, ValueError, OverflowError, RecursionError):
        return item_json(item)


def _item_bytes(item: Any) -> bytes:
    """An item of a batch as the JSON text it was sent as (or its JSON, for a dict)."""
    return item if isinstance(item, bytes) else item_json(item)
