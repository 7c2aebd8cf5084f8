"""Redis replies as Python values: bytes (or str, with decode_responses) to text and numbers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def text(value: Any) -> str:
    """A reply as text ("" for None)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def number(value: Any) -> int:
    """A reply as an integer (0 for None)."""
    if value is None:
        return 0
    return int(text(value))


def text_map(value: Mapping[Any, Any]) -> dict[str, str]:
    """An HGETALL reply as text keys and values."""
    return {text(k): text(v) for k, v in value.items()}
