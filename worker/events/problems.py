"""Which field of an event is wrong, and what is wrong with it.

msgspec says why a value does not fit (`Expected `str`, got `int``), and
that text is the problem an `InvalidEvent` reports; but the *field* is never
read back out of msgspec's message (its wording may change with a release).
When decoding fails, `invalid` looks at the input itself: the fields in the
order they were sent, each decoded alone against its own type, the first
that fails is the field; if none does, the first required field that is
missing. Only the failing path, never the common one, pays for that.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from worker.errors import InvalidEvent
from worker.json_slices import JsonSliceError, split_object

# Coordinates out of range get a message of their own (the stored columns' range).
_COORDINATES = {"longitude": (-180, 180), "latitude": (-90, 90)}
# The JSON types of Python values, as msgspec names them in its messages.
_TYPE_NAMES: dict[type, str] = {
    int: "int", float: "float", bool: "bool", type(None): "null", str: "str",
    list: "array", tuple: "array", dict: "object", bytes: "bytes", bytearray: "bytes",
    memoryview: "bytes", set: "set", frozenset: "set",
}  # fmt: skip
_RAW_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ANY = msgspec.json.Decoder()
_BYTE_OFFSET = re.compile(r"\(byte (\d+)\)")


def invalid(obj: Any, model: type[msgspec.Struct], exc: msgspec.ValidationError) -> InvalidEvent:
    """The InvalidEvent for input `obj` that did not decode into `model` (raising `exc`).

    The field is found from `obj` (a dict, or JSON bytes / text) and the
    model's field types; `exc`'s text is used only as the problem when the
    whole input is refused (`$`: not an object at all).
    """
    try:
        members = _members(obj)
    except (msgspec.MsgspecError, RecursionError, UnicodeEncodeError, JsonSliceError):
        return InvalidEvent("$", _problem(exc))
    if members is None:
        return InvalidEvent("$", _problem(exc))
    fields = {info.name: info for info in msgspec.structs.fields(model)}
    seen: set[str] = set()
    for key, value, raw in members:
        if not isinstance(key, str):
            return InvalidEvent("$", _keys_problem(key))
        info = fields.get(key)
        if info is None:
            continue  # unknown fields are ignored
        seen.add(key)
        problem = _value_problem(key, value, raw, info.type)
        if problem is not None:
            return InvalidEvent(key, problem)
    for name, info in fields.items():
        if info.required and name not in seen:
            return InvalidEvent(name, "is required")
    return InvalidEvent("$", _problem(exc))


def _members(obj: Any) -> list[tuple[Any, Any, bool]] | None:
    """The input's (key, value, value is raw JSON) in the order sent; None: no object."""
    if isinstance(obj, dict):
        return [(key, value, False) for key, value in obj.items()]
    if isinstance(obj, str):
        obj = obj.encode("utf-8")
    if isinstance(obj, bytes | bytearray | memoryview):
        try:
            decoded = _RAW_OBJECT.decode(obj)
        except msgspec.ValidationError:
            return None  # not an object (or a key that is no string: not in JSON)
        except msgspec.DecodeError:
            # JSON with a duplicate key holding what one value cannot: slice it.
            return [(_ANY.decode(key), value, True) for key, value in split_object(bytes(obj))]
        return [(key, value, True) for key, value in decoded.items()]
    return None


def _value_problem(name: str, value: Any, raw: bool, kind: Any) -> str | None:
    """Why `value` does not fit the field's type, or None when it does."""
    try:
        if raw:
            msgspec.json.decode(value, type=kind)
        else:
            msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        number = _is_number(value, raw)
        if name in _COORDINATES and number:
            low, high = _COORDINATES[name]
            return f"must be a finite number from {low} to {high}"
        if not raw and isinstance(value, dict):
            bad = next((key for key in value if not isinstance(key, str)), _NO_KEY)
            if bad is not _NO_KEY:
                return _keys_problem(bad)
        return _problem(exc)
    except (msgspec.DecodeError, RecursionError) as exc:
        return _problem(exc)
    return None


_NO_KEY = object()


def _is_number(value: Any, raw: bool) -> bool:
    """Is the value a number (a bool is none)?"""
    if raw:
        try:
            value = _ANY.decode(value)
        except (msgspec.MsgspecError, RecursionError):
            return False
    return isinstance(value, int | float) and not isinstance(value, bool)


def _keys_problem(key: Any) -> str:
    name = _TYPE_NAMES.get(type(key))
    return f"keys must be strings, got {name}" if name else "keys must be strings"


def _problem(exc: Exception) -> str:
    """msgspec's message, without the path it may end with (the field is named apart)."""
    message = str(exc)
    head, sep, tail = message.rpartition(" - at `")
    return head if sep and tail.endswith("`") else message


def too_deep(obj: Any) -> InvalidEvent:
    """An event nested deeper than the decoder goes: name the top-level field that is."""
    field = "$"
    if isinstance(obj, bytes | bytearray | memoryview | str):
        try:
            for key, value in split_object(obj):
                try:
                    _ANY.decode(value)
                except RecursionError:
                    name = _ANY.decode(key)
                    field = name if isinstance(name, str) else "$"
                    break
                except msgspec.MsgspecError:
                    continue
        except (JsonSliceError, msgspec.MsgspecError):
            pass
    return InvalidEvent(field, "nested too deeply to decode (JSON over ~1,000 levels)")


def decode_problem(obj: Any, exc: msgspec.DecodeError) -> str:
    """What is wrong with JSON that does not decode at all (the field is `$`).

    NaN and infinities get a message of their own when msgspec's error points
    at one (the byte offset it gives; without one, the general message)."""
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


def surrogate_field(event: msgspec.Struct, properties: dict[str, str]) -> InvalidEvent:
    """Which field holds a string that is not valid UTF-8 (a lone surrogate)."""
    problem = "not valid UTF-8 (a lone surrogate)"
    for name in event.__struct_fields__:
        value = getattr(event, name)
        if isinstance(value, str) and _has_surrogate(value):
            return InvalidEvent(name, problem)
    for key, value in properties.items():
        if _has_surrogate(key):
            return InvalidEvent("properties", f"a key is {problem}")
        if _has_surrogate(value):
            return InvalidEvent(f"properties.{key}", problem)
    return InvalidEvent("$", problem)


def oversized(event: msgspec.Struct, size: int, limit: int) -> InvalidEvent:
    """The event's row is too big: name the field that takes the most room."""
    largest, largest_size = "$", 0
    for name in event.__struct_fields__:
        value = getattr(event, name)
        taken = _size(value)
        if taken > largest_size:
            largest, largest_size = name, taken
    return InvalidEvent(
        largest,
        f"the event is {size} bytes as JSON, over the limit of {limit} "
        "(EVENT_BUFFER_MAX_EVENT_BYTES); this field is the largest",
    )


def _size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(k) + len(v) + 6 for k, v in value.items())
    return 0
