"""A session's pack of held events: the record format, written by the apply, read by the release.

With a reorder window (worker/reorder.py) each held screen_view or session_end
is appended to its session's pack, `{p:N}:held:<session>`, as one record
(`held_record`; release_held.lua's header has the format, and reads it too).
A record is four fields, each ended by FIELD_END (0x1f):

    <created ms %015d><deadline ms %015d><tag, 14><kind: v or e> 0x1f
    <profile field or empty> 0x1f <own duration> 0x1f <head> 0x1f

the head being the event's row without its duration and closing brace
(worker/stored_view.py). JSON rows (msgspec escapes control characters),
escaped ids and the header never hold 0x1f, so a pack of such records splits
into its fields in one `bytes.split` (worker/reorder_release.py does so).

Packs written by an earlier version hold records framed as
"<length>:<header><profile field>|<stored form>" (the stored form current or
legacy); during a rolling upgrade one pack may hold both. `held_events` reads
either, one record at a time: byte 45 of a current record is 0x1f, never so in
an earlier one (inside its header, after "<length>:").
"""

from __future__ import annotations

import re
from typing import NamedTuple

from worker import stored_view

# A held record's fields end with this byte (release_held.lua's header has the format):
# a control character, which JSON rows (msgspec escapes them), escaped ids and the
# header never hold, so a pack splits into its fields in one call.
FIELD_END = b"\x1f"
# The fixed-width part that starts a record: created ms (15), deadline ms (15), tag (14),
# kind (1). Its first 44 bytes order a session's records.
HEADER = 45


def held_record(
    created_ms: int,
    deadline_ms: int,
    tag: str,
    kind: str,
    profile_field: str,
    own_duration: int,
    head: bytes,
) -> bytes:
    """One held event, as its session's pack holds it (release_held.lua's header has the
    format): four fields, each ended by FIELD_END: the header (created_at, deadline, `tag`,
    which makes events of one batch unique and keeps their batch order, and the kind),
    the profile field, the event's own duration and its head (worker/stored_view.py: its
    row without duration and closing brace).

    The apply builds the same bytes inline (worker/apply_plan.py `_plan_held`).
    """
    return b"%015d%015d%b%b\x1f%b\x1f%d\x1f%b\x1f" % (
        created_ms,
        deadline_ms,
        tag.encode(),
        kind.encode(),
        profile_field.encode(),
        own_duration,
        head,
    )


class HeldEvent(NamedTuple):
    """A held record, read from a pack of either form (`held_events`)."""

    created_ms: int
    deadline_ms: int
    order: bytes  # the first 44 bytes of its header: what orders a session's records
    kind: bytes  # b"v" (a screen_view) or b"e" (a session_end)
    profile_field: bytes
    own_duration: bytes  # as written (decimal)
    head: bytes
    start: int  # where its bytes start in the pack
    stop: int  # and end


# A record of the earlier form, "<length>:<header><profile field>|<stored form>", the
# stored form in the current form ("<created>;<own>;<head>") or the legacy one
# ("<created>|<own>|<row>", the row ending with its own duration, absent when 0).
_FRAMED = re.compile(rb"(\d+):(([-\d]{15})([-\d]{15}).{14})(.)([^|]*)\|-?\d+([;|])(-?\d+)\7", re.S)


def held_events(pack: bytes) -> list[HeldEvent]:
    """The records of a session's pack, in pack order: of the current form, or framed as
    an earlier version wrote them (during a rolling upgrade a pack may hold both)."""
    out: list[HeldEvent] = []
    at = 0
    size = len(pack)
    separator = FIELD_END[0]
    while at < size:
        if size > at + HEADER and pack[at + HEADER] == separator:
            fields_at = at + HEADER + 1
            pfield_end = pack.index(FIELD_END, fields_at)
            own_end = pack.index(FIELD_END, pfield_end + 1)
            stop = pack.index(FIELD_END, own_end + 1) + 1
            out.append(
                HeldEvent(
                    int(pack[at : at + 15]), int(pack[at + 15 : at + 30]),
                    pack[at : at + 44], pack[at + 44 : at + 45],
                    pack[fields_at:pfield_end], pack[pfield_end + 1 : own_end],
                    pack[own_end + 1 : stop - 1], at, stop,
                )
            )  # fmt: skip
            at = stop
            continue
        found = _FRAMED.match(pack, at)
        if found is None:
            raise ValueError(f"not a held record: {pack[at : at + 60]!r}")
        length, order, created, deadline, kind, pfield, separator_of, own = found.groups()
        stop = at + len(length) + 1 + int(length)
        head_stop = stop
        if separator_of == b"|":  # the legacy row ends with its own duration (absent when 0)
            head_stop -= 1 if own == b"0" else 13 + len(own)
        out.append(
            HeldEvent(int(created), int(deadline), order, kind, pfield, own,
                      pack[found.end() : head_stop], at, stop)
        )  # fmt: skip
        at = stop
    return out


def held_rows(pack: bytes) -> list[bytes]:
    """The JSON rows of the records in a session's pack, in pack order (as they are: with
    their own durations). Records of the earlier forms are read too."""
    return [stored_view.as_is(e.head, int(e.own_duration)) for e in held_events(pack)]


def held_times(pack: bytes) -> list[tuple[int, int]]:
    """(created ms, deadline ms) of the records in a session's pack."""
    return [(e.created_ms, e.deadline_ms) for e in held_events(pack)]


def held_record_bytes(pack: bytes) -> list[bytes]:
    """Each record's bytes in a session's pack, as stored (for tests)."""
    return [pack[e.start : e.stop] for e in held_events(pack)]
