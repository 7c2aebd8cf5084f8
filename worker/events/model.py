"""The event row's models: `Row` (stored, trusted) and `Event` (untrusted input).

Two models of OpenPanel's `IClickhouseEvent`, field for field. `Row` is a
stored row eventbuffer wrote itself, decoded as it is (`decode_row`).
`Event` holds what untrusted input may send (dates as text or epoch ms,
nested properties) with its constraints; it is built only by
`worker.events.validation.parse_event`, which normalizes it.

The JSON row omits fields at their defaults (ClickHouse fills those in). The
order of its fields is free: a waiting view is stored without its duration
(worker/stored_view.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, ClassVar

import msgspec

from worker.events.dates import datetime_ms
from worker.events.problems import invalid

KIND_REGULAR = "r"
KIND_SCREEN_VIEW = "v"
KIND_SESSION_END = "e"
KIND_NAMES = {
    KIND_REGULAR: "regular",
    KIND_SCREEN_VIEW: "screen_view",
    KIND_SESSION_END: "session_end",
}

Country = Annotated[str, msgspec.Meta(max_length=2)]
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Longitude = Annotated[float, msgspec.Meta(ge=-180, le=180)]
Latitude = Annotated[float, msgspec.Meta(ge=-90, le=90)]


class Row(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A stored event row: what eventbuffer wrote itself, so already valid and normalized.

    The trusted side of the model, for rows read back from Redis (the flush,
    the sweep, the native sink, last views, dead-letter round trips).
    Decoding one checks the JSON types and nothing else: no normalization,
    no limits. Untrusted input goes through `Event` (`parse_event`).
    """

    id: str = ""
    name: str
    device_id: str = ""
    profile_id: str = ""
    project_id: str
    session_id: str = ""
    path: str = ""
    origin: str = ""
    referrer: str = ""
    referrer_name: str = ""
    referrer_type: str = ""
    properties: dict[str, str] = {}
    created_at: str  # `YYYY-MM-DD HH:MM:SS.mmm`, UTC
    country: str = ""
    city: str = ""
    region: str = ""
    longitude: float | None = None
    latitude: float | None = None
    os: str = ""
    os_version: str = ""
    browser: str = ""
    browser_version: str = ""
    device: str = ""
    brand: str = ""
    model: str = ""
    imported_at: str | None = None
    sdk_name: str = ""
    sdk_version: str = ""
    duration: int = 0

    # True for a row that went through the buffer's rules already (a flush dead letter
    # replayed: worker/replay.py's QueuedRow): queued as it is, whatever its name. The
    # planning loops (worker/apply_plan.py) read this, not `kind`, per event.
    queued_as_is: ClassVar[bool] = False

    @property
    def kind(self) -> str:
        """How the buffer treats this event: regular, screen_view or session_end."""
        if self.session_id and not self.queued_as_is:
            if self.name == "screen_view":
                return KIND_SCREEN_VIEW
            if self.name == "session_end":
                return KIND_SESSION_END
        return KIND_REGULAR

    @property
    def created_ms(self) -> int:
        """Epoch ms of `created_at`."""
        return datetime_ms(self.created_at)


class Event(Row, kw_only=True, omit_defaults=True, dict=True):
    """An event from outside (a producer, a replay), as decoded: normalized by `parse_event`.

    The same fields as `Row`, in the same order, with what untrusted input may
    hold (dates as text or epoch ms, nested properties) and its constraints.
    Decoding checks the types and constraints; `parse_event` then normalizes
    the values to Row's (`worker.events.validation`). Build one with
    `parse_event` only.
    """

    # dict=True: room for the row `parse_event` encoded and the epoch ms of
    # created_at (never themselves encoded).
    name: Annotated[str, msgspec.Meta(min_length=1)]
    project_id: Annotated[str, msgspec.Meta(min_length=1)]
    properties: dict[str, Any] = {}
    # Wider than Row's on input; `parse_event` normalizes them to Row's types.
    created_at: str | int | float  # type: ignore[assignment]
    country: Country = ""
    longitude: Longitude | None = None
    latitude: Latitude | None = None
    imported_at: str | int | float | None = None  # type: ignore[assignment]
    duration: NonNegative = 0

    @property
    def created_ms(self) -> int:
        """Epoch ms of `created_at`: kept from validation, else parsed (copies)."""
        known: int | None = self.__dict__.get("_created_ms")
        if known is not None:
            return known
        assert isinstance(self.created_at, str)
        return datetime_ms(self.created_at)


class RowHead(msgspec.Struct, gc=False):
    """The few fields a flush needs from a stored row: decoding skips the rest.

    Not tracked by the garbage collector (`gc=False`: strings only, no cycle
    possible): a flush decodes one per row, and tracked they would set off a
    collection every 700.
    """

    id: str
    created_at: str
    project_id: str


_encoder = msgspec.json.Encoder()
_row_head_decoder = msgspec.json.Decoder(RowHead)
_row_decoder = msgspec.json.Decoder(Row)


def encode_event(event: Row) -> bytes:
    """The event's JSON row (the one `parse_event` made, when it made one)."""
    row: bytes | None = getattr(event, "_row", None)
    return _encoder.encode(event) if row is None else row


def decode_row(data: bytes | str) -> Row:
    """Decode a stored JSON row (trusted, already normalized: nothing is re-checked)."""
    try:
        return _row_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise invalid(data, Row, exc) from None


def decode_row_head(data: bytes) -> RowHead:
    """Decode only id, created_at and project_id; raises msgspec errors on bad rows."""
    return _row_head_decoder.decode(data)


def decode_row_heads(rows: Iterable[bytes]) -> list[RowHead]:
    """`decode_row_head` of every row in one call (no Python frame per row); raises msgspec
    errors at the first bad row."""
    return list(map(_row_head_decoder.decode, rows))


def as_row(event: Row) -> Row:
    """The stored form of an event: what `decode_row` gives back for its row."""
    return event if type(event) is Row else decode_row(encode_event(event))
