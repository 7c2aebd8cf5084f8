"""The event row: its models, validation, dates and properties, one module each.

- `worker.events.model`: `Row` (a stored row, trusted) and `Event` (untrusted
  input as decoded), the kinds, encoding and decoding rows;
- `worker.events.validation`: `parse_event` and its `Limits`: untrusted input
  to a normalized `Event`, or `InvalidEvent` naming the field;
- `worker.events.problems`: which field is wrong and why, found from the
  input (never from the wording of msgspec's messages);
- `worker.events.dates`: dates as sent, as stored, as epoch milliseconds;
- `worker.events.properties`: nested properties to the flat map stored.

The names other modules use are importable from here, as before the split.
"""

from worker.errors import InvalidEvent
from worker.events.dates import (
    _canonical_date,
    _epoch_date,
    datetime_ms,
    format_datetime,
    normalize_date,
    parse_datetime,
)
from worker.events.model import (
    KIND_NAMES,
    KIND_REGULAR,
    KIND_SCREEN_VIEW,
    KIND_SESSION_END,
    Event,
    Row,
    RowHead,
    as_row,
    decode_row,
    decode_row_head,
    decode_row_heads,
    encode_event,
)
from worker.events.properties import (
    MAX_PROPERTY_DEPTH,
    flatten_properties,
)
from worker.events.validation import (
    DEFAULT_LIMITS,
    Limits,
    parse_event,
    parse_events,
)

__all__ = [
    "DEFAULT_LIMITS",
    "KIND_NAMES",
    "KIND_REGULAR",
    "KIND_SCREEN_VIEW",
    "KIND_SESSION_END",
    "MAX_PROPERTY_DEPTH",
    "Event",
    "InvalidEvent",
    "Limits",
    "Row",
    "RowHead",
    "_canonical_date",
    "_epoch_date",
    "as_row",
    "datetime_ms",
    "decode_row",
    "decode_row_head",
    "decode_row_heads",
    "encode_event",
    "flatten_properties",
    "format_datetime",
    "normalize_date",
    "parse_datetime",
    "parse_event",
    "parse_events",
]
