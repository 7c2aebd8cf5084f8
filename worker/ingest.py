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
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec

from worker.buffer import EventBuffer
from worker.deadletters import REASON_INVALID_EVENT, DeadLetter
from worker.errors import InvalidEvent
from worker.events import Event, Limits, parse_event
from worker.names import TASK_INGEST_EVENT

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
    base = uuid.uuid5(_ID_NAMESPACE, batch_id).int

    def derive(index: int) -> str:
        h = f"{base ^ (index & 0xFFFF_FFFF_FFFF):032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    return derive


# Batch ids become part of a Redis key: longer ones are replaced by a digest.
MAX_BATCH_ID_CHARS = 200


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "accepted": self.accepted,
            "invalid": self.invalid,
            "appended": self.appended,
            "duplicate": self.duplicate,
        }


def _raw(item: Any) -> bytes:
    """The item as JSON, for its dead letter, whatever it holds (never raises).

    Items of a batch sent as JSON text are already their own JSON bytes.

    `json.dumps` keeps what was sent (NaN stays NaN, a lone surrogate
    becomes its \\u escape); what it cannot encode (tuple keys, bytes from
    a Python caller) is shown with `repr`.
    """
    if isinstance(item, bytes):
        return item
    try:
        text = json.dumps(item, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, OverflowError, RecursionError):
        try:
            text = repr(item)
        except (ValueError, RecursionError):  # too deep, or an int too long for str()
            text = f"<unprintable {type(item).__name__}>"
    return text.encode("utf-8", "backslashreplace")


def _batch_key(batch_id: Any) -> str:
    """A usable batch id from whatever the task was given (same input, same id).

    Ids that are long or hold unprintable characters (a newline would forge
    a log line) are replaced by their digest.
    """
    text = batch_id if isinstance(batch_id, str) else "json:" + _raw(batch_id).decode()
    if not text:
        return ""  # EventBuffer.apply picks a fresh id
    if len(text) > MAX_BATCH_ID_CHARS or not text.isprintable():
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        return f"sha256:{digest}"
    return text


_RAW_ITEMS = msgspec.json.Decoder(list[msgspec.Raw])
_ANY = msgspec.json.Decoder()
_JSON_TYPES = {ord("["): "array", ord('"'): "string", ord("t"): "boolean", ord("f"): "boolean",
               ord("n"): "null"}  # fmt: skip


def _items(payload: Any) -> list[Any]:
    """The items of a batch: each a dict, or the JSON bytes of one item.

    A list as sent; the elements of a JSON array sent as text (the producer
    client sends its batch as one JSON text) or still undecoded (a worker
    decodes the events argument of a task body lazily: `worker/bodies.py`);
    any other value is a batch of one item. JSON bytes are decoded straight
    into an Event, with no dict in between.
    """
    if isinstance(payload, msgspec.Raw):
        raw = bytes(payload).lstrip()
        if raw.startswith(b"["):
            return [bytes(item) for item in _RAW_ITEMS.decode(raw)]
        if not raw.startswith(b'"'):
            return [raw]
        payload = _ANY.decode(raw)  # the producer's JSON text, inside a JSON string
    if isinstance(payload, list):
        return [bytes(item) if isinstance(item, msgspec.Raw) else item for item in payload]
    if isinstance(payload, str) and payload.startswith("["):
        try:
            return [bytes(raw) for raw in _RAW_ITEMS.decode(payload)]
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeEncodeError):
            pass  # not a JSON array after all: dead-lettered whole, below
    return [payload]


def _not_an_object(item: bytes) -> str | None:
    """The JSON type of an item that is not an object (an event must be one), or None."""
    text = item.lstrip()
    if text.startswith(b"{"):
        return None
    if not text:
        return "nothing"
    return _JSON_TYPES.get(text[0], "number")


def ingest(
    buffer: EventBuffer, payload: Any, batch_id: str, limits: Limits | None = None
) -> IngestResult:
    """Validate `payload` (a list of event objects) and apply it as batch `batch_id`.

    Applying the same batch id twice does nothing the second time, dead
    letters included, so a redelivered task is harmless. `limits` default
    to the buffer's settings and clock.
    """
    if limits is None:
        limits = Limits.from_settings(buffer.settings, buffer.clock)
    batch_id = _batch_key(batch_id)
    items = _items(payload)
    events: list[Event] = []
    dead: list[tuple[DeadLetter, bytes]] = []
    now = buffer.clock.now_ms()
    max_dead_bytes = max(MIN_DEAD_PAYLOAD_BYTES, 2 * limits.max_event_bytes)
    # The id of an event sent without one follows from the batch id and its
    # position: a redelivered batch routes it to the same shard, whose batch
    # marker skips it (a random id could land on another shard).
    derive = derived_ids(batch_id) if batch_id else None
    for index, item in enumerate(items):
        try:
            if isinstance(item, bytes):  # JSON bytes: from a JSON text or a lazy task body
                kind = _not_an_object(item)
                if kind is not None:
                    raise InvalidEvent("$", f"an event must be an object, got {kind}")
            elif not isinstance(item, dict):
                # JSON text is no event object here: only dicts come from producers.
                raise InvalidEvent("$", f"an event must be an object, got {_json_type(item)}")
            events.append(parse_event(item, limits, partial(derive, index) if derive else None))
        except InvalidEvent as exc:
            raw = _raw(item)
            error = str(exc)
            if len(raw) > max_dead_bytes:
                error += f" (raw payload of {len(raw)} bytes cut to {max_dead_bytes})"
                raw = raw[:max_dead_bytes]
            header = DeadLetter(
                reason=REASON_INVALID_EVENT,
                error=error,
                field=exc.field,
                source="ingest",
                at=now,
                shard=0,  # set to the shard that stores it, by EventBuffer.apply
                claim=batch_id,
            )
            dead.append((header, raw))
    result = buffer.apply(events, batch_id=batch_id, dead_letters=dead)
    return IngestResult(
        batch_id=result.batch_id,
        accepted=len(events),
        invalid=len(dead),
        appended=result.appended,
        duplicate=result.duplicate,
        max_queue_length=max(result.queue_lengths.values(), default=0),
        kinds=dict(result.kinds),
    )


def _json_type(item: Any) -> str:
    if item is None:
        return "null"
    if isinstance(item, bool):
        return "boolean"
    if isinstance(item, int | float):
        return "number"
    if isinstance(item, str):
        return "string"
    if isinstance(item, list):
        return "array"
    return type(item).__name__


# -- whole batches that could not be applied -----------------------------------------


def batch_bytes(payload: Any) -> bytes:
    """A task's batch as stored in a dead letter: the JSON text as sent, or the list as JSON."""
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogatepass")
    if isinstance(payload, msgspec.Raw):  # as the worker left it (worker/bodies.py)
        return bytes(payload)
    return _raw(payload)


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
    result = buffer.apply([], batch_id=f"dead:{_batch_key(batch_id)}", dead_letters=[(header, raw)])
    return not result.duplicate


class TaskBodyError(ValueError):
    """A task body holds no batch of events eventbuffer can read."""


def body_batch(task: str, body: bytes) -> Any:
    """The events argument of a raw Celery task body for `task`, as `ingest()` takes it.

    Protocol 2 bodies are `[args, kwargs, embed]`, protocol 1 bodies
    `{"args": ..., "kwargs": ...}`; the events are the first argument, or the
    `events` (`event` for ingest_event) keyword. Raises TaskBodyError when the
    body is not JSON or holds neither.
    """
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise TaskBodyError(f"the task body is not JSON: {exc}") from None
    if isinstance(decoded, list):
        args = decoded[0] if decoded else None
        kwargs = decoded[1] if len(decoded) > 1 else None
    elif isinstance(decoded, dict):
        args, kwargs = decoded.get("args"), decoded.get("kwargs")
    else:
        raise TaskBodyError("the task body is neither a protocol 1 nor a protocol 2 body")
    single = task == TASK_INGEST_EVENT
    keyword = "event" if single else "events"
    if isinstance(args, list) and args:
        value = args[0]
    elif isinstance(kwargs, dict) and keyword in kwargs:
        value = kwargs[keyword]
    else:
        raise TaskBodyError(f"the task body carries no {keyword} argument")
    return [value] if single else value
