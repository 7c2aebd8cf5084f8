"""The one place the importer touches the event model (worker/events.py).

An import validates each record exactly as the ingest task does
(`parse_event`, with the limits of the settings) and writes the stored row
encoding the flush writes. Everything the importer needs of that model goes
through the few functions here, so a change to worker/events.py has one
place to follow.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from worker.events import InvalidEvent, Limits, decode_row, encode_event, parse_event
from worker.settings import Settings

__all__ = [
    "KIND_REGULAR",
    "KIND_SCREEN_VIEW",
    "KIND_SESSION_END",
    "InvalidEvent",
    "Valid",
    "finish_row",
    "limits_for",
    "stable_id",
    "validate",
    "with_field",
]

KIND_REGULAR = "r"
KIND_SCREEN_VIEW = "v"
KIND_SESSION_END = "e"

_encode = msgspec.json.Encoder().encode

# The namespace of every id the importer derives (uuid5-style: SHA-1, version 5).
NAMESPACE = uuid.UUID("5f0c3f4e-6f0e-5a7e-9d0b-7a1f3c2b9e01")


class Valid(msgspec.Struct, frozen=True):
    """A validated event, as the importer keeps it until it is written."""

    id: str
    project_id: str
    session_id: str
    name: str
    created_ms: int
    duration: int  # the event's own duration (0 unless the record carried one)
    row: bytes  # the stored JSON row (worker/events.py's encoding)


def limits_for(settings: Settings) -> Limits:
    """The limits the ingest task validates with."""
    return Limits.from_settings(settings)


def validate(
    record: Any,
    limits: Limits,
    default_id: Callable[[], str] | None,
    imported_at: str | None = None,
) -> Valid:
    """`parse_event` on one record (JSON bytes or a dict); raises InvalidEvent. With
    `imported_at`, the row carries it unless the record had its own."""
    event = parse_event(record, limits, default_id)
    row = encode_event(event)
    if imported_at is not None and event.imported_at is None:
        row = with_field(row, "imported_at", imported_at)
    return Valid(
        event.id,
        event.project_id,
        event.session_id,
        event.name,
        event.created_ms,
        event.duration,
        row,
    )


def kind_of(name: str) -> str:
    """How the live path treats an event of this name within a session."""
    if name == "screen_view":
        return KIND_SCREEN_VIEW
    if name == "session_end":
        return KIND_SESSION_END
    return KIND_REGULAR


def with_field(row: bytes, name: str, value: str | int) -> bytes:
    """The JSON row with one more field, `name` (which it must not hold), at its end:
    JSONEachRow and the native sink's decoding take fields in any order."""
    return b'%b,"%b":%b}' % (row[:-1], name.encode(), _encode(value))


def finish_row(row: bytes, own: int, duration: int | None, session_id: str | None) -> bytes:
    """The row as it is inserted: the duration and session the durations pass gave it
    (None: unchanged). `own` is the event's own duration: 0 means the row has no
    `duration` (omitted as a default), nor has it a `session_id` when one is derived,
    so both are added to its bytes; a duration replacing another re-encodes it."""
    if duration is not None and duration != own:
        if own == 0:
            row = with_field(row, "duration", duration)
        else:
            row = encode_event(msgspec.structs.replace(decode_row(row), duration=duration))
    if session_id is not None:
        row = with_field(row, "session_id", session_id)
    return row


def stable_id(*parts: str | bytes | int) -> str:
    """A deterministic UUID (version 5 layout) of `parts`: a re-import finds the same id."""
    digest = hashlib.sha1(NAMESPACE.bytes)
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return str(uuid.UUID(bytes=digest.digest()[:16], version=5))
