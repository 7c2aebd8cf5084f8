"""Helpers the readers of other tools' exports share: URLs, times, leftovers."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlsplit


def split_url(url: str) -> tuple[str, str]:
    """(origin, path) of a page URL: `https://shop.example/cart?x=1` -> (`https://shop.example`,
    `/cart`); ("", text) when it is no absolute URL."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "", url
    if not parts.scheme or not parts.netloc:
        return "", url
    return f"{parts.scheme}://{parts.netloc}", parts.path or "/"


def epoch_ms(value: Any) -> Any:
    """Mixpanel's `time`: epoch seconds (or milliseconds, exported with `time_in_ms`) to
    epoch milliseconds; anything else is passed on for validation to refuse."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if not math.isfinite(value):
        return value
    # Seconds until the year 5138; a larger number is already milliseconds.
    return round(value * 1000) if abs(value) < 1e11 else int(value)


def text(value: Any) -> str:
    """A property as a column's text ("" for none)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def country_code(value: Any) -> str:
    """A 2-letter country code for the FixedString(2) column; "" for anything else."""
    code = text(value).strip()
    return code.upper() if len(code) == 2 and code.isascii() and code.isalpha() else ""
