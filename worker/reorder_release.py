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
2. Decide, in Python (`_Plan.sessions`; the common case, a pack of views all
   due, in created order, of a session not closed, without a call per
   session; every other through `_Plan.session`, the general rules); read
   the profiles' last views it touches.
3. MULTI: queue the rows, write the views, closed marks and profiles, rewrite
   each pack (what stays of the packs cut written with one MSET to a key of
   its own per session, `{p:N}:held-kept:<session>`, then `release_rewrite.lua`
   renames each over its pack, adding whatever an apply appended meanwhile,
   and writes the deadlines; a pack released whole is named by its length
   read only, and goes), INCR `held-gen`; EXEC. What stays never passes
   through Lua: Redis' Lua hashes every byte of every string it is given or
   reads.

An apply only ever appends to a pack and lowers a deadline, so applies do not
abort the transaction; a concurrent release, the sweep or an apply without a
window (they write the watched keys) make it run again with what they wrote.
After a few aborted runs, or when Redis refuses the writes (a full Redis,
where only scripts flagged allow-oom still run), the same sessions go
through release_held.lua, which does it all inside Redis.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

from redis.exceptions import ConnectionError, OutOfMemoryError, ResponseError, TimeoutError

from worker import stored_view
from worker.held_pack import FIELD_END, HEADER, held_events
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
        plan.sessions(connection, sessions, keys, deadlines, packs, closed, views, forgotten)
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


_AS_IS = b"}\r\n"  # the end of a row queued with no duration of its own
_DEADLINE = itemgetter(slice(15, 30))  # of a record's header
_VIEW = b"v"[0]  # a record's kind: a screen_view (b"e": a session_end)
_NO_FLOOR = -(10**18)  # before any created ms a record holds (15 characters)


# "$<length>\r\n", the start of a bulk string's frame, by length: rows' lengths repeat.
_PREFIXES: dict[int, bytes] = {}


def _prefix(length: int) -> bytes:
    """The frame's start of a bulk string of `length` bytes (remembered, up to a few
    thousand lengths: formatting it is a good part of queuing a row)."""
    prefix = b"$%d\r\n" % length
    if len(_PREFIXES) < 8192:
        _PREFIXES[length] = prefix
    return prefix


def _session_args(session: str, size: int, deadline: int) -> bytes:
    """A session's three arguments to release_rewrite.lua, framed: its id, the length of
    its pack read, the earliest deadline of what stays."""
    member = session.encode()
    read = b"%d" % size
    due = b"%d" % deadline
    return b"$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        len(member), member, len(read), read, len(due), due
    )  # fmt: skip


def _as_is_end(own: bytes) -> bytes:
    """The end of the frame of a row queued as it is (with its own duration, if any)."""
    return _AS_IS if own == b"0" else b',"duration":%b}\r\n' % own


class _Plan:
    """What a release writes, decided session by session (release_held.lua's rules).

    The rows it queues are kept as the RPUSH's frames (`frames`: each row's length,
    its head, its duration and `}`), joined once into the write (worker/resp.py
    `Framed`): no row is put together before that.

    A view on its way is its created ms, its own duration as written (decimal) and
    its head (worker/stored_view.py).
    """

    def __init__(self, now_ms: int) -> None:
        self.now = now_ms
        # now as a header's deadline is written (15 digits), to compare with them; before
        # 1970 (never in use) one that no deadline is at or below
        self.now_text = b"%015d" % now_ms if now_ms >= 0 else b""
        self.frames: list[Any] = []
        self.rows = 0
        self.late = 0
        # per session some of whose records stay: its id, key, length read, the records
        # that stay (None when they are the whole pack: none went), their earliest deadline
        self.packs: list[tuple[str, str, int, bytes | None, int]] = []
        # per session whose every record goes: its id, key, length read (the pack goes)
        self.dropped: list[tuple[str, str, int]] = []
        self.views_set: list[Any] = []
        self.indexed: list[Any] = []
        self.views_ended: list[str] = []
        self.closed_set: list[Any] = []
        self.closed_index: list[Any] = []
        self.reopened: list[str] = []
        # profile field -> (created, header, own, head; head None for a session_end): the
        # profile's newest released event by created_at, then arrival, then batch order
        # (the first 44 bytes of the header)
        self.profiles: dict[bytes, tuple[int, bytes, bytes, bytes | None]] = {}
        self.profile_order: list[bytes] = []

    def sessions(
        self,
        connection: Any,
        sessions: Sequence[str],
        keys: Sequence[str],
        deadlines: Sequence[bytes | None],
        packs: Sequence[bytes | None],
        closed: Sequence[bytes | None],
        views: Sequence[bytes | None],
        forgotten: list[bytes],
    ) -> None:
        """Every session read, still due (`deadlines` from held-due): its pack, closed mark
        and stored view.

        The common case is decided here, with no call per session: a session not closed
        whose pack is current records in created order (one, most often), none created
        before 1970, some due, every one that goes a view but maybe the last, a
        session_end, and whose waiting view (if any) is of the current form and created
        no later than the first (none is late). The records up to the cut go (those
        created no later than the newest due one; all, most often: the pack goes,
        `dropped`; else the pack's tail stays): each view is queued with the gap to the
        next as its duration (the waiting view first), and the last waits; or, when a
        session_end goes last, the view waiting then goes as it is, then the session_end,
        and the session is closed.
        Every other session goes through `session`, the general rules (the same
        decisions, in every case).
        """
        now_ms = self.now
        now_text = self.now_text if len(self.now_text) == 15 else None
        gone = set(forgotten) if forgotten else None
        frames = self.frames
        prefixes = _PREFIXES
        views_set = self.views_set
        indexed = self.indexed
        dropped = self.dropped
        rows = 0
        for n, session in enumerate(sessions):
            deadline = deadlines[n]
            if deadline is None or float(deadline) > now_ms:
                continue  # released by another flush since it was listed
            pack = packs[n]
            mark = closed[n]
            if (
                now_text is not None
                and pack is not None
                and mark is None
                and pack[45:46] == FIELD_END
            ):
                fields = pack.split(FIELD_END)
                count = released = len(fields) >> 2
                dues: list[bytes] = []
                if count == 1:
                    fast = (
                        len(fields) == 5
                        and len(fields[0]) == HEADER
                        and not fields[4]
                        and fields[0][15:30] <= now_text
                    )
                else:  # current records (see `session`), in created order, none negative
                    headers = fields[0 : 4 * count : 4]
                    fast = (
                        len(fields) == 4 * count + 1
                        and not fields[-1]
                        and pack[:1] != b"-"
                        and sum(map(len, headers)) == HEADER * count
                        and headers == sorted(headers)
                    )
                    if fast:
                        dues = list(map(_DEADLINE, headers))
                        if max(dues) > now_text:  # the records up to the cut go (`session`)
                            last_due = count - 1
                            while last_due >= 0 and dues[last_due] > now_text:
                                last_due -= 1
                            if last_due < 0:
                                fast = False  # none due: the general rules
                            else:
                                released = bisect_left(
                                    headers, headers[last_due][:15] + b"\xff", last_due + 1
                                )
                        # every record released a view but the last, maybe a session_end
                        fast = fast and all(h[44] == _VIEW for h in headers[: released - 1])
                if fast:
                    # the last record released: a session_end closes the session
                    ends = fields[4 * released - 4][44] != _VIEW
                    chain = released - 1 if ends else released  # the views released
                    this = int(fields[0][:15])  # the first created (all are, in order)
                    view_created = -1  # of the view waiting when a session_end comes
                    stored = views[n]
                    if stored is not None:
                        parts = stored_view.current_fields(stored)
                        if parts is None:
                            fast = False  # another form: the general rules parse it
                        elif int(parts[0]) > this:
                            fast = False  # a late view: the general rules
                        else:
                            view_own = b"%d" % int(parts[1])  # as the general rules read it
                            view_head = parts[2]
                            if chain:
                                end = b',"duration":%d}\r\n' % (this - int(parts[0]))
                            else:  # closed at once: the waiting view goes as it is
                                end = _as_is_end(view_own)
                                view_created = int(parts[0])
                            size = len(view_head) + len(end) - 2
                            frames += (prefixes.get(size) or _prefix(size), view_head, end)
                            rows += 1
                if fast:  # each view queued with the gap to the next, the last waits
                    header, pfield, own, head = fields[0:4]
                    profiles: dict[bytes, tuple[int, bytes, bytes, bytes | None]] = {}
                    if chain:
                        if pfield:
                            profiles[pfield] = (this, header, own, head)
                        for at in range(4, 4 * chain, 4):
                            header, pfield, own, next_head = fields[at : at + 4]
                            created = int(header[:15])
                            end = b',"duration":%d}\r\n' % (created - this)
                            size = len(head) + len(end) - 2
                            frames += (prefixes.get(size) or _prefix(size), head, end)
                            rows += 1
                            this, head = created, next_head
                            if pfield:
                                profiles[pfield] = (this, header, own, head)
                        if ends:  # a session_end closes the session: the view waiting goes
                            end = _as_is_end(own)  # as it is
                            size = len(head) + len(end) - 2
                            frames += (prefixes.get(size) or _prefix(size), head, end)
                            rows += 1
                            view_created = this
                            header, pfield, own, head = fields[4 * chain : 4 * chain + 4]
                    if ends:
                        this = int(header[:15])
                        end = _as_is_end(own)
                        size = len(head) + len(end) - 2
                        frames += (prefixes.get(size) or _prefix(size), head, end)
                        rows += 1
                        if pfield:
                            profiles[pfield] = (this, header, own, None)
                        self.views_ended.append(session)
                        self.closed_set += (session, max(this, view_created, 0))
                        self.closed_index += (now_ms, session)
                    for pfield, event in profiles.items():
                        self._profile_event(pfield, *event)
                    if not ends:
                        views_set += (session, b"%d;%b;%b" % (this, own, head))
                        indexed += (now_ms, session)
                    if released == count:
                        dropped.append((session, keys[n], len(pack)))
                    else:  # what stays is the pack's tail
                        kept_start = sum(map(len, fields[: 4 * released])) + 4 * released
                        self._kept(session, keys[n], pack, kept_start, dues[released:])
                    continue
            else:
                fields = None  # not split yet
            if pack is None:
                pack = _missing_pack(connection, keys[n])
            closed_at = (
                int(float(mark))
                if mark is not None and (gone is None or session.encode() not in gone)
                else None
            )
            self.session(session, keys[n], pack, closed_at, views[n], fields)
        self.rows += rows

    def session(
        self,
        session: str,
        key: str,
        pack: bytes,
        closed: int | None,
        stored: bytes | None,
        split: list[bytes] | None = None,
    ) -> None:
        """One session's release by the general rules (`split`: its pack split already)."""
        size = len(pack)
        now = self.now
        # A pack of current records splits into their fields in one call (worker/held_pack.py):
        # every fourth field a header of HEADER bytes, and an empty field after the last.
        # An earlier record (no FIELD_END in it) would lengthen a header or that last field.
        fields = pack.split(FIELD_END) if split is None else split
        count = len(fields) // 4
        headers = fields[0 : 4 * count : 4]
        spans: list[tuple[int, int]] | None = None  # (start, stop) in the pack, pack order
        if fields[-1] == b"" and sum(map(len, headers)) == HEADER * count:
            pfields = fields[1::4]
            owns = fields[2::4]
            heads = fields[3::4]
            created: list[int] = []  # read below, for the records that go (the fast path)
            deadlines: list[int] | None = None  # read when not every record is due
            # Every record due: the greatest deadline, compared as its 15 characters (they
            # order as the numbers do, against a time not before 1970).
            dues = list(map(_DEADLINE, headers))
            all_due = max(dues, default=b"") <= self.now_text
        else:
            events = held_events(pack)
            count = len(events)
            headers = [e.order + e.kind for e in events]
            pfields = [e.profile_field for e in events]
            owns = [e.own_duration for e in events]
            heads = [e.head for e in events]
            created = [e.created_ms for e in events]
            deadlines = [e.deadline_ms for e in events]
            all_due = max(deadlines, default=now) <= now
            spans = [(e.start, e.stop) for e in events]
        order: list[int] | None = None  # pack positions in created order, when not the same
        if count > 1 and headers != sorted(headers):
            if spans is None:
                created = [int(header[:15]) for header in headers]
            order = sorted(range(count), key=lambda n: headers[n][:44])
            headers = [headers[n] for n in order]
            pfields = [pfields[n] for n in order]
            owns = [owns[n] for n in order]
            heads = [heads[n] for n in order]
            created = [created[n] for n in order]
            if deadlines is not None:
                deadlines = [deadlines[n] for n in order]
        released = count
        times: list[int] = []  # the deadlines, read when not every record is due
        if not all_due and order is None and spans is None and len(self.now_text) == 15 \
                and headers[0][:1] != b"-":  # fmt: skip
            # Pack order is created order and no created ms is negative: the headers order
            # as the numbers do, so the cut and what it releases are found on the headers'
            # bytes, and only the released records' created ms are read as numbers (the
            # general case below reads every record's created ms and deadline).
            now_text = self.now_text
            last_due = count - 1
            while last_due >= 0 and dues[last_due] > now_text:
                last_due -= 1
            if last_due < 0:
                return self._kept(session, key, pack, 0, dues)
            # Every record created no later than the newest due one (the last due, in
            # created order): the headers before the cut's created ms followed by 0xff.
            released = bisect_left(headers, headers[last_due][:15] + b"\xff", last_due + 1)
            if released < count:
                kept_start = sum(map(len, fields[: 4 * released])) + 4 * released
                self._kept(session, key, pack, kept_start, dues[released:])
                del headers[released:], pfields[released:], owns[released:], heads[released:]
            else:
                self.dropped.append((session, key, size))
            created = [int(header[:15]) for header in headers]
            self._rules(session, created, headers, pfields, owns, heads, closed, stored)
            return
        if spans is None and order is None:
            created = [int(header[:15]) for header in headers]
        if not all_due:
            times = deadlines if deadlines is not None else [int(h[15:30]) for h in headers]
            # The newest created among the records due is the cut: every record created no
            # later goes, the first `released` in created order (by bisection when none is
            # negative: then the headers' order is the numbers').
            cut = max([c for c, deadline in zip(created, times, strict=True) if deadline <= now],
                      default=None)  # fmt: skip
            if cut is None:
                released = 0
            elif created[0] >= 0:
                released = bisect_right(created, cut)
            else:
                released = sum(1 for c in created if c <= cut)
        if released == count:
            self.dropped.append((session, key, size))
        else:
            next_deadline = min(times[released:])
            if order is None and spans is None:
                # Pack order is created order: what stays is the pack's tail, from the end
                # of the released records' fields (each ended by FIELD_END).
                kept_start = sum(map(len, fields[: 4 * released])) + 4 * released
                self.packs.append((session, key, size, pack[kept_start:] if released else None,
                                   next_deadline))  # fmt: skip
            else:
                if spans is None:
                    spans = []
                    at = 0
                    for n in range(count):
                        stop = at + len(fields[4 * n]) + len(fields[4 * n + 1]) + \
                            len(fields[4 * n + 2]) + len(fields[4 * n + 3]) + 4  # fmt: skip
                        spans.append((at, stop))
                        at = stop
                if order is not None:
                    spans = [spans[n] for n in order]
                released_end = max((stop for _, stop in spans[:released]), default=0)
                kept_start = min(start for start, _ in spans[released:])
                if not released:
                    kept: bytes | None = None
                elif released_end <= kept_start:  # what stays is the pack's tail
                    kept = pack[kept_start:]
                else:
                    kept = b"".join([pack[start:stop] for start, stop in spans[released:]])
                self.packs.append((session, key, size, kept, next_deadline))
            if not released:
                return
            del headers[released:], pfields[released:], owns[released:], heads[released:]
            del created[released:]
        if released:
            self._rules(session, created, headers, pfields, owns, heads, closed, stored)

    def _kept(self, session: str, key: str, pack: bytes, start: int, kept: list[bytes]) -> None:
        """A pack whose records from `start` on stay (its tail, in created order; their
        deadlines as written, `kept`): the session is due at the earliest of them."""
        low = min(kept)
        deadline = int(low) if low[:1] != b"-" else min(map(int, kept))
        self.packs.append((session, key, len(pack), pack[start:] if start else None, deadline))

    def _rules(
        self, session: str, created: list[int], headers: list[bytes], pfields: list[bytes],
        owns: list[bytes], heads: list[bytes], closed: int | None, stored: bytes | None,
    ) -> None:  # fmt: skip
        # The session's waiting view: created, own duration, head (None: no view waits).
        view_head: bytes | None = None
        view_created = 0
        view_own = b"0"
        if stored is not None:
            # The current form, "<created>;<own>;<head>", split in one call; else parse.
            parts = stored_view.current_fields(stored)
            if parts is not None:
                view_created, view_head = int(parts[0]), parts[2]
                view_own = b"%d" % int(parts[1])
            else:
                view = stored_view.parse(stored)
                view_created, view_head = view.created_ms, view.head
                view_own = b"%d" % view.own_duration
        view_changed = closed_changed = False
        frames = self.frames
        prefixes = _PREFIXES
        rows = late_count = 0
        # Each profile's last event of the session, in the records' order: the newest by
        # created_at, arrival and batch order when no created_at is negative (they sort by
        # their 15 characters); with one that is, every event is compared.
        profiles: dict[bytes, tuple[int, bytes, bytes, bytes | None]] = {}
        each = created[0] < 0
        # An event created before `floor` is late: before the session_end that closed the
        # session, or before its waiting view (so a view's gap is never negative).
        floor = _NO_FLOOR if closed is None else closed
        if view_head is not None and view_created > floor:
            floor = view_created
        for this, header, pfield, own, head in zip(created, headers, pfields, owns, heads,
                                                   strict=True):  # fmt: skip
            if this < floor:
                late_count += 1
                if header[44] == _VIEW:  # queued as it is; its neighbours keep theirs
                    end = _as_is_end(own)
                    size = len(head) + len(end) - 2
                    frames += (prefixes.get(size) or _prefix(size), head, end)
                    rows += 1
                    continue
            elif closed is not None:
                closed, closed_changed = None, True  # an event after the session_end reopens it
            if header[44] == _VIEW:
                if view_head is not None:
                    end = b',"duration":%d}\r\n' % (this - view_created)
                    size = len(view_head) + len(end) - 2
                    frames += (prefixes.get(size) or _prefix(size), view_head, end)
                    rows += 1
                view_created, view_own, view_head = this, own, head
                floor = this
                view_changed = True
                if pfield:
                    profiles[pfield] = (this, header, own, head)
                    if each:
                        self._profile_event(pfield, *profiles.pop(pfield))
            else:
                # A session_end closes its session, late or not: the waiting view goes first.
                if view_head is not None:
                    end = _as_is_end(view_own)
                    size = len(view_head) + len(end) - 2
                    frames += (prefixes.get(size) or _prefix(size), view_head, end)
                    rows += 1
                end = _as_is_end(own)
                size = len(head) + len(end) - 2
                frames += (prefixes.get(size) or _prefix(size), head, end)
                rows += 1
                closed = max(
                    this, view_created if view_head is not None else 0,
                    closed if closed is not None else 0,
                )  # fmt: skip
                floor = closed
                closed_changed = True
                view_head = None
                view_changed = True
                if pfield:
                    profiles[pfield] = (this, header, own, None)
                    if each:
                        self._profile_event(pfield, *profiles.pop(pfield))
        self.rows += rows
        self.late += late_count
        for pfield, event in profiles.items():
            self._profile_event(pfield, *event)
        if view_changed:
            if view_head is not None:
                self.views_set += (session, b"%d;%b;%b" % (view_created, view_own, view_head))
                self.indexed += (self.now, session)
            else:
                self.views_ended.append(session)
        if closed_changed:
            if closed is not None:
                self.closed_set += (session, closed)
                self.closed_index += (self.now, session)
            else:
                self.reopened.append(session)

    def _profile_event(
        self, pfield: bytes, created: int, header: bytes, own: bytes, head: bytes | None
    ) -> None:
        # The header's first 44 bytes are the record's order key (created, deadline, tag):
        # sessions are released one after another, so a tie on created_at and arrival
        # between two sessions of one profile goes to the later one in its batch, not to
        # the session released last.
        known = self.profiles.get(pfield)
        if known is None:
            self.profile_order.append(pfield)
        elif created < known[0] or (created == known[0] and header[:44] < known[1][:44]):
            return
        self.profiles[pfield] = (created, header, own, head)

    def _rewrite(self, shard: ShardKeys) -> list[tuple[Any, ...] | Framed]:
        """What stays of each pack cut, written to a key of its own (one MSET: Lua is not
        handed these bytes, it would hash every one), then the call of release_rewrite.lua
        for every pack read, which puts them in place. The arguments are framed here, a
        session's in one formatting (short arguments cost several times as much framed one
        by one, by worker/resp.py or hiredis). The packs cut come first, then those nothing
        went from, then the packs released whole (`dropped`)."""
        cut = [(s, key, n, kept, due) for s, key, n, kept, due in self.packs if kept is not None]
        whole = [(s, key, n, due) for s, key, n, kept, due in self.packs if kept is None]
        start = len(shard.tag) + len(":held:")  # of the session's part of a pack's key
        kept_tag = shard.held_kept("")  # the keys' common start (escape("") is "")
        counts = (len(cut), len(whole))
        try:
            pairs: list[bytes] = []  # the MSET's keys and values
            keys: list[bytes] = []
            args = [b"$%d\r\n%d\r\n" % (len(b"%d" % n), n) for n in counts]
            for session, key, size, kept, deadline in cut:
                name = key.encode()
                other = (kept_tag + key[start:]).encode()
                framed = b"$%d\r\n%b\r\n" % (len(other), other)
                pairs += (framed, b"$%d\r\n" % len(kept), kept, b"\r\n")
                keys += (b"$%d\r\n%b\r\n" % (len(name), name), framed)
                args.append(_session_args(session, size, deadline))
            for session, key, size, deadline in whole:
                name = key.encode()
                keys.append(b"$%d\r\n%b\r\n" % (len(name), name))
                args.append(_session_args(session, size, deadline))
            for session, key, size in self.dropped:
                name = key.encode()
                keys.append(b"$%d\r\n%b\r\n" % (len(name), name))
                member = session.encode()
                read = b"%d" % size
                args.append(b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(member), member, len(read), read))
        except UnicodeEncodeError:  # a name hiredis frames its own way (or refuses)
            names: list[str] = []
            plain: list[Any] = [*counts]
            values: list[Any] = []
            for session, key, size, kept, deadline in cut:
                names += (key, kept_tag + key[start:])
                values += (kept_tag + key[start:], kept)
                plain += (session, size, deadline)
            for session, key, size, deadline in whole:
                names.append(key)
                plain += (session, size, deadline)
            for session, key, size in self.dropped:
                names.append(key)
                plain += (session, size)
            call = ("EVAL", _REWRITE, 1 + len(names), shard.held_due, *names, *plain)
            return [("MSET", *values), call] if values else [call]
        count = len(keys)
        framed_call = Framed(
            ("EVAL", _REWRITE, 1 + count, shard.held_due), count + len(counts) + 3 * len(self.packs)
            + 2 * len(self.dropped), keys + args,
        )  # fmt: skip
        if not cut:
            return [framed_call]
        return [Framed(("MSET",), 2 * len(cut), pairs), framed_call]

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
        if self.packs or self.dropped:
            out += self._rewrite(shard)
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
        profiles_ended: list[bytes] = []
        for pfield, value in zip(self.profile_order, profiles, strict=True):
            created, _header, own, head = self.profiles[pfield]
            if value is None or created >= stored_view.created_ms(value):
                if head is not None:
                    profiles_set += (pfield, b"%d;%b;%b" % (created, own, head))
                elif value is not None:
                    profiles_ended.append(pfield)
        if profiles_set:
            out.append(("HSET", shard.profile_views, *profiles_set))
        if profiles_ended:
            out.append(("HDEL", shard.profile_views, *profiles_ended))
        if profiles_set:
            out.append(("EXPIRE", shard.profile_views, views_ttl_s))
        return out
