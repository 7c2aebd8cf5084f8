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
]

KIND_REGULAR = "r"
KIND_SCREEN_VIEW = "v"
KIND_SESSION_END = "e"

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


def validate(record: Any, limits: Limits, default_id: Callable[[], str] | None) -> Valid:
    """`parse_event` on one record (JSON bytes or a dict); raises InvalidEvent."""
    event = parse_event(record, limits, default_id)
    return Valid(
        event.id,
        event.project_id,
        event.session_id,
        event.name,
        event.created_ms,
        event.duration,
        encode_event(event),
    )


def kind_of(name: str) -> str:
    """How the live path treats an event of this name within a session."""
    if name == "screen_view":
        return KIND_SCREEN_VIEW
    if name == "session_end":
        return KIND_SESSION_END
    return KIND_REGULAR


def finish_row(row: bytes, imported_at: str, duration: int | None, session_id: str | None) -> bytes:
    """The row as it is inserted: `imported_at` set (unless the record had one), and the
    duration and session the durations pass gave it (None: unchanged)."""
    stored = decode_row(row)
    changes: dict[str, Any] = {}
    if stored.imported_at is None:
        changes["imported_at"] = imported_at
    if duration is not None and duration != stored.duration:
        changes["duration"] = duration
    if session_id is not None:
        changes["session_id"] = session_id
    if not changes:
        return row
    return encode_event(msgspec.structs.replace(stored, **changes))


def stable_id(*parts: str | bytes | int) -> str:
    """A deterministic UUID (version 5 layout) of `parts`: a re-import finds the same id."""
    digest = hashlib.sha1(NAMESPACE.bytes)
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return str(uuid.UUID(bytes=digest.digest()[:16], version=5))
