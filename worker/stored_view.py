"""The stored view: how a screen_view waits in Redis for the view that gives it a duration.

A session's last screen_view waits in `{p:N}:views` (and its profile's, in
`{p:N}:profile_views`) until its session's next view gives it a duration,
or a session_end / the idle-session sweep queues it as it is. Held events of
the reorder window (worker/reorder.py) carry the same form after their
header. This module is that form's one home: every Python reader and writer
goes through it, and the Lua scripts that read it (resolve_views.lua,
release_held.lua, sweep_sessions.lua) follow the description below.

    <created ms>;<own duration>;<head>

- `created ms`: the view's `created_at`, epoch ms (decimal, maybe negative);
- `own duration`: the `duration` the event arrived with (decimal, 0 mostly);
- `head`: the event's JSON row **without** its `duration` field and without
  the closing `}` (the row of the event with duration 0, which msgspec omits,
  minus its last byte).

The row queued for it is built from the head and a suffix, never cut out of
another row, so the position of `duration` among the row's fields does not
matter:

- with a duration given by the next view, `ms` (0 included, as the seed's
  cjson wrote it): `head + ',"duration":<ms>}'`;
- as it is (a session_end, the sweep, a late view): `head + '}'` when its own
  duration is 0, else `head + ',"duration":<own>}'`.

Before this form, a view was stored as `<created ms>|<own duration>|<row>`
with `duration` the row's last field (absent when 0). Values of that form,
left in Redis by an earlier release during an upgrade, are still read (here
and in the scripts): the separator after the created ms tells them apart,
and their head is their row without its trailing duration field and brace.
Nothing writes that form any more.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from worker.events import Row, encode_event

SEPARATOR = b";"
LEGACY_SEPARATOR = b"|"


class StoredView(NamedTuple):
    created_ms: int
    own_duration: int
    head: bytes


def head_of(event: Row, row: bytes) -> bytes:
    """The head of `event` whose JSON row is `row`: the row without duration and its `}`."""
    if event.duration == 0:  # omitted from the row (msgspec omits defaults)
        return row[:-1]
    return msgspec.json.encode(msgspec.structs.replace(event, duration=0))[:-1]


def encode(created_ms: int, own_duration: int, head: bytes) -> bytes:
    """The stored form of a view."""
    return b"%d;%d;%b" % (created_ms, own_duration, head)


def of_event(event: Row, row: bytes | None = None) -> bytes:
    """The stored form of `event` (its row, when already encoded, as `row`)."""
    if row is None:
        row = encode_event(event)
    return encode(event.created_ms, event.duration, head_of(event, row))


def with_duration(head: bytes, ms: int) -> bytes:
    """The row of a view with `ms` as its duration."""
    return b'%b,"duration":%d}' % (head, ms)


def as_is(head: bytes, own_duration: int) -> bytes:
    """The row of a view with the duration it arrived with."""
    return head + b"}" if own_duration == 0 else with_duration(head, own_duration)


def _current_first(value: bytes) -> int:
    """Where the current form's first separator is (after the created ms: at most 21
    characters, no legacy separator before it); -1 when `value` is not of that form."""
    first = value.find(SEPARATOR, 0, 24)
    legacy = value.find(LEGACY_SEPARATOR, 0, 24)
    return first if first > 0 and (legacy < 0 or first < legacy) else -1


def current_fields(value: bytes) -> list[bytes] | None:
    """The current form's three fields (created ms, own duration, head) split in one call,
    as bytes; None when `value` is not of that form (`parse` reads the legacy one). The
    same test as `is_current`, for the release's loops (worker/reorder_release.py)."""
    fields = value.split(SEPARATOR, 2)
    if len(fields) == 3 and 0 < len(fields[0]) < 24 and LEGACY_SEPARATOR not in fields[0]:
        return fields
    return None


def is_current(value: bytes) -> bool:
    """Is this stored view in the current form (not the legacy one)?"""
    return _current_first(value) > 0


def parse(value: bytes) -> StoredView:
    """A stored view of either form (the legacy `<ms>|<own>|<row>` too)."""
    first = _current_first(value)
    if first > 0:
        second = value.index(SEPARATOR, first + 1)
        return StoredView(int(value[:first]), int(value[first + 1 : second]), value[second + 1 :])
    legacy = value.find(LEGACY_SEPARATOR, 0, 24)
    if legacy > 0:  # the legacy form: the row ends with its own duration (absent when 0)
        second = value.index(LEGACY_SEPARATOR, legacy + 1)
        own = value[legacy + 1 : second]
        own_duration = int(own)
        cut = 1 if own_duration == 0 else 13 + len(own)  # ',"duration":<own>}'
        return StoredView(int(value[:legacy]), own_duration, value[second + 1 : -cut])
    raise ValueError(f"not a stored view: {value[:40]!r}")


def created_ms(value: bytes) -> int:
    """The created ms of a stored view of either form (`parse`'s, read without its head)."""
    first = _current_first(value)
    if first > 0:
        int(value[first + 1 : value.index(SEPARATOR, first + 1)])  # as `parse` reads it
        return int(value[:first])
    return parse(value).created_ms


def row_of(value: bytes) -> bytes:
    """The row a stored view of either form is queued as when nothing gives it a duration."""
    view = parse(value)
    return as_is(view.head, view.own_duration)
