"""Releasing held events: decided in Python, written by Redis in one WATCHed transaction.

The rules are release_held.lua's (its header has them, and the pack format):
per due session, every held event created no later than its newest due one
goes, oldest created first, through OpenPanel's session rules; a late event
is queued at once. Here Python does the deciding, and Redis only the
checking and the writing, so row bytes are cut and joined by Python and
travel as plain command arguments (RPUSH, HSET), not through Lua strings:

1. On one connection to the shard's master: WATCH the state the rules read
   (last views, profiles' last views, closed sessions and when they closed,
   and `held-gen`, which every release increments); read the due sessions'
   deadlines, held packs, closed marks and last views.
2. Decide, in Python (`_decide`); read the profiles' last views it touches.
3. MULTI: queue the rows, write the views, closed marks and profiles, rewrite
   each pack (`release_rewrite.lua`: what stays, plus whatever an apply
   appended meanwhile; the deadline from both; when what stays is the pack's
   tail, as with events arrived in order, only its offset is sent and Redis
   cuts the pack), INCR `held-gen`; EXEC.

An apply only ever appends to a pack and lowers a deadline, so applies do not
abort the transaction; a concurrent release, the sweep or an apply without a
window (they write the watched keys) make it run again with what they wrote.
After a few aborted runs, or when Redis refuses the writes (a full Redis,
where only scripts flagged allow-oom still run), the same sessions go
through release_held.lua, which does it all inside Redis.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ConnectionError, OutOfMemoryError, ResponseError, TimeoutError

from worker import stored_view
from worker.keys import ShardKeys
from worker.resp import Framed, read_replies, send_commands
from worker.scripts import Released, Scripts, load_lua
from worker.topology import Client, node_for, refreshed_on_error

ATTEMPTS = 3  # transactions aborted by a concurrent writer before the script does it

_REWRITE = load_lua("release_rewrite")


def release(
    redis: Client,
    shard: ShardKeys,
    sessions: Sequence[str],
    now_ms: int,
    views_ttl_s: int,
    closed_ttl_s: int,
) -> Released:
    """Release the held events of `sessions` that are still due at `now_ms`."""
    for attempt in range(ATTEMPTS):
        node = node_for(redis, shard.queue)
        pool = node.redis.connection_pool
        connection: Any = pool.get_connection()
        try:
            with refreshed_on_error(redis):
                done = _release_once(connection, shard, sessions, now_ms, views_ttl_s,
                                     closed_ttl_s)  # fmt: skip
        except OutOfMemoryError:
            connection.disconnect()  # it may hold a WATCH
            break  # a full Redis: only the allow-oom script may write
        except (ConnectionError, TimeoutError):
            connection.disconnect()
            if attempt + 1 == ATTEMPTS:
                raise
            # Safe to run again, even after an EXEC that went through: a release reads
            # what the last one wrote (its writes are one transaction).
            continue
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)
        if done is not None:
            return done
    return release_in_redis(redis, shard, sessions, now_ms, views_ttl_s, closed_ttl_s)


def release_in_redis(
    redis: Client,
    shard: ShardKeys,
    sessions: Sequence[str],
    now_ms: int,
    views_ttl_s: int,
    closed_ttl_s: int,
) -> Released:
    """The same release, made by release_held.lua inside Redis."""
    return Scripts(redis).release_held(shard, sessions, now_ms, views_ttl_s, closed_ttl_s)


def _release_once(
    connection: Any,
    shard: ShardKeys,
    sessions: Sequence[str],
    now_ms: int,
    views_ttl_s: int,
    closed_ttl_s: int,
) -> Released | None:
    """One WATCHed read, decision and transaction; None when the transaction was aborted."""
    gen = shard.held_generation
    watched = (gen, shard.views, shard.profile_views, shard.closed, shard.closed_at)
    reads: list[tuple[Any, ...]] = [
        ("WATCH", *watched),
        ("TYPE", shard.queue),
        ("TYPE", shard.sessions),
        ("TYPE", shard.profile_views),
        ("ZRANGEBYSCORE", shard.closed_at, "-inf", f"({now_ms - closed_ttl_s * 1000}",
         "LIMIT", 0, 1000),
    ]  # fmt: skip
    keys = [shard.held(session) for session in sessions]
    if sessions:
        reads += [
            ("ZMSCORE", shard.held_due, *sessions),
            ("MGET", *keys),
            ("HMGET", shard.closed, *sessions),
            ("HMGET", shard.views, *sessions),
        ]
    send_commands(connection, reads)
    replies = read_replies(connection, len(reads))
    typed = ((shard.queue, "list"), (shard.sessions, "zset"), (shard.profile_views, "hash"))
    for (key, want), found in zip(typed, replies[1:4], strict=True):
        kind = found.decode() if isinstance(found, bytes) else str(found)
        if kind not in ("none", want):
            raise ResponseError(f"WRONGTYPE {key} holds a {kind}, not a {want}")
    forgotten: list[bytes] = replies[4]
    plan = _Plan(now_ms)
    if sessions:
        deadlines, packs, closed, views = replies[5:9]
        gone = set(forgotten)
        for n, session in enumerate(sessions):
            deadline = deadlines[n]
            if deadline is None or float(deadline) > now_ms:
                continue  # released by another flush since it was listed
            pack = packs[n]
            if pack is None:
                pack = _missing_pack(connection, keys[n])
            mark = closed[n]
            closed_at = (
                int(float(mark)) if mark is not None and session.encode() not in gone else None
            )
            plan.session(session, keys[n], pack, closed_at, views[n])
    profiles: list[bytes | None] = []
    if plan.profile_order:
        send_commands(connection, [("HMGET", shard.profile_views, *plan.profile_order)])
        profiles = read_replies(connection, 1)[0]
    writes = plan.writes(shard, forgotten, profiles, views_ttl_s)
    if not writes:  # nothing due, nothing to forget: no transaction, no write
        send_commands(connection, [("UNWATCH",)])
        read_replies(connection, 1)
        return Released(0, 0)
    writes.append(("INCR", gen))
    commands: list[tuple[Any, ...] | Framed] = [("MULTI",), *writes, ("EXEC",)]
    send_commands(connection, commands)
    results = read_replies(connection, len(commands))[-1]
    if results is None:
        return None
    for result in results:
        if isinstance(result, Exception):
            raise result
    return Released(plan.rows, plan.late)


def _missing_pack(connection: Any, key: str) -> bytes:
    """MGET reads a key of another type as absent: say so, as the script does."""
    send_commands(connection, [("TYPE", key)])
    found = read_replies(connection, 1)[0]
    kind = found.decode() if isinstance(found, bytes) else str(found)
    if kind != "none":
        raise ResponseError(f"WRONGTYPE {key} holds a {kind}, not a string")
    return b""


# A view on its way, where it lies in the text that holds it (a stored last view, or a
# pack): (created ms, own duration as written, text, head start, head end, stored form's
# start, legacy?).
_ViewAt = tuple[int, bytes, bytes, int, int, int, bool]

# A held record from its frame (release_held.lua's header has the format): the frame's
# length, created and deadline (the first two of the 44 characters that order records),
# after the tag: kind, profile field, then the event's stored form up to its head
# (worker/stored_view.py: "<created>;<own>;" or the legacy "<created>|<own>|").
_RECORD = re.compile(rb"(\d+):([-\d]{15})([-\d]{15}).{14}(.)([^|]*)\|-?\d+([;|])(-?\d+)\6", re.S)
# A stored last view, up to its head.
_STORED = re.compile(rb"(-?\d+)([;|])(-?\d+)\2")


def _view_of(text: bytes) -> _ViewAt:
    """The stored last view `text`, of either form (worker/stored_view.py)."""
    found = _STORED.match(text)
    if found is None:
        raise ValueError(f"not a stored view: {text[:40]!r}")
    created, separator, own = found.groups()
    stop = len(text)
    legacy = separator == b"|"
    if legacy:  # the legacy row ends with its own duration (absent when 0)
        stop -= 1 if own == b"0" else 13 + len(own)
    return (int(created), own, text, found.end(), stop, 0, legacy)


def _form(view: _ViewAt) -> bytes:
    """Its stored form (written anew in the current form when read in the legacy one)."""
    created, own, text, head, end, start, legacy = view
    if legacy:
        return stored_view.encode(created, int(own), text[head:end])
    return text if start == 0 and end == len(text) else text[start:end]


_AS_IS = b"}\r\n"  # the end of a row queued with no duration of its own


class _Plan:
    """What a release writes, decided session by session (release_held.lua's rules).

    The rows it queues are kept as the RPUSH's frames (`frames`: each row's length,
    its head, its duration and `}`), joined once into the write (worker/resp.py
    `Framed`): no row is put together before that.
    """

    def __init__(self, now_ms: int) -> None:
        self.now = now_ms
        self.frames: list[Any] = []
        self.rows = 0
        self.late = 0
        # per session: its id, key, length read, where the records that stay start in the
        # pack ("" when they are given instead), those records, their deadline
        self.packs: list[tuple[str, str, int, int | str, bytes, int | None]] = []
        self.views_set: list[Any] = []
        self.indexed: list[Any] = []
        self.views_ended: list[str] = []
        self.closed_set: list[Any] = []
        self.closed_index: list[Any] = []
        self.reopened: list[str] = []
        # profile field -> (created, order key, view or None for a session_end): the
        # profile's newest released event by created_at, then arrival, then batch order
        self.profiles: dict[str, tuple[int, bytes, _ViewAt | None]] = {}
        self.profile_order: list[str] = []

    def _queue(self, view: _ViewAt, ms: int | None) -> None:
        """Queue `view`'s row: with `ms` as its duration, or as it is (None)."""
        if ms is None:
            own = view[1]
            end = _AS_IS if own == b"0" else b',"duration":%b}\r\n' % own
        else:
            end = b',"duration":%d}\r\n' % ms
        head = view[3]
        stop = view[4]
        self.frames += (b"$%d\r\n" % (stop - head + len(end) - 2), view[2][head:stop], end)
        self.rows += 1

    def session(
        self, session: str, key: str, pack: bytes, closed: int | None, stored: bytes | None
    ) -> None:
        # (order key, created, deadline, start of the record, end, start of frame, the match)
        records = []
        at = 0
        size = len(pack)
        match = _RECORD.match
        while at < size:
            found = match(pack, at)
            if found is None:
                raise ValueError(f"not a held record: {pack[at : at + 60]!r}")
            length, created, deadline = found.group(1, 2, 3)
            start = at + len(length) + 1
            stop = start + int(length)
            records.append((pack[start : start + 44], int(created), int(deadline), start, stop,
                            at, found))  # fmt: skip
            at = stop
        if len(records) > 1:
            records.sort()
        now = self.now
        cut = None
        for record in records:
            if record[2] <= now and (cut is None or record[1] > cut):
                cut = record[1]
        released = 0
        next_deadline = None
        released_end = 0  # where the last released record ends in the pack
        kept_start = size  # where the first kept record starts
        for record in records:
            if cut is not None and record[1] <= cut:
                released += 1
                if record[4] > released_end:
                    released_end = record[4]
            else:
                if next_deadline is None or record[2] < next_deadline:
                    next_deadline = record[2]
                if record[5] < kept_start:
                    kept_start = record[5]
        if released_end <= kept_start:  # what stays is the pack's tail: Redis cuts it
            self.packs.append((session, key, size, kept_start, b"", next_deadline))
        else:
            kept = b"".join([pack[r[5] : r[4]] for r in records[released:]])
            self.packs.append((session, key, size, "", kept, next_deadline))
        if released:
            self._rules(session, pack, records[:released], closed, stored)

    def _rules(
        self, session: str, pack: bytes, records: list[Any], closed: int | None,
        stored: bytes | None,
    ) -> None:  # fmt: skip
        view = _view_of(stored) if stored is not None else None
        view_changed = closed_changed = False
        queue = self._queue
        for order, created, _deadline, _start, stop, _frame, found in records:
            kind, pfield_bytes, separator, own = found.group(4, 5, 6, 7)
            pfield = pfield_bytes.decode() if pfield_bytes else ""
            if separator == b";":
                this = (created, own, pack, found.end(), stop, found.end(5) + 1, False)
            else:  # the legacy row ends with its own duration (absent when 0)
                cut = 1 if own == b"0" else 13 + len(own)
                this = (created, own, pack, found.end(), stop - cut, found.end(5) + 1, True)
            late = (closed is not None and created < closed) or (
                view is not None and created < view[0]
            )
            if late:
                self.late += 1
            elif closed is not None:
                closed, closed_changed = None, True  # an event after the session_end reopens it
            if kind == b"v":  # a screen_view
                if late:
                    queue(this, None)
                else:
                    if view is not None:
                        gap = created - view[0]
                        queue(view, gap if gap > 0 else 0)
                    view = this
                    view_changed = True
                    if pfield:
                        self._profile_event(pfield, created, order, this)
            else:
                # A session_end closes its session, late or not: the waiting view goes first.
                if view is not None:
                    queue(view, None)
                queue(this, None)
                closed = max(
                    created, view[0] if view is not None else 0,
                    closed if closed is not None else 0,
                )  # fmt: skip
                closed_changed = True
                view = None
                view_changed = True
                if pfield:
                    self._profile_event(pfield, created, order, None)
        if view_changed:
            if view is not None:
                self.views_set += (session, _form(view))
                self.indexed += (self.now, session)
            else:
                self.views_ended.append(session)
        if closed_changed:
            if closed is not None:
                self.closed_set += (session, closed)
                self.closed_index += (self.now, session)
            else:
                self.reopened.append(session)

    def _profile_event(self, pfield: str, created: int, order: bytes, view: _ViewAt | None) -> None:
        # `order` is the record's order key (created, deadline, tag): sessions are released
        # one after another, so a tie on created_at and arrival between two sessions of one
        # profile goes to the later one in its batch, not to the session released last.
        known = self.profiles.get(pfield)
        if known is None:
            self.profile_order.append(pfield)
        elif created < known[0] or (created == known[0] and order < known[1]):
            return
        self.profiles[pfield] = (created, order, view)

    def writes(
        self,
        shard: ShardKeys,
        forgotten: list[bytes],
        profiles: Sequence[bytes | None],
        views_ttl_s: int,
    ) -> list[tuple[Any, ...] | Framed]:
        out: list[tuple[Any, ...] | Framed] = []
        if forgotten:
            out.append(("HDEL", shard.closed, *forgotten))
            out.append(("ZREM", shard.closed_at, *forgotten))
        if self.packs:
            args: list[Any] = []
            keys: list[str] = []
            for session, key, size, start, kept, deadline in self.packs:
                keys.append(key)
                args += (session, size, "" if deadline is None else deadline, start, kept)
            out.append(("EVAL", _REWRITE, 1 + len(keys), shard.held_due, *keys, *args))
        if self.rows:
            out.append(Framed(("RPUSH", shard.queue), self.rows, self.frames))
        if self.views_set:
            out.append(("HSET", shard.views, *self.views_set))
            out.append(("ZADD", shard.sessions, *self.indexed))
        if self.views_ended:
            out.append(("HDEL", shard.views, *self.views_ended))
            out.append(("ZREM", shard.sessions, *self.views_ended))
        if self.views_set:
            out.append(("EXPIRE", shard.views, views_ttl_s))
        if self.closed_set:
            out.append(("HSET", shard.closed, *self.closed_set))
            out.append(("ZADD", shard.closed_at, *self.closed_index))
        if self.reopened:
            out.append(("HDEL", shard.closed, *self.reopened))
            out.append(("ZREM", shard.closed_at, *self.reopened))
        profiles_set: list[Any] = []
        profiles_ended: list[str] = []
        for pfield, value in zip(self.profile_order, profiles, strict=True):
            created, _order, view = self.profiles[pfield]
            if value is None or created >= stored_view.created_ms(value):
                if view is not None:
                    profiles_set += (pfield, _form(view))
                elif value is not None:
                    profiles_ended.append(pfield)
        if profiles_set:
            out.append(("HSET", shard.profile_views, *profiles_set))
        if profiles_ended:
            out.append(("HDEL", shard.profile_views, *profiles_ended))
        if profiles_set:
            out.append(("EXPIRE", shard.profile_views, views_ttl_s))
        return out
