"""Planning a batch's apply: what each shard gets, worked out in Python from the batch alone.

OpenPanel's rules (see `worker/buffer.py`) mostly follow from the batch
itself: within a batch, a session's view gets its duration from the
session's next view, a session_end queues the view before it, and the
session's (and its profiles') last view at the end of the batch is known.
`plan_shard()` works all of that out. Only one thing needs what Redis holds:
the view each session was waiting with before this batch, which the
session's first event of the batch queues (with a duration, for a view; as
it is, for a session_end). `resolve_views.lua` does that part inside the
transaction (worker/apply.py), so it sees the stored views as they are at
that moment, whoever wrote them.

Views are kept in their stored form (worker/stored_view.py): a head (the row
without duration) from which every row queued for the view is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from worker import stored_view
from worker.events import KIND_REGULAR, KIND_SCREEN_VIEW, KIND_SESSION_END, Row
from worker.keys import ShardKeys, escape
from worker.reorder import batch_tag


@dataclass
class ShardWrites:
    """Everything one batch writes to one shard, as plain command arguments."""

    shard: ShardKeys
    marker: str
    # The marker's value: the digest of the batch's content (the same on every shard).
    digest: str = ""
    queue_rows: list[bytes] = field(default_factory=list)
    # The session's first event of the batch and what it does with the view
    # stored before it: (session id, created ms of a first view; "" for a first session_end).
    resolve: list[tuple[str, str]] = field(default_factory=list)
    views_set: list[tuple[str, bytes]] = field(default_factory=list)  # session -> last view
    views_ended: list[str] = field(default_factory=list)
    profiles_set: dict[str, bytes] = field(default_factory=dict)
    profiles_ended: set[str] = field(default_factory=set)
    visitors: dict[str, list[str]] = field(default_factory=dict)  # project -> profile ids
    dead_letters: Sequence[bytes] = ()
    publish: tuple[str, bytes] | None = None
    # With a reorder window: each session's events held for it, records
    # (worker/held_pack.py), all with the same deadline `hold_until`, and its pack's key.
    held: dict[str, list[bytes]] = field(default_factory=dict)
    held_keys: dict[str, str] = field(default_factory=dict)
    hold_until: int = 0
    # The batch's events on this shard by kind (KIND_REGULAR / SCREEN_VIEW / SESSION_END).
    kinds: dict[str, int] = field(default_factory=dict)


def plan_shard(
    shard: ShardKeys,
    marker: str,
    events: Sequence[Row],
    rows: Sequence[bytes],
    hold_until: int = 0,
) -> ShardWrites:
    """The writes of `events` (in order, with their encoded rows) to one shard.

    With `hold_until` (arrival + a reorder window, ms), screen_views and
    session_ends are held until then instead (worker/reorder.py: the flush
    releases them); regular events and visitors are written as ever.
    """
    if hold_until:
        return _plan_held(shard, marker, events, rows, hold_until)
    writes = ShardWrites(shard, marker)
    queue = writes.queue_rows
    resolve = writes.resolve
    # session id -> its pending view in this batch (created, own duration, head), or None
    pending: dict[str, tuple[int, int, bytes] | None] = {}
    # profile field -> its last view in this batch (encoded at the end), or None
    profiles: dict[str, tuple[int, int, bytes] | None] = {}
    visitors: dict[str, dict[str, None]] = {}
    names = _profile_names()  # (project, profile) -> its profile field
    name_of = names.get
    with_duration = stored_view.with_duration
    views = ends = 0
    # Row.kind and the visitors' set inlined: this loop runs for every event of the batch.
    for event, row in zip(events, rows, strict=True):
        profile_id = event.profile_id
        if profile_id:
            members = visitors.get(event.project_id)
            if members is None:
                visitors[event.project_id] = {profile_id: None}
            else:
                members[profile_id] = None
        session = event.session_id
        if not session or event.queued_as_is:  # no session, or through the rules already
            queue.append(row)
            continue
        name = event.name
        if name == "screen_view":
            views += 1
            created = event.created_ms
            if session not in pending:
                resolve.append((session, str(created)))
            else:
                previous = pending[session]
                if previous is not None:
                    queue.append(with_duration(previous[2], max(0, created - previous[0])))
            own = event.duration
            view = (created, own, row[:-1] if own == 0 else stored_view.head_of(event, row))
            pending[session] = view
        elif name == "session_end":
            ends += 1
            if session not in pending:
                resolve.append((session, ""))
            else:
                previous = pending[session]
                if previous is not None:
                    queue.append(stored_view.as_is(previous[2], previous[1]))
            pending[session] = view = None
            queue.append(row)
        else:
            queue.append(row)
            continue
        if profile_id:
            pair = (event.project_id, profile_id)
            pfield = name_of(pair)
            if pfield is None:
                pfield = names[pair] = ShardKeys.profile_field(*pair)
            profiles[pfield] = view
    encode = stored_view.encode
    for session, pending_view in pending.items():
        if pending_view is None:
            writes.views_ended.append(session)
        else:
            writes.views_set.append((session, encode(*pending_view)))
    for profile, value in profiles.items():
        if value is None:
            writes.profiles_ended.add(profile)
        else:
            writes.profiles_set[profile] = encode(*value)
    _finish(writes, visitors, len(events), views, ends)
    return writes


def _finish(
    writes: ShardWrites, visitors: dict[str, dict[str, None]], total: int, views: int, ends: int
) -> None:
    """The plan's visitors (per project, in order of first sight) and counts by kind."""
    writes.visitors = {project: list(members) for project, members in visitors.items()}
    writes.kinds = {
        KIND_REGULAR: total - views - ends,
        KIND_SCREEN_VIEW: views,
        KIND_SESSION_END: ends,
    }


def _plan_held(
    shard: ShardKeys, marker: str, events: Sequence[Row], rows: Sequence[bytes], hold_until: int
) -> ShardWrites:
    if len(rows) != len(events):  # the loop below zips them without strict=True
        raise ValueError(f"{len(rows)} rows for {len(events)} events")
    writes = ShardWrites(shard, marker, hold_until=hold_until)
    queue = writes.queue_rows
    held = writes.held
    visitors: dict[str, dict[str, None]] = {}
    # held_record's bytes (worker/held_pack.py), built here: what every record of the batch
    # shares after its created ms (deadline, the tag's batch part) is formatted once.
    batch = b"%015d%b" % (hold_until, batch_tag(marker).encode())
    # The event's number in the batch (%06d, mod 10**6) comes from a table, and an own
    # duration of 0 (the usual) is written in the template: one number formatted per
    # record (its created ms), not three.
    view_record = b"%%015d%b%%bv\x1f%%b\x1f%%d\x1f%%b\x1f" % batch
    end_record = b"%%015d%b%%be\x1f%%b\x1f%%d\x1f%%b\x1f" % batch
    view_record_0 = b"%%015d%b%%bv\x1f%%b\x1f0\x1f%%b\x1f" % batch
    end_record_0 = b"%%015d%b%%be\x1f%%b\x1f0\x1f%%b\x1f" % batch
    profile_fields = _profile_fields()
    field_of = profile_fields.get
    views = ends = 0
    numbers = _numbers(len(events))  # at least as many as events: zip stops at their end
    # Row.kind and the visitors' set inlined: this loop runs for every event of the batch.
    for number, event, row in zip(numbers, events, rows, strict=False):
        profile_id = event.profile_id
        if profile_id:
            members = visitors.get(event.project_id)
            if members is None:
                visitors[event.project_id] = {profile_id: None}
            else:
                members[profile_id] = None
        session = event.session_id
        if not session or event.queued_as_is:  # no session, or through the rules already
            queue.append(row)
            continue
        name = event.name
        if name == "screen_view":
            views += 1
            template, template_0 = view_record, view_record_0
        elif name == "session_end":
            ends += 1
            template, template_0 = end_record, end_record_0
        else:
            queue.append(row)
            continue
        if profile_id:
            pair = (event.project_id, profile_id)
            pfield = field_of(pair)
            if pfield is None:
                pfield = profile_fields[pair] = ShardKeys.profile_field(*pair).encode()
        else:
            pfield = b""
        own = event.duration
        if own == 0:
            record = template_0 % (event.created_ms, number, pfield, row[:-1])
        else:
            record = template % (
                event.created_ms, number, pfield, own, stored_view.head_of(event, row)
            )  # fmt: skip
        records = held.get(session)
        if records is None:
            held[session] = [record]
        else:
            records.append(record)
    held_key = shard.held("")  # the keys' common start (escape("") is "")
    writes.held_keys = {session: held_key + escape(session) for session in held}
    _finish(writes, visitors, len(events), views, ends)
    return writes


# Profile fields (`ShardKeys.profile_field`) by (project, profile), as str (the plan without
# a window) and encoded (the held records): the same for every shard, and profiles come
# back batch after batch. Replaced whole when full (never cleared in place: threads may
# be reading them).
_PROFILE_NAMES: dict[tuple[str, str], str] = {}
_PROFILE_FIELDS: dict[tuple[str, str], bytes] = {}
_PROFILE_FIELDS_KEPT = 16_384


def _profile_names() -> dict[tuple[str, str], str]:
    """The str profile fields' cache, replaced once it holds `_PROFILE_FIELDS_KEPT`."""
    global _PROFILE_NAMES
    if len(_PROFILE_NAMES) >= _PROFILE_FIELDS_KEPT:
        _PROFILE_NAMES = {}
    return _PROFILE_NAMES


def _profile_fields() -> dict[tuple[str, str], bytes]:
    """The encoded profile fields' cache, replaced once it holds `_PROFILE_FIELDS_KEPT`."""
    global _PROFILE_FIELDS
    if len(_PROFILE_FIELDS) >= _PROFILE_FIELDS_KEPT:
        _PROFILE_FIELDS = {}
    return _PROFILE_FIELDS


# b"%06d" of 0, 1, ...: the numbers of a batch's events in their held records (mod 10**6).
# Replaced whole when it grows (never extended in place: threads may be reading it).
_NUMBERS: list[bytes] = []
_NUMBERS_KEPT = 100_000


def _numbers(count: int) -> list[bytes]:
    """At least `count` numbers (b"%06d" of n mod 10**6): kept for batches of up to
    `_NUMBERS_KEPT` events, made for the batch above."""
    global _NUMBERS
    numbers = _NUMBERS
    if count <= len(numbers):
        return numbers
    if count > _NUMBERS_KEPT:
        return [b"%06d" % (n % 1_000_000) for n in range(count)]
    numbers = [b"%06d" % n for n in range(max(count, 1_000))]
    _NUMBERS = numbers
    return numbers
