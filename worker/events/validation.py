"""Untrusted input to a normalized `Event`: `parse_event`, and the `Limits` it applies.

`parse_event()` is the one entry point for untrusted input (dicts from
Celery, JSON bytes from a producer); it returns a normalized `Event` or
raises `InvalidEvent` naming the field and the problem.

It decodes the input into an `Event` (msgspec checks the types and
constraints), then normalizes it here, with the limits and the default id
passed in as arguments: `id` a canonical UUID (assigned when missing),
`created_at` a UTC string `YYYY-MM-DD HH:MM:SS.mmm` (`worker.events.dates`),
`properties` a flat string->string map (`worker.events.properties`).

Limits (`Limits`, from the settings `EVENT_BUFFER_MAX_EVENT_BYTES`,
`EVENT_BUFFER_MAX_FUTURE_S` and `EVENT_BUFFER_MAX_PAST_DAYS`; their defaults
when none are given): `created_at` and `imported_at` must lie within
[now - max past, now + max future] of the limits' clock, and the encoded JSON
row within `max_event_bytes`. Besides those, `parse_event` refuses what
cannot be stored faithfully: NaN and infinities, strings that are not valid
UTF-8 (bytes input, or Python strings with lone surrogates), non-string
property keys, properties nested deeper than `MAX_PROPERTY_DEPTH`.

`parse_event` encodes the row once, to measure it, and keeps it on the event:
`encode_event` returns that row instead of encoding again. So an event must
not be changed after `parse_event` (build a new one with
`msgspec.structs.replace`, which carries no row).
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import InvalidEvent
from worker.events.dates import _FAST_FORMS, _SECONDS, _canonical_date, clip, normalize_date
from worker.events.model import Event
from worker.events.problems import decode_problem, invalid, oversized, surrogate_field, too_deep
from worker.events.properties import flattened
from worker.settings import Settings

_DEFAULTS = Settings()


@dataclass(frozen=True)
class Limits:
    """What `parse_event` accepts beyond the event's shape.

    `max_future_ms` / `max_past_ms` bound `created_at` and `imported_at`
    around `clock.now_ms()`; `max_event_bytes` bounds the encoded JSON row.
    The defaults are those of the settings.
    """

    max_event_bytes: int = _DEFAULTS.max_event_bytes
    max_future_ms: int = _DEFAULTS.max_future_s * 1000
    max_past_ms: int = _DEFAULTS.max_past_days * 86_400_000
    clock: Clock = field(default=SYSTEM_CLOCK, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock = SYSTEM_CLOCK) -> Limits:
        return cls(
            max_event_bytes=settings.max_event_bytes,
            max_future_ms=settings.max_future_s * 1000,
            max_past_ms=settings.max_past_days * 86_400_000,
            clock=clock,
        )


DEFAULT_LIMITS = Limits()

_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(Event)
_batch_decoder = msgspec.json.Decoder(list[Event])
_encode = _encoder.encode
_canonical_uuid = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z"
).match


def parse_event(
    obj: Any, limits: Limits | None = None, default_id: Callable[[], str] | None = None
) -> Event:
    """Validate untrusted input (a dict, JSON bytes or str) into a normalized Event.

    `limits` default to the settings' defaults (`DEFAULT_LIMITS`); an event
    without an `id` gets `default_id()` (a canonical UUID), or a random one.
    Raises `InvalidEvent` naming the field for anything it cannot accept.
    """
    if limits is None:
        limits = DEFAULT_LIMITS
    try:
        if isinstance(obj, dict):
            event = msgspec.convert(obj, Event)
        elif isinstance(obj, bytes | bytearray | memoryview | str):
            event = _event_decoder.decode(obj)
        else:
            raise InvalidEvent("$", f"an event must be an object, got {type(obj).__name__}")
    except msgspec.ValidationError as exc:
        raise invalid(obj, Event, exc) from None
    except msgspec.DecodeError as exc:
        raise InvalidEvent("$", decode_problem(obj, exc)) from None
    except UnicodeEncodeError:  # a str holding lone surrogates, before any parsing
        raise InvalidEvent("$", "not valid UTF-8 (the text holds a lone surrogate)") from None
    except RecursionError:  # JSON nested ~1,000 levels deep: the decoder's own limit
        raise too_deep(obj) from None
    if not event.id:
        event.id = default_id() if default_id is not None else _uuid4()
    elif not _canonical_uuid(event.id):
        event.id = _normalize_id(event.id)
    now = limits.clock.now_ms()
    return _finished(
        event, now - limits.max_past_ms, now + limits.max_future_ms, limits.max_event_bytes
    )


def parse_events(
    batch: bytes | list[Any], limits: Limits, default_id: Callable[[int], str] | None = None
) -> list[Event | InvalidEvent] | None:
    """A batch's events in one decode: each normalized `Event`, or the `InvalidEvent` it
    raised; None when the batch does not decode whole as a list of events (an item
    not an object, of the wrong types, ...): then each item goes through `parse_event`
    on its own, which names its field.

    `batch` is a JSON array (bytes) or a list of dicts; an event without an
    `id` at position n gets `default_id(n)`, or a random one. The same
    checks, in the same order, as `parse_event` on each item.
    """
    try:
        if isinstance(batch, list):
            events = msgspec.convert(batch, list[Event])
        else:
            events = _batch_decoder.decode(batch)
    except (msgspec.MsgspecError, RecursionError, UnicodeEncodeError):
        return None
    now = limits.clock.now_ms()
    low, high = now - limits.max_past_ms, now + limits.max_future_ms
    max_bytes = limits.max_event_bytes
    seconds_of, forms = _SECONDS, _FAST_FORMS
    out: list[Event | InvalidEvent] = []
    append = out.append
    for index, event in enumerate(events):
        try:
            if not event.id:
                event.id = default_id(index) if default_id is not None else _uuid4()
            elif not _canonical_uuid(event.id):
                event.id = _normalize_id(event.id)
            # The common event, `_finished` inline: a date of a minute seen before (the
            # lookups of `_canonical_date`) within the bounds, no imported_at, an ASCII
            # country (the coordinates need no check: the model's ranges refuse NaN and
            # infinities). Any other goes through `_finished`, whose results are the same.
            created = event.created_at
            if type(created) is str and (form := forms.get(len(created))) is not None:
                minute = form[0].get(created[:17])
                second = seconds_of.get(created[17:20])
                milli = form[1].get(created[20:])
                if minute is not None and second is not None and milli is not None:
                    created_ms = minute[1] + second + milli
                    if (
                        low <= created_ms <= high
                        and event.imported_at is None
                        and event.country.isascii()
                    ):
                        properties = event.properties
                        for value in properties.values():
                            if type(value) is not str:
                                event.properties = flattened(properties)
                                break
                        event.created_at = minute[0] + created[17:23]
                        append(_stored(event, created_ms, max_bytes))
                        continue
            append(_finished(event, low, high, max_bytes))
        except InvalidEvent as exc:
            append(exc)
    return out


def _finished(event: Event, low: int, high: int, max_bytes: int) -> Event:
    """A decoded event brought to the stored form, with its encoded row kept on it.

    Checks what the types cannot, once every field has decoded (as a
    `__post_init__` would), so an event with a field of the wrong type is
    reported for that field first; the id is normalized (or assigned) before. `low` and
    `high` bound `created_at` and `imported_at` (epoch ms), `max_bytes` the row.
    The common case (a canonical id and date, flat string properties) takes
    no call it can do without; anything else gets the general path and its error.
    """
    created = event.created_at
    if (
        type(created) is str
        and (fast := _canonical_date(created)) is not None
        and low <= fast[1] <= high
    ):
        event.created_at, created_ms = fast
    else:
        event.created_at, created_ms = normalize_date("created_at", created, (low, high))
    if event.imported_at is not None:
        event.imported_at = normalize_date("imported_at", event.imported_at, (low, high))[0]
    properties = event.properties
    if properties:
        for value in properties.values():
            if type(value) is not str:
                event.properties = flattened(properties)
                break
    # The column is FixedString(2): two bytes, not two characters (ASCII: one each, and
    # the model allows two characters at most).
    country = event.country
    if country and not country.isascii() and len(country.encode("utf-8", "surrogatepass")) > 2:
        raise InvalidEvent("country", f"longer than 2 bytes in UTF-8: {country!r}")
    if event.longitude is not None and not math.isfinite(event.longitude):
        raise InvalidEvent("longitude", "must be a finite number")
    if event.latitude is not None and not math.isfinite(event.latitude):
        raise InvalidEvent("latitude", "must be a finite number")
    return _stored(event, created_ms, max_bytes)


def _stored(event: Event, created_ms: int, max_bytes: int) -> Event:
    """The normalized event with its row (encoded, within `max_bytes`) and the epoch ms
    of its `created_at` kept on it."""
    try:
        row = _encode(event)
    except UnicodeEncodeError:
        raise surrogate_field(event, event.properties) from None
    if len(row) > max_bytes:
        raise oversized(event, len(row), max_bytes)
    kept = event.__dict__
    kept["_created_ms"] = created_ms
    kept["_row"] = row
    return event


def _normalize_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidEvent("id", f"not a UUID: {clip(value)!r}") from None


def _uuid4() -> str:
    """`str(uuid.uuid4())`, in half the time."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
