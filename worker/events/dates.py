"""Dates of events: what untrusted input may send, the stored text, epoch milliseconds.

An event's `created_at` / `imported_at` arrive as ISO-8601 text (a zone-less
value is UTC) or epoch milliseconds (a number, or digits in a string), and
are stored as `YYYY-MM-DD HH:MM:SS.mmm` in UTC, the text ClickHouse's
DateTime64(3) parses. `normalize_date` does both and checks the date against
bounds (epoch ms, compared as integers before any datetime is built, so
absurd numbers never reach a conversion); the common forms take a fast path
(`_canonical_date`, `_epoch_date`) with the same results as the general one.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any

from worker.errors import InvalidEvent

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_NAIVE_EPOCH = datetime(1970, 1, 1)
_MILLISECOND = timedelta(milliseconds=1)


def clip(text: str, limit: int = 100) -> str:
    """Text cut for an error message (it may quote hostile input at length)."""
    return text if len(text) <= limit else text[:limit] + "…"


@lru_cache(maxsize=4096)
def _day_text(days: int) -> str:
    """`YYYY-MM-DD` of a day counted from 1970-01-01 (OverflowError/ValueError past year 9999)."""
    return date.fromordinal(days + _EPOCH_ORDINAL).isoformat()


# The fast path's tables: the seconds (with the dot after them) and the milliseconds
# (with the zone, in the SDKs' form) as sent, to their milliseconds. A text that is
# not a key is not of the form (a letter, a non-ASCII digit, second 60, ...).
_SECONDS = {f"{second:02d}.": second * 1000 for second in range(60)}
_MILLIS = {f"{milli:03d}": milli for milli in range(1000)}
_MILLIS_Z = {f"{milli:03d}Z": milli for milli in range(1000)}
# Minutes seen (`YYYY-MM-DDTHH:MM:` or `YYYY-MM-DD HH:MM:`, one table per form): the
# stored text of the minute and its epoch ms. Events of a batch share a few minutes.
_SDK_MINUTES: dict[str, tuple[str, int]] = {}
_STORED_MINUTES: dict[str, tuple[str, int]] = {}
_MINUTES_KEPT = 4096
# The tables of a text by its length (the SDKs' form, the stored form): its minutes and
# its milliseconds, for the lookups `_canonical_date` does (and `parse_events`, inline).
_FAST_FORMS = {24: (_SDK_MINUTES, _MILLIS_Z), 23: (_STORED_MINUTES, _MILLIS)}


def _canonical_date(text: str) -> tuple[str, int] | None:
    """The fast path for the common forms; None for anything else.

    `YYYY-MM-DDTHH:MM:SS[.mmm]Z` (what SDKs send) and `YYYY-MM-DD HH:MM:SS.mmm`
    (the stored form: what the producer client sends, and replays). A text
    whose minute was seen before takes three table lookups (its minute, its
    seconds, its milliseconds); any other goes through `_parsed_date`, whose
    result is the same, and its minute is remembered.
    """
    size = len(text)
    if size == 24:
        minutes, minute, millis = _SDK_MINUTES, _SDK_MINUTES.get(text[:17]), _MILLIS_Z
    elif size == 23:
        minutes, minute, millis = _STORED_MINUTES, _STORED_MINUTES.get(text[:17]), _MILLIS
    else:
        return _parsed_date(text)
    seconds = _SECONDS.get(text[17:20])
    milli = millis.get(text[20:])
    if seconds is None or milli is None:
        return _parsed_date(text)
    if minute is None:
        parsed = _parsed_date(text)
        if parsed is not None:
            if len(minutes) >= _MINUTES_KEPT:
                minutes.clear()
            minutes[text[:17]] = (parsed[0][:17], parsed[1] - seconds - milli)
        return parsed
    return (minute[0] + text[17:23] if size == 24 else text), minute[1] + seconds + milli


def _parsed_date(text: str) -> tuple[str, int] | None:
    """`_canonical_date` by parsing: the separators must stand where those forms have
    them; `fromisoformat` checks the rest (digits, the day exists, hours < 24, ...), and
    the text and epoch ms are those of the general path (which stores any other
    ISO-8601 form, such as a week date, as `YYYY-MM-DD`).
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
    # `YYYY-MM-DD`: Python's fromisoformat also reads other dates of ten characters
    # (a week date, `2026-W49-1`), which this path would store as they were sent.
    if not (naive[4] == "-" and naive[7] == "-" and naive[13] == ":" and naive[16] == ":"):
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


def normalize_date(
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
    shown = clip(given) if isinstance(given, str) else given
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
            field, f"not an ISO-8601 date or epoch milliseconds: {clip(value)!r}"
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
