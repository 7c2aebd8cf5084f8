"""Who is forgotten: a project and one of its person's ids, and which events are theirs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from worker.errors import InvalidEvent
from worker.events import datetime_ms, parse_datetime
from worker.keys import escape

# The selectors `eventbuffer forget` takes, each the event field it matches.
KINDS = ("profile", "device", "session")


class PersonHead(msgspec.Struct):
    """The fields of a stored row that say whose it is and when it was created."""

    project_id: str
    created_at: str
    profile_id: str = ""
    device_id: str = ""
    session_id: str = ""


_head_decoder = msgspec.json.Decoder(PersonHead)
_any_decoder = msgspec.json.Decoder()


@dataclass(frozen=True)
class Selector:
    """A person of a project, named by one id: `kind` is profile, device or session."""

    project_id: str
    kind: str
    value: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"a selector is one of {', '.join(KINDS)}, not {self.kind!r}")
        if not self.project_id or not self.value:
            raise ValueError("a selector needs a project id and a non-empty id")

    @property
    def column(self) -> str:
        """The events column that holds the id."""
        return f"{self.kind}_id"

    @property
    def field(self) -> str:
        """The tombstone's field in its project's hash."""
        return tombstone_field(self.kind, self.value)

    @property
    def needle(self) -> bytes:
        """The id as msgspec writes it in a stored row: a row without it is not theirs."""
        return msgspec.json.encode(self.value)

    def owns_head(self, head: PersonHead, until_ms: int) -> bool:
        if head.project_id != self.project_id or getattr(head, self.column) != self.value:
            return False
        try:
            return datetime_ms(head.created_at) <= until_ms
        except ValueError:
            return True  # a stored row with a date we cannot read: theirs all the same

    def owns_row(self, row: bytes, until_ms: int) -> bool:
        """Whether a stored JSON row (trusted, normalized) is one of theirs up to `until_ms`."""
        if self.needle not in row:
            return False
        try:
            head = _head_decoder.decode(row)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        return self.owns_head(head, until_ms)

    def owns_raw(self, item: Any, until_ms: int) -> bool:
        """Whether an untrusted decoded event (a dead letter's) is one of theirs.

        An event whose date cannot be read counts as theirs: nobody can tell
        when it was created, and it is kept only to be looked at.
        """
        if not isinstance(item, dict):
            return False
        if item.get("project_id") != self.project_id or item.get(self.column) != self.value:
            return False
        created = item.get("created_at")
        try:
            if not isinstance(created, str | int | float):
                return True
            moment: datetime = parse_datetime("created_at", created)
        except InvalidEvent:
            return True
        return int(moment.timestamp() * 1000) <= until_ms


def tombstone_field(kind: str, value: str) -> str:
    """A tombstone's field: "<kind>:<escaped id>"."""
    return f"{kind}:{escape(value)}"


def decode_any(data: bytes) -> Any:
    """Untrusted JSON; raises msgspec.DecodeError (also for JSON nested too deep)."""
    return _any_decoder.decode(data)
