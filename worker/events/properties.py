"""Event properties: any JSON object, flattened to the string->string map stored.

Nested objects become dotted keys and arrays their indexes (as OpenPanel's
`toDots` does), nulls are dropped, booleans and numbers become their text;
non-string keys, NaN and infinities, and nesting deeper than
`MAX_PROPERTY_DEPTH` are refused with the dotted path of the offender.
"""

from __future__ import annotations

import math
from typing import Any

from worker.errors import InvalidEvent

MAX_PROPERTY_DEPTH = 8


def flatten_properties(props: dict[str, Any]) -> dict[str, str]:
    """Flatten to string->string: nested keys joined by '.', nulls dropped.

    Properties that are flat strings already (most are) are returned as they are.
    """
    for key, value in props.items():
        if type(key) is not str or type(value) is not str:
            break
    else:
        return props
    return flattened(props)


def flattened(props: dict[Any, Any]) -> dict[str, str]:
    """`flatten_properties` into a new map, always (for properties known not to be flat):
    the top level here, with its members' common kinds (strings, integers, objects, null)
    handled without a call each."""
    out: dict[str, str] = {}
    for key, item in props.items():
        if type(key) is not str and not isinstance(key, str):
            raise InvalidEvent("properties", f"keys must be strings, got {type(key).__name__}")
        kind = type(item)
        if kind is str:
            out[key] = item
        elif kind is dict:
            _flatten_object(key, item, out, 1)
        elif kind is int:
            try:
                out[key] = str(item)
            except ValueError:  # more digits than Python converts
                raise InvalidEvent(f"properties.{key}", "integer too large") from None
        elif item is not None:
            _flatten(key, item, out, 1)
    return out


def _flatten_object(prefix: str, value: dict[Any, Any], out: dict[str, str], depth: int) -> None:
    """An object at `depth` (at most MAX_PROPERTY_DEPTH), below the top level: what
    `_flatten` does with it, with its members' common kinds handled here, no call each."""
    leaves = depth < MAX_PROPERTY_DEPTH  # a member one level down is within the limit
    dotted = f"{prefix}." if prefix else ""  # under an empty key (`{"": {...}}`): none
    for key, item in value.items():
        if type(key) is not str and not isinstance(key, str):
            where = f"properties.{prefix}" if prefix else "properties"
            raise InvalidEvent(where, f"keys must be strings, got {type(key).__name__}")
        name = dotted + key
        if leaves:
            kind = type(item)
            if kind is str:
                out[name] = item
                continue
            if kind is int:
                try:
                    out[name] = str(item)
                except ValueError:  # more digits than Python converts
                    raise InvalidEvent(f"properties.{name}", "integer too large") from None
                continue
            if kind is dict:
                _flatten_object(name, item, out, depth + 1)
                continue
            if item is None:
                continue
        _flatten(name, item, out, depth + 1)


def _flatten(prefix: str, value: Any, out: dict[str, str], depth: int) -> None:
    if depth > MAX_PROPERTY_DEPTH:
        raise InvalidEvent(
            f"properties.{prefix}", f"nested deeper than {MAX_PROPERTY_DEPTH} levels"
        )
    if isinstance(value, str):
        out[prefix] = value
    elif isinstance(value, dict):
        _flatten_object(prefix, value, out, depth)
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
