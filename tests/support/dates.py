"""Dates for tests, derived from now: a fixed date falls out of EVENT_BUFFER_MAX_PAST_DAYS one day.

`BASE_MS` is midnight UTC 30 days ago, `DAY` its date (`YYYY-MM-DD`) and
`NEXT_DAY` the day after, `NOON_MS` 12:00 of that day; `at("12:00:01")` is
that day's ISO text for a time.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

DAY_MS = 86_400_000
BASE_MS = (time.time_ns() // 1_000_000 // DAY_MS - 30) * DAY_MS
NOON_MS = BASE_MS + DAY_MS // 2
DAY = datetime.fromtimestamp(BASE_MS / 1000, UTC).strftime("%Y-%m-%d")
NEXT_DAY = datetime.fromtimestamp((BASE_MS + DAY_MS) / 1000, UTC).strftime("%Y-%m-%d")


# Midnight UTC of the first day of this month: partitions (months) change there.
MONTH_START_MS = int(
    datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000
)


def at(clock: str, day_offset: int = 0) -> str:
    """`<DAY>T<clock>Z` (`clock` as `HH:MM:SS[.mmm]`), `day_offset` days after DAY."""
    day = datetime.fromtimestamp((BASE_MS + day_offset * DAY_MS) / 1000, UTC).strftime("%Y-%m-%d")
    return f"{day}T{clock}Z"


def iso(ms: int) -> str:
    """The ISO-8601 text of an epoch-ms instant (what SDKs send)."""
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def stored(ms: int) -> str:
    """How eventbuffer stores an instant: `YYYY-MM-DD HH:MM:SS.mmm` (UTC)."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(" ", "milliseconds")[:23]


def now_ms() -> int:
    """This moment, in Unix milliseconds."""
    return int(time.time() * 1000)
