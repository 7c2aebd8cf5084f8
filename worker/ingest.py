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
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec

from worker import bodies
from worker.apply import content_digest
from worker.buffer import EventBuffer
from worker.deadletters import (
    REASON_BATCH_ID_CONFLICT,
    REASON_INVALID_EVENT,
    REASON_UNDELIVERABLE,
    DeadLetter,
)
from worker.errors import InvalidEvent
from worker.events import Event, Limits, encode_event, parse_event
from worker.json_slices import JsonSliceError, split_array
from worker.names import TASK_INGEST_EVENT, TASK_INGEST_EVENTS
from worker.privacy.tombstones import drop_forgotten_events

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
    base = uuid.uuid5(_ID_NAMESPACE, batch_id).int

    def derive(index: int) -> str:
        h = f"{base ^ (index & 0xFFFF_FFFF_FFFF):032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    return derive


# Batch ids become part of a Redis key. A task's batch_id argument must be a string of
# printable characters no longer than this (else the task is undeliverable); a task id
# (the batch id when the argument is absent) that is not is replaced by its digest.
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


def _raw(item: Any) -> bytes:
    """The item as JSON, for its dead letter, whatever it holds (never raises).

    Items of a batch sent as JSON text are already their own JSON bytes.

    `json.dumps` keeps what was sent (NaN stays NaN, a lone surrogate
    becomes its \\u escape); what it cannot encode (tuple keys, bytes from
    a Python caller) is shown with `repr`.
    """
    if isinstance(item, bytes):
        return item
    if isinstance(item, msgspec.Raw):  # a keyword argument left undecoded (worker/bodies.py)
        return bytes(item)
    try:
        text = json.dumps(item, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, OverflowError, RecursionError):
        try:
            text = repr(item)
        except (ValueError, RecursionError):  # too deep, or an int too long for str()
            text = f"<unprintable {type(item).__name__}>"
    return text.encode("utf-8", "backslashreplace")


def batch_id_problem(value: Any) -> str | None:
    """Why a task's `batch_id` argument cannot be a batch id, or None when it can.

    Absent (None) or empty, the task id is the batch id. Anything else must
    be a string of at most MAX_BATCH_ID_CHARS printable characters: a batch
    id says which deliveries are one batch, so a value that is not one (an
    event passed as a second argument, say) must never become one.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        return f"the batch_id argument must be a string, got {_json_type(value)}"
    if len(value) > MAX_BATCH_ID_CHARS:
        return f"the batch_id argument is longer than {MAX_BATCH_ID_CHARS} characters"
    if not value.isprintable():
        return "the batch_id argument holds unprintable characters"
    return None


def _batch_key(batch_id: str) -> str:
    """A usable batch id from a batch id or task id (same input, same id).

    Ids that are long or hold unprintable characters (a newline would forge
    a log line) are replaced by their digest: only a task id can be one (a
    task's batch_id argument is checked before the task runs:
    `batch_id_problem`, worker/consumer.py). Anything but a string is refused.
    """
    if not isinstance(batch_id, str):
        raise TypeError(f"a batch id must be a string, got {type(batch_id).__name__}")
    if not batch_id:
        return ""  # EventBuffer.apply picks a fresh id
    if len(batch_id) > MAX_BATCH_ID_CHARS or not batch_id.isprintable():
        digest = hashlib.sha256(batch_id.encode("utf-8", "surrogatepass")).hexdigest()
        return f"sha256:{digest}"
    return batch_id


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
    into an Event, with no dict in between. An array msgspec cannot cut
    into items (one nested too deep, NaN, an integer out of range) is cut by
    `split_array`, so each item is judged on its own.
    """
    if isinstance(payload, msgspec.Raw):
        raw = bytes(payload).lstrip()
        if raw.startswith(b"["):
            items = _array_items(raw)
            return [raw] if items is None else items
        if not raw.startswith(b'"'):
            return [raw]
        try:
            payload = _ANY.decode(raw)  # the producer's JSON text, inside a JSON string
        except msgspec.DecodeError:
            return [raw]
    if isinstance(payload, list):
        return [bytes(item) if isinstance(item, msgspec.Raw) else item for item in payload]
    if isinstance(payload, str) and payload.startswith("["):
        try:
            items = _array_items(payload.encode("utf-8"))
        except UnicodeEncodeError:
            items = None
        if items is not None:
            return items
        # not a JSON array after all (or not UTF-8): dead-lettered whole, below
    return [payload]


def _array_items(raw: bytes) -> list[Any] | None:
    """The JSON text of each item of a JSON array; None when it is not one."""
    try:
        return [bytes(item) for item in _RAW_ITEMS.decode(raw)]
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        pass
    try:
        return list(split_array(raw))
    except JsonSliceError:
        return None


def _not_an_object(item: bytes) -> str | None:
    """The JSON type of an item that is not an object (an event must be one), or None."""
    text = item.lstrip()
    if text.startswith(b"{"):
        return None
    if not text:
        return "nothing"
    return _JSON_TYPES.get(text[0], "number")


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
    batch_id = _batch_key(batch_id)
    items = _items(payload)
    events: list[Event] = []
    positions: list[int] = []  # of each valid event in `items`
    invalid: list[int] = []  # positions of the items dead-lettered
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
            positions.append(index)
        except InvalidEvent as exc:
            invalid.append(index)
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
    digest = batch_digest(items, events, positions, invalid)

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
            raw = b"[" + b",".join(_item_bytes(items[n]) for n in left) + b"]"
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
    events, positions = drop_forgotten_events(
        buffer.redis, buffer.keyspace, events, positions, buffer.clock
    )
    result = buffer.apply(
        events, batch_id=batch_id, dead_letters=dead, digest=digest, keep_conflict=keep
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
    return bytes(value) if isinstance(value, msgspec.Raw) else _raw(value)


def batch_digest(
    items: list[Any], events: list[Event], positions: list[int], invalid: list[int]
) -> str:
    """The digest of a batch's content, which its batch markers hold.

    Of the valid events' rows (canonical JSON, derived ids included) and
    the invalid items in a canonical form (keys sorted, compact), in the
    batch's order: a redelivery matches even when its body was re-encoded
    on the way (a Celery retry re-sends the arguments as Python's JSON).
    """
    parts: list[bytes] = [b""] * len(items)
    for n, event in zip(positions, events, strict=True):
        parts[n] = encode_event(event)
    for n in invalid:
        parts[n] = b"!" + _canonical(items[n])
    return content_digest(parts)


def _canonical(item: Any) -> bytes:
    """An invalid item as canonical JSON (keys sorted), or its raw bytes when it is no JSON."""
    try:
        value = _ANY.decode(item) if isinstance(item, bytes) else item
        return msgspec.json.encode(value, order="sorted")
    except (msgspec.DecodeError, TypeError, ValueError, OverflowError, RecursionError):
        return _raw(item)


def _item_bytes(item: Any) -> bytes:
    """An item of a batch as the JSON text it was sent as (or its JSON, for a dict)."""
    return item if isinstance(item, bytes) else _raw(item)


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
    if isinstance(item, dict):
        return "object"
    return type(item).__name__


# -- whole batches that could not be applied -----------------------------------------


def batch_bytes(payload: Any) -> bytes:
    """A task's batch as stored in a dead letter: the JSON text as sent, or the list as JSON.

    A list's items that the worker left undecoded (`msgspec.Raw`: the single
    event of `ingest_event`) are kept as the JSON text they were sent as.
    """
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogatepass")
    if isinstance(payload, msgspec.Raw):  # as the worker left it (worker/bodies.py)
        return bytes(payload)
    if isinstance(payload, list) and any(isinstance(item, msgspec.Raw) for item in payload):
        raws = (bytes(item) if isinstance(item, msgspec.Raw) else _raw(item) for item in payload)
        return b"[" + b",".join(raws) + b"]"
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
    # The marker holds the digest of `raw`: another batch or body under the same id
    # (ids reused by a producer) is kept too, once (under its conflict key).
    result = buffer.apply(
        [],
        batch_id=f"dead:{_batch_key(batch_id)}",
        dead_letters=[(header, raw)],
        keep_conflict=lambda applied, stored: (header, raw),
    )
    return not result.duplicate


class TaskBodyError(ValueError):
    """A task body holds no batch of events eventbuffer can read."""


def body_batch(task: str, body: bytes) -> Any:
    """The events argument of a raw Celery task body for `task`, as `ingest()` takes it.

    Protocol 2 bodies are `[args, kwargs, embed]`, protocol 1 bodies
    `{"args": ..., "kwargs": ...}`; the events are the first argument, or the
    `events` (`event` for ingest_event) keyword. Every other argument that
    is not a usable batch id (`send_task("eventbuffer.ingest_event",
    args=[e1, e2])`, whose `e2` lands in `batch_id`; arguments the task does
    not take) is added to the batch as one more item: an event, or an
    invalid_event dead letter once replayed, never dropped. Raises
    TaskBodyError when the body is not JSON or holds no events. The body is
    decoded as a worker decodes it (`worker/bodies.py`): the events stay raw
    JSON, and a body with an event nested too deep or holding NaN still
    yields its events (each judged on its own by `ingest()`).
    """
    try:
        decoded = bodies.decode(body)
    except RecursionError:
        raise TaskBodyError("the task body is nested too deeply to decode") from None
    except ValueError as exc:  # msgspec's, json's and the slicer's errors
        raise TaskBodyError(f"the task body is not JSON: {one_line(exc)}") from None
    if isinstance(decoded, list | tuple):
        args = decoded[0] if decoded else None
        kwargs = decoded[1] if len(decoded) > 1 else None
    elif isinstance(decoded, dict):
        args, kwargs = decoded.get("args"), decoded.get("kwargs")
    else:
        raise TaskBodyError("the task body is neither a protocol 1 nor a protocol 2 body")
    single = task == TASK_INGEST_EVENT
    keyword = "event" if single else "events"
    args = args if isinstance(args, list) else []
    kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
    if args:
        value, rest = args[0], args[1:]
    elif keyword in kwargs:
        value, rest = kwargs.pop(keyword), []
    else:
        raise TaskBodyError(f"the task body carries no {keyword} argument")
    if rest and "batch_id" not in kwargs:
        kwargs["batch_id"] = rest.pop(0)
    if "batch_id" in kwargs and batch_id_problem(_decoded(kwargs["batch_id"])) is None:
        del kwargs["batch_id"]
    extra = rest + list(kwargs.values())
    if not extra:
        return [value] if single else value
    return [value, *extra] if single else [*_items(value), *extra]


def _decoded(value: Any) -> Any:
    """A task argument the worker's decoder left raw, decoded (itself if it is not JSON)."""
    if not isinstance(value, msgspec.Raw):
        return value
    try:
        return msgspec.json.decode(value)
    except (msgspec.DecodeError, RecursionError):
        return value


def one_line(error: object, limit: int = 300) -> str:
    """An error's text on one line, cut: it may quote the hostile input at length."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
