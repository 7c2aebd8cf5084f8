"""The event row: its msgspec models, validation, id assignment and JSON encoding.

Two models of OpenPanel's `IClickhouseEvent`, field for field: `Row`, a
stored row eventbuffer wrote itself (decoded as it is, `decode_row`), and
`Event`, untrusted input, normalized and checked while it is decoded.
`parse_event()` is the one
entry point for untrusted input (dicts from Celery, JSON bytes from a
producer); it returns a normalized `Event` or raises `InvalidEvent` naming the
field and the problem.

Normalized means: `id` is a canonical UUID (assigned here when missing),
`created_at` is a UTC string `YYYY-MM-DD HH:MM:SS.mmm`, `properties` is a
flat string->string map (nested objects become dotted keys, as OpenPanel's
`toDots` does; nulls are dropped).

The JSON row omits fields at their defaults (ClickHouse fills those in). The
order of its fields is free: a waiting view is stored without its duration
(worker/stored_view.py).

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
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Annotated, Any

import msgspec

from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import InvalidEvent as InvalidEvent  # re-exported: part of the API
from worker.json_slices import JsonSliceError, split_object
from worker.settings import Settings

MAX_PROPERTY_DEPTH = 8

KIND_REGULAR = "r"
KIND_SCREEN_VIEW = "v"
KIND_SESSION_END = "e"
KIND_NAMES = {
    KIND_REGULAR: "regular",
    KIND_SCREEN_VIEW: "screen_view",
    KIND_SESSION_END: "session_end",
}


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

# (earliest, latest) epoch ms a date may have, while `parse_event` runs;
# None when trusted rows are decoded (stored rows, the flush).
_date_bounds: ContextVar[tuple[int, int] | None] = ContextVar("date_bounds", default=None)
# Makes the id an event sent without one gets, while `parse_event` runs (None: random).
_default_id: ContextVar[Callable[[], str] | None] = ContextVar("default_id", default=None)

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
        """Epoch ms of `created_at`."""
        return datetime_ms(self.created_at)


class Event(Row, kw_only=True, omit_defaults=True, dict=True):
    """An event from outside (a producer, a replay), validated and normalized on decoding.

    The same fields as `Row`, in the same order, with what untrusted input may
    hold (dates as text or epoch ms, nested properties) and its constraints;
    `__post_init__` normalizes them. Build one with `parse_event`.
    """

    # dict=True: room for the row `parse_event` encoded (never itself encoded).
    name: Annotated[str, msgspec.Meta(min_length=1)]
    project_id: Annotated[str, msgspec.Meta(min_length=1)]
    properties: dict[str, Any] = {}
    # Wider than Row's on input; `__post_init__` normalizes them to Row's types.
    created_at: str | int | float  # type: ignore[assignment]
    country: Country = ""
    longitude: Longitude | None = None
    latitude: Latitude | None = None
    imported_at: str | int | float | None = None  # type: ignore[assignment]
    duration: NonNegative = 0

    def __post_init__(self) -> None:
        bounds = _date_bounds.get()
        if self.id:
            self.id = _normalize_id(self.id)
        else:
            make = _default_id.get()
            self.id = make() if make is not None else _uuid4()
        self.created_at, self.__dict__["_created_ms"] = _normalize_date(
            "created_at", self.created_at, bounds
        )
        if self.imported_at is not None:
            self.imported_at = _normalize_date("imported_at", self.imported_at, bounds)[0]
        if self.properties:
            self.properties = flatten_properties(self.properties)
        # The column is FixedString(2): two bytes, not two characters.
        if self.country and len(self.country.encode("utf-8", "surrogatepass")) > 2:
            raise InvalidEvent("country", f"longer than 2 bytes in UTF-8: {self.country!r}")
        if self.longitude is not None and not math.isfinite(self.longitude):
            raise InvalidEvent("longitude", "must be a finite number")
        if self.latitude is not None and not math.isfinite(self.latitude):
            raise InvalidEvent("latitude", "must be a finite number")

    @property
    def created_ms(self) -> int:
        """Epoch ms of `created_at`: kept from validation, else parsed (copies)."""
        known: int | None = self.__dict__.get("_created_ms")
        if known is not None:
            return known
        assert isinstance(self.created_at, str)
        return datetime_ms(self.created_at)


class RowHead(msgspec.Struct):
    """The few fields a flush needs from a stored row: decoding skips the rest."""

    id: str
    created_at: str
    project_id: str


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_NAIVE_EPOCH = datetime(1970, 1, 1)
_MILLISECOND = timedelta(milliseconds=1)
_encoder = msgspec.json.Encoder()
_row_head_decoder = msgspec.json.Decoder(RowHead)
_event_decoder = msgspec.json.Decoder(Event)
_row_decoder = msgspec.json.Decoder(Row)
_any_decoder = msgspec.json.Decoder()
_MSGSPEC_PATH = re.compile(r"\s*-\s*at\s*`\$\.?([^`]*)`\s*$")
_MSGSPEC_KEY = re.compile(r"^(.*?)\s*-\s*at\s*`key`\s*in\s*`\$\.?([^`]*)`\s*$")
_COORDINATES = {"longitude": (-180, 180), "latitude": (-90, 90)}
_GOT = re.compile(r"got `([^`]+)`")
_MISSING = re.compile(r"Object missing required field `([^`]+)`")
_BYTE_OFFSET = re.compile(r"\(byte (\d+)\)")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def encode_event(event: Row) -> bytes:
    """The event's JSON row (the one `parse_event` made, when it made one)."""
    row: bytes | None = getattr(event, "_row", None)
    return _encoder.encode(event) if row is None else row


def decode_row(data: bytes | str) -> Row:
    """Decode a stored JSON row (trusted, already normalized: nothing is re-checked)."""
    try:
        return _row_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None


def decode_row_head(data: bytes) -> RowHead:
    """Decode only id, created_at and project_id; raises msgspec errors on bad rows."""
    return _row_head_decoder.decode(data)


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
    now = limits.clock.now_ms()
    token = _date_bounds.set((now - limits.max_past_ms, now + limits.max_future_ms))
    id_token = _default_id.set(default_id)
    try:
        if isinstance(obj, dict):
            event = msgspec.convert(obj, Event)
        elif isinstance(obj, bytes | bytearray | memoryview | str):
            event = _event_decoder.decode(obj)
        else:
            raise InvalidEvent("$", f"an event must be an object, got {type(obj).__name__}")
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    except msgspec.DecodeError as exc:
        raise InvalidEvent("$", _decode_problem(obj, exc)) from None
    except UnicodeEncodeError:  # a str holding lone surrogates, before any parsing
        raise InvalidEvent("$", "not valid UTF-8 (the text holds a lone surrogate)") from None
    except RecursionError:  # JSON nested ~1,000 levels deep: the decoder's own limit
        raise _too_deep(obj) from None
    finally:
        _date_bounds.reset(token)
        _default_id.reset(id_token)
    try:
        row = _encoder.encode(event)
    except UnicodeEncodeError:
        raise _surrogate_field(event) from None
    if len(row) > limits.max_event_bytes:
        raise _oversized(event, len(row), limits.max_event_bytes)
    event.__dict__["_row"] = row
    return event


def _invalid(exc: msgspec.ValidationError) -> InvalidEvent:
    message = str(exc)
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, InvalidEvent):
        return cause
    missing = _MISSING.search(message)
    if missing:
        return InvalidEvent(missing.group(1), "is required")
    key = _MSGSPEC_KEY.search(message)
    if key:
        got = _GOT.search(key.group(1))
        problem = f"keys must be strings, got {got.group(1)}" if got else "keys must be strings"
        return InvalidEvent(_field_path(key.group(2)), problem)
    match = _MSGSPEC_PATH.search(message)
    if match:
        field = _field_path(match.group(1))
        if field in _COORDINATES and message.startswith(
            ("Expected `float` >=", "Expected `float` <=")
        ):
            low, high = _COORDINATES[field]
            return InvalidEvent(field, f"must be a finite number from {low} to {high}")
        return InvalidEvent(field, message[: match.start()])
    return InvalidEvent("$", message)


def _too_deep(obj: Any) -> InvalidEvent:
    """An event nested deeper than the decoder goes: name the top-level field that is."""
    field = "$"
    if isinstance(obj, bytes | bytearray | memoryview | str):
        try:
            for key, value in split_object(obj):
                try:
                    _any_decoder.decode(value)
                except RecursionError:
                    name = _any_decoder.decode(key)
                    field = name if isinstance(name, str) else "$"
                    break
                except msgspec.MsgspecError:
                    continue
        except (JsonSliceError, msgspec.MsgspecError):
            pass
    return InvalidEvent(field, "nested too deeply to decode (JSON over ~1,000 levels)")


def _field_path(path: str) -> str:
    """msgspec's `properties[...]` / `a[3]` to the dotted form used here."""
    path = path.replace("[...]", "")
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path or "$"


def _decode_problem(obj: Any, exc: msgspec.DecodeError) -> str:
    message = str(exc)
    if "UTF-8" in message:
        return "not valid UTF-8"
    offset = _BYTE_OFFSET.search(message)
    if offset and isinstance(obj, bytes | bytearray | memoryview | str):
        at = int(offset.group(1))
        text = bytes(obj) if not isinstance(obj, str) else obj.encode("utf-8", "replace")
        if text[at : at + 10].lstrip(b"-").startswith((b"NaN", b"Infinity")):
            return f"NaN and Infinity are not JSON numbers (byte {at})"
    return f"not valid JSON: {message}"


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _surrogate_field(event: Event) -> InvalidEvent:
    """Which field holds a string that is not valid UTF-8 (a lone surrogate)."""
    problem = "not valid UTF-8 (a lone surrogate)"
    for name in Event.__struct_fields__:
        value = getattr(event, name)
        if isinstance(value, str) and _has_surrogate(value):
            return InvalidEvent(name, problem)
    for key, value in event.properties.items():
        if _has_surrogate(key):
            return InvalidEvent("properties", f"a key is {problem}")
        if _has_surrogate(value):
            return InvalidEvent(f"properties.{key}", problem)
    return InvalidEvent("$", problem)


def _oversized(event: Event, size: int, limit: int) -> InvalidEvent:
    """The event's row is too big: name the field that takes the most room."""
    largest, largest_size = "$", 0
    for name in Event.__struct_fields__:
        value = getattr(event, name)
        if isinstance(value, str):
            taken = len(value)
        elif isinstance(value, dict):
            taken = sum(len(k) + len(v) + 6 for k, v in value.items())
        else:
            continue
        if taken > largest_size:
            largest, largest_size = name, taken
    return InvalidEvent(
        largest,
        f"the event is {size} bytes as JSON, over the limit of {limit} "
        "(EVENT_BUFFER_MAX_EVENT_BYTES); this field is the largest",
    )


def _normalize_id(value: str) -> str:
    if _CANONICAL_UUID.match(value):
        return value
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidEvent("id", f"not a UUID: {_clip(value)!r}") from None


def _uuid4() -> str:
    """`str(uuid.uuid4())`, in half the time."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


@lru_cache(maxsize=4096)
def _day_text(days: int) -> str:
    """`YYYY-MM-DD` of a day counted from 1970-01-01 (OverflowError/ValueError past year 9999)."""
    return date.fromordinal(days + _EPOCH_ORDINAL).isoformat()


def _canonical_date(text: str) -> tuple[str, int] | None:
    """The fast path for the common forms; None for anything else.

    `YYYY-MM-DDTHH:MM:SS[.mmm]Z` (what SDKs send) and `YYYY-MM-DD HH:MM:SS.mmm`
    (the stored form: what the producer client sends, and replays). The
    separators must stand where those forms have them; `fromisoformat`
    checks the rest (digits, the day exists, hours < 24, ...), and the text
    and epoch ms are those of the general path.
    """
    size = len(text)
    if size == 23 and text[10] == " " and text[19] == ".":  # the stored form already
        naive = text
    elif size == 24 and text[10] == "T" and text[19] == "." and text[23] == "Z":
        naive = text[:23]
    elif size == 20 and text[10] == "T" and text[19] == "Z":
        naive = text[:19] + ".000"
    else:
        return None
    if not (naive[13] == ":" and naive[16] == ":"):
        return None
    try:
        parsed = datetime.fromisoformat(naive)
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        return None
    return f"{naive[:10]} {naive[11:23]}", (parsed - _NAIVE_EPOCH) // _MILLISECOND


def _epoch_date(ms: int) -> str:
    """The stored text of an epoch-ms instant (no datetime per event: days are cached)."""
    days, rest = divmod(ms, 86_400_000)
    seconds, millis = divmod(rest, 1000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{_day_text(days)} {hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}"


def _normalize_date(
    field: str, value: str | int | float, bounds: tuple[int, int] | None
) -> tuple[str, int]:
    """A date as stored (`YYYY-MM-DD HH:MM:SS.mmm`, UTC) and its epoch ms, checked against `bounds`.

    The bounds are integer compares on epoch milliseconds, done before a
    number becomes a datetime (so absurd numbers never reach the conversion).
    """
    if type(value) is str and (fast := _canonical_date(value)) is not None:
        if bounds is not None and not bounds[0] <= fast[1] <= bounds[1]:
            raise _out_of_bounds(field, value, fast[1], bounds)
        return fast
    if type(value) is int and (bounds is None or bounds[0] <= value <= bounds[1]):
        try:
            return _epoch_date(value), value
        except (OverflowError, ValueError):
            pass  # outside what a date can hold: the general path says so
    given = value
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():
            value = int(text)
    if isinstance(value, bool):
        raise InvalidEvent(field, "expected a date, got a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise InvalidEvent(field, "must be a finite number of epoch milliseconds")
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            raise _out_of_bounds(field, given, value, bounds)
    parsed = parse_datetime(field, value)
    # Whole milliseconds: the stored text keeps no more, so neither does this.
    ms = (parsed - _EPOCH) // _MILLISECOND
    if (
        bounds is not None
        and not isinstance(value, int | float)
        and not bounds[0] <= ms <= bounds[1]
    ):
        raise _out_of_bounds(field, given, ms, bounds)
    return format_datetime(parsed), ms


def _out_of_bounds(
    field: str, given: Any, ms: int | float, bounds: tuple[int, int]
) -> InvalidEvent:
    shown = _clip(given) if isinstance(given, str) else given
    if ms > bounds[1]:
        return InvalidEvent(
            field,
            f"{shown!r} is too far in the future: the latest accepted is "
            f"{format_datetime(_from_ms(bounds[1]))} (EVENT_BUFFER_MAX_FUTURE_S ahead of now)",
        )
    return InvalidEvent(
        field,
        f"{shown!r} is too far in the past: the earliest accepted is "
        f"{format_datetime(_from_ms(bounds[0]))} (EVENT_BUFFER_MAX_PAST_DAYS before now)",
    )


def _from_ms(ms: int) -> datetime:
    try:
        return _EPOCH + timedelta(milliseconds=ms)
    except OverflowError:
        return datetime.max.replace(tzinfo=UTC) if ms > 0 else datetime.min.replace(tzinfo=UTC)


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
    if text.isascii() and text.isdigit():
        return parse_datetime(field, int(text))
    try:
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidEvent(
            field, f"not an ISO-8601 date or epoch milliseconds: {_clip(value)!r}"
        ) from None


def format_datetime(value: datetime) -> str:
    """UTC, millisecond precision, the text form ClickHouse's DateTime64(3) parses."""
    return value.astimezone(UTC).isoformat(" ", "milliseconds")[:23]


def datetime_ms(text: str) -> int:
    """Epoch milliseconds of a normalized `created_at` string (UTC, no offset).

    Naive arithmetic: a third of the cost of an aware datetime (the apply
    computes this for every screen_view).
    """
    return (datetime.fromisoformat(text) - _NAIVE_EPOCH) // _MILLISECOND


def flatten_properties(props: dict[str, Any]) -> dict[str, str]:
    """Flatten to string->string: nested keys joined by '.', nulls dropped.

    Properties that are flat strings already (most are) are returned as they are.
    """
    for key, value in props.items():
        if type(key) is not str or type(value) is not str:
            break
    else:
        return props
    out: dict[str, str] = {}
    _flatten("", props, out, 0)
    return out


def _flatten(prefix: str, value: Any, out: dict[str, str], depth: int) -> None:
    if depth > MAX_PROPERTY_DEPTH:
        raise InvalidEvent(
            f"properties.{prefix}", f"nested deeper than {MAX_PROPERTY_DEPTH} levels"
        )
    if isinstance(value, str):
        out[prefix] = value
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                where = f"properties.{prefix}" if prefix else "properties"
                raise InvalidEvent(where, f"keys must be strings, got {type(key).__name__}")
            _flatten(f"{prefix}.{key}" if prefix else key, item, out, depth + 1)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _flatten(f"{prefix}.{index}", item, out, depth + 1)
    elif value is None:
        return
    elif isinstance(value, bool):
        out[prefix] = "true" if value else "false"
    elif isinstance(value, int):
        try:
            out[prefix] = str(value)
        except ValueError:  # more digits than Python converts (sys.set_int_max_str_digits)
            raise InvalidEvent(f"properties.{prefix}", "integer too large") from None
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidEvent(f"properties.{prefix}", "must be a finite number")
        out[prefix] = repr(value)
    else:
        raise InvalidEvent(f"properties.{prefix}", f"unsupported type {type(value).__name__}")


def as_row(event: Row) -> Row:
    """The stored form of an event: what `decode_row` gives back for its row."""
    return event if type(event) is Row else decode_row(encode_event(event))
