"""The event row: its msgspec model, validation, id assignment and JSON encoding.

`Event` mirrors OpenPanel's `IClickhouseEvent`. `parse_event()` is the one
entry point for untrusted input (dicts from Celery, JSON bytes from a
producer); it returns a normalized `Event` or raises `InvalidEvent` naming the
field and the problem.

Normalized means: `id` is a canonical UUID (assigned here when missing),
`created_at` is a UTC string `YYYY-MM-DD HH:MM:SS.mmm`, `properties` is a
flat string->string map (nested objects become dotted keys, as OpenPanel's
`toDots` does; nulls are dropped).

The JSON row omits fields at their defaults (ClickHouse fills those in), and
`duration` is the last field: the apply script rewrites a stored
screen_view's duration at the end of its JSON without decoding it.
"""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec

MAX_PROPERTY_DEPTH = 8

KIND_REGULAR = "r"
KIND_SCREEN_VIEW = "v"
KIND_SESSION_END = "e"
KIND_NAMES = {
    KIND_REGULAR: "regular",
    KIND_SCREEN_VIEW: "screen_view",
    KIND_SESSION_END: "session_end",
}


class InvalidEvent(ValueError):
    """An event failed validation. `field` is a dotted path, `problem` says why."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


Country = Annotated[str, msgspec.Meta(max_length=2)]
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str = ""
    name: Annotated[str, msgspec.Meta(min_length=1)]
    device_id: str = ""
    profile_id: str = ""
    project_id: Annotated[str, msgspec.Meta(min_length=1)]
    session_id: str = ""
    path: str = ""
    origin: str = ""
    referrer: str = ""
    referrer_name: str = ""
    referrer_type: str = ""
    properties: dict[str, Any] = {}
    created_at: str | int | float
    country: Country = ""
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
    imported_at: str | int | float | None = None
    sdk_name: str = ""
    sdk_version: str = ""
    # Keep `duration` the last field: the apply script relies on it.
    duration: NonNegative = 0

    def __post_init__(self) -> None:
        self.id = _normalize_id(self.id)
        self.created_at = format_datetime(parse_datetime("created_at", self.created_at))
        if self.imported_at is not None:
            self.imported_at = format_datetime(parse_datetime("imported_at", self.imported_at))
        if self.properties:
            self.properties = flatten_properties(self.properties)
        for name in ("longitude", "latitude"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise InvalidEvent(name, "must be a finite number")

    @property
    def kind(self) -> str:
        """How the buffer treats this event: regular, screen_view or session_end."""
        if self.session_id:
            if self.name == "screen_view":
                return KIND_SCREEN_VIEW
            if self.name == "session_end":
                return KIND_SESSION_END
        return KIND_REGULAR

    @property
    def created_ms(self) -> int:
        assert isinstance(self.created_at, str)
        return datetime_ms(self.created_at)


class RowHead(msgspec.Struct):
    """The few fields a flush needs from a stored row: decoding skips the rest."""

    id: str
    created_at: str
    project_id: str


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_encoder = msgspec.json.Encoder()
_row_head_decoder = msgspec.json.Decoder(RowHead)
_event_decoder = msgspec.json.Decoder(Event)
_MSGSPEC_PATH = re.compile(r"\s*-\s*at\s*`\$\.?([^`]*)`\s*$")
_MISSING = re.compile(r"Object missing required field `([^`]+)`")


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_row(data: bytes | str) -> Event:
    """Decode a stored JSON row (trusted, already normalized)."""
    try:
        return _event_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None


def decode_row_head(data: bytes) -> RowHead:
    """Decode only id, created_at and project_id; raises msgspec errors on bad rows."""
    return _row_head_decoder.decode(data)


def parse_event(obj: Any) -> Event:
    """Validate untrusted input (a dict, JSON bytes or str) into a normalized Event."""
    try:
        if isinstance(obj, bytes | bytearray | memoryview | str):
            return _event_decoder.decode(obj)
        if not isinstance(obj, dict):
            raise InvalidEvent("$", f"an event must be an object, got {type(obj).__name__}")
        return msgspec.convert(obj, Event)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    except msgspec.DecodeError as exc:
        raise InvalidEvent("$", f"not valid JSON: {exc}") from None


def _invalid(exc: msgspec.ValidationError) -> InvalidEvent:
    message = str(exc)
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, InvalidEvent):
        return cause
    missing = _MISSING.search(message)
    if missing:
        return InvalidEvent(missing.group(1), "is required")
    match = _MSGSPEC_PATH.search(message)
    if match:
        return InvalidEvent(match.group(1) or "$", message[: match.start()])
    return InvalidEvent("$", message)


def _normalize_id(value: str) -> str:
    if not value:
        return str(uuid.uuid4())
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidEvent("id", f"not a UUID: {value!r}") from None


def parse_datetime(field: str, value: str | int | float) -> datetime:
    """ISO-8601 (a zone-less value is UTC) or epoch milliseconds, to an aware UTC datetime."""
    if isinstance(value, bool):
        raise InvalidEvent(field, "expected a date, got a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise InvalidEvent(field, "must be a finite number of epoch milliseconds")
        try:
            return datetime.fromtimestamp(value / 1000, UTC)
        except (OverflowError, OSError, ValueError):
            raise InvalidEvent(field, f"epoch milliseconds out of range: {value!r}") from None
    text = value.strip()
    if text.isdigit():
        return parse_datetime(field, int(text))
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidEvent(
            field, f"not an ISO-8601 date or epoch milliseconds: {value!r}"
        ) from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def format_datetime(value: datetime) -> str:
    """UTC, millisecond precision, the text form ClickHouse's DateTime64(3) parses."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def datetime_ms(text: str) -> int:
    """Epoch milliseconds of a normalized `created_at` string."""
    parsed = datetime.fromisoformat(text).replace(tzinfo=UTC)
    return (parsed - _EPOCH) // _MILLISECOND


def flatten_properties(props: dict[str, Any]) -> dict[str, str]:
    """Flatten to string->string: nested keys joined by '.', nulls dropped."""
    out: dict[str, str] = {}
    _flatten("", props, out, 0)
    return out


def _flatten(prefix: str, value: Any, out: dict[str, str], depth: int) -> None:
    if depth > MAX_PROPERTY_DEPTH:
        raise InvalidEvent(
            f"properties.{prefix}", f"nested deeper than {MAX_PROPERTY_DEPTH} levels"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidEvent(f"properties.{prefix}", "keys must be strings")
            _flatten(f"{prefix}.{key}" if prefix else key, item, out, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _flatten(f"{prefix}.{index}", item, out, depth + 1)
    elif value is None:
        return
    elif isinstance(value, bool):
        out[prefix] = "true" if value else "false"
    elif isinstance(value, str):
        out[prefix] = value
    elif isinstance(value, int):
        out[prefix] = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidEvent(f"properties.{prefix}", "must be a finite number")
        out[prefix] = repr(value)
    else:
        raise InvalidEvent(f"properties.{prefix}", f"unsupported type {type(value).__name__}")
