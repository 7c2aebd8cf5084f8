"""Property test: the stored view's two sides, Python (worker/stored_view.py) and Lua, agree.

A waiting view is stored as "<created ms>;<own duration>;<head>" (its row
without duration and closing brace); every row queued for it is built from
the head and a suffix. Python writes that form and reads it (the sweep, the
last-view getters, held rows); resolve_views.lua, release_held.lua and
sweep_sessions.lua read it in Redis. For random events (text full of the
separators and of `"duration":`, own durations, profiles), stored in the
current form and in the legacy "<created ms>|<own>|<row>" form an earlier
release left in Redis, every script's queued row must be byte for byte the
row Python builds, and decode to the event with the expected duration.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import pytest
import redis as redis_lib
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from tests.support.clock import ManualClock
from worker import stored_view
from worker.events import Event, Row, as_row, decode_row, encode_event, parse_event
from worker.held_pack import FIELD_END, HEADER, held_record_bytes
from worker.keys import ShardKeys
from worker.reorder import held_packs, held_record, held_rows
from worker.reorder_release import _Plan, release, release_in_redis
from worker.resp import read_replies, send_commands
from worker.scripts import Scripts, load_lua

KEYS = ShardKeys("eventbuffer", 0)
NOW = ManualClock().now_ms()
TRICKY = st.text(
    alphabet=st.sampled_from(["a", ";", "|", "}", "{", '"', "\\", ":", ",", "é", "😀", "1", " "]),
    max_size=12,
) | st.sampled_from(['"duration":5}', ";0;", "|0|{", ',"duration":0}'])


@st.composite
def events(draw: st.DrawFn, created_ms: int | None = None) -> Event:
    fields = {
        "name": "screen_view",
        "project_id": "p" + draw(TRICKY),
        "session_id": "s" + draw(TRICKY),
        "profile_id": draw(st.sampled_from(["", "u1", "u;|2"])),
        "path": draw(TRICKY),
        "properties": draw(st.dictionaries(TRICKY, TRICKY, max_size=3)),
        "created_at": NOW - draw(st.integers(0, 10**9)) if created_ms is None else created_ms,
        "duration": draw(st.sampled_from([0, 0, 1, 7, 12_345_678])),
        "sdk_name": draw(TRICKY),
    }
    return parse_event(fields)


def legacy(event: Row) -> bytes:
    """The form an earlier release stored: the row, with duration its last field."""
    row = encode_event(event)
    assert row.endswith(b"}") and (
        event.duration == 0 or row.endswith(b',"duration":%d}' % event.duration)
    )
    return b"%d|%d|%b" % (event.created_ms, event.duration, row)


def forms(event: Row) -> list[bytes]:
    return [stored_view.of_event(event), legacy(event)]


@pytest.fixture
def client(redis: redis_lib.Redis) -> Iterator[redis_lib.Redis]:
    yield redis


PROPERTY = hyp_settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY
@given(event=events(), gap=st.integers(-5_000, 10**7))
def test_python_builds_the_rows_of_both_forms(event: Event, gap: int) -> None:
    row = as_row(event)
    for value in forms(event):
        view = stored_view.parse(value)
        assert (view.created_ms, view.own_duration) == (event.created_ms, event.duration)
        assert stored_view.created_ms(value) == event.created_ms
        assert stored_view.row_of(value) == stored_view.as_is(view.head, event.duration)
        assert decode_row(stored_view.row_of(value)) == row, "as it is: its own row"
        timed = decode_row(stored_view.with_duration(view.head, max(0, gap)))
        assert timed == msgspec.structs.replace(row, duration=max(0, gap))


@PROPERTY
@given(event=events(), gap=st.integers(-5_000, 10**7), first_is_view=st.booleans())
def test_resolve_views_queues_what_python_builds(
    client: redis_lib.Redis, event: Event, gap: int, first_is_view: bool
) -> None:
    script = load_lua("resolve_views")
    for value in forms(event):
        client.flushall()
        client.hset(KEYS.views, event.session_id, value)
        first = str(event.created_ms + gap) if first_is_view else ""
        assert client.eval(script, 2, KEYS.queue, KEYS.views, event.session_id, first) == 1
        head = stored_view.parse(value).head
        expected = (
            stored_view.with_duration(head, max(0, gap))
            if first_is_view
            else stored_view.as_is(head, event.duration)
        )
        assert client.lrange(KEYS.queue, 0, -1) == [expected]


@PROPERTY
@given(event=events())
def test_sweep_queues_the_row_python_reads(client: redis_lib.Redis, event: Event) -> None:
    scripts = Scripts(client)
    pfield = KEYS.profile_field(event.project_id, event.profile_id) if event.profile_id else ""
    for value in forms(event):
        client.flushall()
        client.hset(KEYS.views, event.session_id, value)
        client.zadd(KEYS.sessions, {event.session_id: 1})
        if pfield:
            client.hset(KEYS.profile_views, pfield, value)
        assert scripts.sweep_sessions(KEYS, 10, [(event.session_id, pfield)]) == 1
        assert client.lrange(KEYS.queue, 0, -1) == [stored_view.row_of(value)]
        assert client.hlen(KEYS.profile_views) == 0


def legacy_record(created: int, deadline: int, tag: str, kind: str, pfield: str, row: Row) -> bytes:
    """A held record as an earlier release framed it (its stored view in the legacy form)."""
    record = b"%015d%015d%b%b%b|%b" % (
        created, deadline, tag.encode(), kind.encode(), pfield.encode(), legacy(row)
    )  # fmt: skip
    return b"%d:%b" % (len(record), record)


def framed_record(created: int, deadline: int, tag: str, kind: str, pfield: str, row: Row) -> bytes:
    """A held record as the version before the current record form wrote it: framed
    "<length>:<record>", the event in the current stored form (a rolling upgrade leaves
    them in packs, next to current records)."""
    record = b"%015d%015d%b%b%b|%b" % (
        created, deadline, tag.encode(), kind.encode(), pfield.encode(), stored_view.of_event(row)
    )  # fmt: skip
    return b"%d:%b" % (len(record), record)


def current_record(
    created: int, deadline: int, tag: str, kind: str, pfield: str, row: Row
) -> bytes:
    head = stored_view.head_of(row, encode_event(row))
    return held_record(created, deadline, tag, kind, pfield, row.duration, head)


RECORD_FORMS = [legacy_record, framed_record, current_record]


@PROPERTY
@given(
    stored=events(),
    data=st.data(),
    gap=st.integers(0, 10**6),
    record_form=st.sampled_from(RECORD_FORMS),
    then_end=st.booleans(),
)
def test_release_held_queues_what_python_builds(
    client: redis_lib.Redis,
    stored: Event,
    data: st.DataObject,
    gap: int,
    record_form: Any,
    then_end: bool,
) -> None:
    """A session waiting with a stored view (either form) gets a held view (any record form),
    maybe then a session_end: the rows queued and the view stored are Python's."""
    session = stored.session_id
    created = stored.created_ms + gap
    later = data.draw(events(created_ms=created))
    view = msgspec.structs.replace(as_row(later), session_id=session)
    end = msgspec.structs.replace(view, name="session_end", duration=0, id="end")
    pfield = KEYS.profile_field(view.project_id, view.profile_id) if view.profile_id else ""
    scripts = Scripts(client)
    for value in forms(stored):
        client.flushall()
        client.hset(KEYS.views, session, value)
        records = []
        for n, (kind, event) in enumerate([("v", view), ("e", end)][: 2 if then_end else 1]):
            tag = f"t{n:013d}"
            records.append(record_form(created, 5, tag, kind, pfield, event))
        client.set(KEYS.held(session), b"".join(records))
        client.zadd(KEYS.held_due, {session: 5})
        assert [decode_row(r) for r in held_rows(held_packs(client, KEYS)[session])] == (
            [view, end][: len(records)]
        )
        released = scripts.release_held(KEYS, [session], 10, 60, 60)
        head = stored_view.parse(value).head
        expected = [stored_view.with_duration(head, gap)]
        if then_end:
            for event in (view, end):
                own = stored_view.head_of(event, encode_event(event))
                expected.append(stored_view.as_is(own, event.duration))
            assert client.hget(KEYS.views, session) is None
        else:
            assert client.hget(KEYS.views, session) == stored_view.of_event(view)
            if pfield:
                assert client.hget(KEYS.profile_views, pfield) == stored_view.of_event(view)
        assert released.rows == len(expected)
        assert client.lrange(KEYS.queue, 0, -1) == expected


# -- the release decided in Python (worker/reorder_release.py) against release_held.lua --

SESSIONS = ["s1", "s;2", "s|3"]
PFIELDS = ["", "p:u1", "p:u2"]


@st.composite
def held_state(draw: st.DrawFn, sparse: bool = False) -> dict[str, object]:
    """Sessions with held events (some due, some not, in any order, of any record form,
    one pack mixing them), stored last views (either form), closed sessions (some past
    their memory). `sparse`: as real traffic leaves them, one or two records a pack,
    mostly a view of the current form, all due (the release's common case).

    Created times and deadlines are drawn from a few values and the sessions share
    profiles, so two sessions of one profile often hold events of equal created_at and
    arrival; the tags (a batch's order) are in any order across sessions, not in the
    order the sessions are released."""
    base = NOW - 10**6
    # Unique tags in random order: 8-character batch prefix, 6-digit place in its batch.
    tags = iter(draw(st.permutations(range(len(SESSIONS) * 5))))
    packs: dict[str, bytes] = {}
    views: dict[str, bytes] = {}
    profiles: dict[str, bytes] = {}
    closed: dict[str, int] = {}
    closed_at: dict[str, int] = {}
    for session in SESSIONS:
        records = []
        for _ in range(draw(st.integers(1, 2) if sparse else st.integers(0, 5))):
            kind = draw(st.sampled_from("vvvve" if sparse else "vve"))
            created = base + draw(st.integers(0, 6)) * 100
            deadline = draw(st.sampled_from([5, 10] if sparse else [5, 10, 20]))  # due at 10
            pfield = draw(st.sampled_from(PFIELDS))
            event = draw(events(created_ms=created))
            event = msgspec.structs.replace(
                as_row(event),
                session_id=session,
                name="screen_view" if kind == "v" else "session_end",
            )
            tag = f"{draw(st.sampled_from([0, 1])):08x}{next(tags):06d}"
            form = current_record if sparse and draw(st.booleans()) else \
                draw(st.sampled_from(RECORD_FORMS))  # fmt: skip
            records.append(form(created, deadline, tag, kind, pfield, event))
        if records:
            packs[session] = b"".join(records)
        if draw(st.booleans()):
            stored = as_row(draw(events(created_ms=base + draw(st.integers(0, 6)) * 100)))
            views[session] = draw(st.sampled_from(forms(stored)))
            pfield = draw(st.sampled_from(PFIELDS))
            if pfield:
                profiles[pfield] = views[session]
        if draw(st.booleans()):
            closed[session] = base + draw(st.integers(0, 6)) * 100
            closed_at[session] = draw(st.sampled_from([1, 50]))  # 1: past its memory
    return {
        "packs": packs,
        "views": views,
        "profiles": profiles,
        "closed": closed,
        "closed_at": closed_at,
        # the order the sessions are handed to the release
        "due": draw(st.permutations([session for session in SESSIONS if session in packs])),
    }


def load_state(client: redis_lib.Redis, state: dict[str, Any]) -> None:
    client.flushall()
    for session, pack in state["packs"].items():
        client.set(KEYS.held(session), pack)
        client.zadd(KEYS.held_due, {session: 5})
    if state["views"]:
        client.hset(KEYS.views, mapping=state["views"])
        client.zadd(KEYS.sessions, {session: 1 for session in state["views"]})
    if state["profiles"]:
        client.hset(KEYS.profile_views, mapping=state["profiles"])
    if state["closed"]:
        client.hset(KEYS.closed, mapping=state["closed"])
        client.zadd(KEYS.closed_at, state["closed_at"])


def snapshot(client: redis_lib.Redis, sessions: list[str] = SESSIONS) -> dict[str, object]:
    return {
        "queue": client.lrange(KEYS.queue, 0, -1),
        "views": client.hgetall(KEYS.views),
        "sessions": client.zrange(KEYS.sessions, 0, -1, withscores=True),
        "profiles": client.hgetall(KEYS.profile_views),
        "closed": client.hgetall(KEYS.closed),
        "closed_at": client.zrange(KEYS.closed_at, 0, -1, withscores=True),
        "due": client.zrange(KEYS.held_due, 0, -1, withscores=True),
        # A pack's order is not meaningful (records are sorted when read): its records.
        "packs": {s: sorted(held_record_bytes(client.get(KEYS.held(s)) or b"")) for s in sessions},
    }


@PROPERTY
@given(state=held_state() | held_state(sparse=True))
def test_the_release_decided_in_python_is_release_held_lua(
    client: redis_lib.Redis, state: dict[str, Any]
) -> None:
    due = list(state["due"])
    load_state(client, state)
    in_redis = release_in_redis(client, KEYS, due, 10, 60, 0)  # closed memory: until ms 10
    expected = snapshot(client)
    load_state(client, state)
    in_python = release(client, KEYS, due, 10, 60, 0)
    assert (in_python.rows, in_python.late) == (in_redis.rows, in_redis.late)
    assert snapshot(client) == expected
    # The order the sessions are released in decides only the order of the queue: a tie
    # between two sessions of one profile goes by created_at, arrival, then batch order.
    load_state(client, state)
    release(client, KEYS, due[::-1], 10, 60, 0)
    reversed_run = snapshot(client)
    assert sorted(reversed_run.pop("queue")) == sorted(expected.pop("queue"))
    assert reversed_run == expected


class _GeneralOnly(_Plan):
    """A plan whose general rules are not to be used (the fast path must decide)."""

    def session(self, *args: Any) -> None:
        raise AssertionError(f"the general rules ran for {args[0]!r}")


def test_a_pack_of_one_due_view_is_decided_without_the_general_rules(
    client: redis_lib.Redis,
) -> None:
    """A session not closed whose pack is current records, views, due, in created order
    (one, most often), and whose waiting view (if any) is of the current form and not
    newer: decided by `_Plan.sessions` itself, as the general rules and release_held.lua
    decide it: released whole (its pack goes) or, when some records are not due, up to
    the cut (the pack's tail stays). The others (an older form, a late view, a closed
    session, a session_end, no record due, records out of created order) take the
    general rules."""
    base = NOW - 10**6

    def at(created: int, name: str = "screen_view") -> Row:
        return as_row(parse_event({"name": name, "project_id": "p", "session_id": "x",
                                   "created_at": created, "duration": 7}))  # fmt: skip

    def record(created: int, deadline: int, tag: str, kind: str = "v", pfield: str = "") -> bytes:
        row = at(created, "screen_view" if kind == "v" else "session_end")
        return current_record(created, deadline, tag * 14, kind, pfield, row)

    view = at(base)
    fast = {f"f{n}": record(base + 100 * n, 5, str(n), "v", PFIELDS[n % 3]) for n in range(4)}
    # Several views in created order, all due (the same profile twice: its last counts).
    fast["f4"] = b"".join(record(base + 50 * n, 10, str(n + 4), "v", "p:u1") for n in range(3))
    fast["f5"] = record(base, 5, "7") + record(base + 100, 10, "8", "v", "p:u2")
    # Some records due: those created no later than the newest due one go, the tail stays.
    tails = {
        "f6": record(base + 400, 20, "j"),
        "f7": record(base + 700, 30, "m", "v", "p:u2") + record(base + 800, 40, "n"),
        "f8": record(base + 400, 20, "p", "e"),  # a session_end not due stays
        "f11": record(base + 400, 20, "u"),
    }
    fast["f6"] = record(base + 300, 5, "i", "v", "p:u1") + tails["f6"]
    fast["f7"] = record(base + 500, 20, "k") + record(base + 600, 5, "l", "v", "p:u1")
    fast["f7"] += tails["f7"]
    fast["f8"] = record(base + 300, 5, "o") + tails["f8"]
    # A session_end released last closes the session (the view waiting goes as it is).
    fast["f9"] = record(base + 300, 5, "q", "v", "p:u2") + record(base + 400, 5, "r", "e", "p:u2")
    fast["f10"] = record(base + 300, 5, "s", "e", "p:u1")
    fast["f11"] = record(base + 300, 5, "t", "e") + tails["f11"]
    fast["f12"] = b"".join(record(base + 50 * n, 10, str(n), "v") for n in range(3))
    fast["f12"] += record(base + 200, 10, "9", "e", "p:u1")
    stored = {f: stored_view.of_event(view) for f in ("f1", "f2", "f4", "f6", "f9", "f10")}
    other_packs = {
        "legacy-view": record(base + 200, 5, "a"),
        "late": record(base - 100, 5, "b"),
        "closed": record(base + 300, 5, "c"),
        "end-then-view": record(base + 300, 5, "d", "e", "p:u1") + record(base + 400, 5, "v"),
        "not-due": record(base + 300, 20, "e"),
        "two-unordered": record(base + 400, 5, "f") + record(base + 300, 10, "g"),
        "none-due": record(base + 300, 20, "i") + record(base + 400, 20, "j"),
        "end-late": record(base - 100, 5, "k", "e"),
        "framed": framed_record(base + 300, 5, "h" * 14, "v", "", at(base + 300)),
    }
    state: dict[str, Any] = {
        "packs": {**fast, **other_packs},
        "views": {
            **stored,
            "legacy-view": legacy(view),
            "late": stored_view.of_event(view),
            "end-late": stored_view.of_event(view),
        },
        "profiles": {"p:u1": stored_view.of_event(view)},
        "closed": {"closed": base},
        "closed_at": {"closed": 50},
        "due": [*fast, *other_packs],
    }
    sessions = list(fast)
    load_state(client, state)
    keys = [KEYS.held(session) for session in sessions]
    plan = _GeneralOnly(10)
    plan.sessions(None, sessions, keys, [b"5"] * len(sessions), client.mget(keys),
                  [None] * len(sessions), client.hmget(KEYS.views, sessions), [])  # fmt: skip
    whole = [s for s in sessions if s not in tails]
    assert plan.dropped == [(s, KEYS.held(s), len(fast[s])) for s in whole]
    deadlines = {"f6": 20, "f7": 30, "f8": 20, "f11": 20}
    assert plan.packs == [(s, KEYS.held(s), len(fast[s]), tails[s], due)
                          for s, due in deadlines.items()]  # fmt: skip
    # the waiting views of f1, f2, f4 and f6, two views of f4, one of f5 and one of f7;
    # closed: f9's waiting view, view and end, f10's waiting view and end, f11's end,
    # f12's three views and end
    assert plan.rows == 18
    assert plan.views_ended == ["f9", "f10", "f11", "f12"]
    for session in other_packs:
        load_state(client, state)
        key = KEYS.held(session)
        plan = _GeneralOnly(10)
        with pytest.raises(AssertionError, match="the general rules ran"):
            plan.sessions(None, [session], [key], [b"5"], [client.get(key)],
                          [client.hget(KEYS.closed, session)],
                          [client.hget(KEYS.views, session)], [])  # fmt: skip
    # All of them released together: as release_held.lua releases them.
    due = state["due"]
    load_state(client, state)
    in_redis = release_in_redis(client, KEYS, due, 10, 60, 60)
    expected = snapshot(client, list(state["packs"]))
    load_state(client, state)
    in_python = release(client, KEYS, due, 10, 60, 60)
    assert (in_python.rows, in_python.late) == (in_redis.rows, in_redis.late) == (24, 2)
    assert snapshot(client, list(state["packs"])) == expected
    assert [client.get(key) for key in keys] == [tails.get(s) for s in sessions]


@pytest.mark.parametrize("in_redis", [False, True], ids=["python", "lua"])
@pytest.mark.parametrize("due", [["s1", "s3"], ["s3", "s1"]])
def test_a_tie_between_two_sessions_of_one_profile_goes_to_the_later_in_its_batch(
    client: redis_lib.Redis, in_redis: bool, due: list[str]
) -> None:
    """Views of sessions s3 then s1 (one batch: same created_at and deadline), both of
    profile u1: u1's last view is s1's, in whichever order the sessions are released."""
    pfield = KEYS.profile_field("proj", "u1")
    client.flushall()
    tagged = {}
    for n, session in enumerate(["s3", "s1"]):
        view = as_row(parse_event({"name": "screen_view", "project_id": "proj",
                                   "session_id": session, "profile_id": "u1",
                                   "created_at": NOW}))  # fmt: skip
        head = stored_view.head_of(view, encode_event(view))
        client.set(
            KEYS.held(session), held_record(NOW, 5, f"cafe0123{n:06d}", "v", pfield, 0, head)
        )
        client.zadd(KEYS.held_due, {session: 5})
        tagged[session] = stored_view.of_event(view)
    released = (release_in_redis if in_redis else release)(client, KEYS, due, 10, 60, 60)
    assert (released.rows, released.late) == (0, 0)
    assert client.hget(KEYS.profile_views, pfield) == tagged["s1"]


def rewrite(
    client: redis_lib.Redis,
    cut: Sequence[tuple[str, int, bytes, int]] = (),
    unchanged: Sequence[tuple[str, int, int]] = (),
    dropped: Sequence[tuple[str, int]] = (),
) -> Any:
    """release_rewrite.lua's call (and the MSET before it) as a release makes them, in one
    MULTI/EXEC: packs cut (session, length read, what stays, its deadline), packs nothing
    went from (session, length read, deadline), packs released whole (session, length
    read). Returns the script's reply."""
    plan = _Plan(NOW)
    plan.packs = [(s, KEYS.held(s), read, kept, due) for s, read, kept, due in cut]
    plan.packs += [(s, KEYS.held(s), read, None, due) for s, read, due in unchanged]
    plan.packs.sort()  # interleaved: the call puts them in its order
    plan.dropped = [(s, KEYS.held(s), read) for s, read in dropped]
    commands = [("MULTI",), *plan._rewrite(KEYS), ("EXEC",)]
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        send_commands(connection, commands)
        results = read_replies(connection, len(commands))[-1]
    finally:
        pool.release(connection)
    assert not client.keys("*held-kept*")  # what stayed was put in place, or dropped
    return results[-1]


def test_records_appended_during_a_release_stay_held(client: redis_lib.Redis) -> None:
    """release_rewrite.lua keeps what an apply appended after the release read the pack,
    with its deadline, whatever the release kept (some records, none, all)."""
    view = as_row(parse_event({"name": "screen_view", "project_id": "p", "session_id": "s",
                               "created_at": NOW}))  # fmt: skip
    head = stored_view.head_of(view, encode_event(view))
    read = held_record(NOW, 5, "t" * 14, "v", "", 0, head)
    kept = held_record(NOW + 1, 30, "u" * 14, "v", "", 0, head)
    added = held_record(NOW + 2, 20, "w" * 14, "v", "", 0, head)
    for appended in (b"", added):
        client.flushall()
        client.set(KEYS.held("s"), read + kept)  # cut: `kept` stays
        client.set(KEYS.held("u"), kept)  # nothing went
        client.set(KEYS.held("w"), read)  # released whole
        client.zadd(KEYS.held_due, {"s": 5, "u": 5, "w": 5})
        for session in ("s", "u", "w"):
            client.append(KEYS.held(session), appended)  # after the release read the packs
        reply = rewrite(client, [("s", len(read + kept), kept, 30)], [("u", len(kept), 30)],
                        [("w", len(read))])  # fmt: skip
        assert reply == 3
        assert client.get(KEYS.held("s")) == kept + appended
        assert client.get(KEYS.held("u")) == kept + appended
        assert client.get(KEYS.held("w")) == (appended or None)
        due = 20.0 if appended else 30.0
        assert [client.zscore(KEYS.held_due, s) for s in "suw"] == [
            due, due, 20.0 if appended else None
        ]  # fmt: skip
    # A pack shorter than what was read (rewritten by someone else): left alone.
    client.flushall()
    client.set(KEYS.held("s"), kept)
    client.zadd(KEYS.held_due, {"s": 5})
    assert rewrite(client, [("s", len(read + kept), kept, 30)]) == 0
    assert client.get(KEYS.held("s")) == kept and client.zscore(KEYS.held_due, "s") == 5.0


def test_records_of_both_forms_appended_during_a_release_stay_held(
    client: redis_lib.Redis,
) -> None:
    """During a rolling upgrade the records appended meanwhile may be of either form:
    release_rewrite.lua reads the deadline of each (a pack released whole, or cut)."""
    view = as_row(parse_event({"name": "screen_view", "project_id": "p", "session_id": "s",
                               "created_at": NOW}))  # fmt: skip
    read = current_record(NOW, 5, "t" * 14, "v", "", view)
    kept = current_record(NOW + 1, 40, "k" * 14, "v", "", view)
    added = [
        framed_record(NOW + 1, 30, "u" * 14, "v", "p:u1", view),
        current_record(NOW + 2, 20, "w" * 14, "v", "", view),
        legacy_record(NOW + 3, 15, "x" * 14, "v", "", view),
        current_record(NOW + 4, 25, "y" * 14, "e", "p:u1", view),
    ]
    # the current form (byte 45 ends the header), and two an earlier version framed
    assert [r[HEADER : HEADER + 1] == FIELD_END for r in added] == [False, True, False, True]
    for n in range(1, len(added) + 1):
        for stays in (b"", kept):
            client.flushall()
            client.set(KEYS.held("s"), read + stays)
            for record in added[:n]:
                client.append(KEYS.held("s"), record)  # after the release read the pack
            if stays:
                assert rewrite(client, [("s", len(read + stays), stays, 40)]) == 1
            else:
                assert rewrite(client, dropped=[("s", len(read))]) == 1
            assert client.get(KEYS.held("s")) == stays + b"".join(added[:n])
            assert client.zscore(KEYS.held_due, "s") == [30.0, 20.0, 15.0, 15.0][n - 1]


def test_what_stays_of_a_pack_never_passes_through_lua(client: redis_lib.Redis) -> None:
    """A release writes what stays of each pack cut with MSET and release_rewrite.lua puts
    it in place with RENAME: the script reads no pack (GETRANGE) unless an apply appended
    to it meanwhile (Lua hashes every byte of every string it holds)."""
    views = [
        as_row(parse_event({"name": "screen_view", "project_id": "p", "session_id": "s",
                            "created_at": NOW + n, "path": "x" * 500}))
        for n in range(3)
    ]  # fmt: skip
    records = [
        current_record(NOW + n, 5 if n == 0 else 50, f"{n:014d}", "v", "", view)
        for n, view in enumerate(views)
    ]
    pack = b"".join(records)
    sessions = [f"s{n}" for n in range(5)]
    for session in sessions:
        client.set(KEYS.held(session), pack)
        client.zadd(KEYS.held_due, {session: 5})
    client.config_resetstat()
    released = release(client, KEYS, sessions, 10, 60, 60)
    assert (released.rows, released.late) == (0, 0)  # the first view of each waits
    stats = client.info("commandstats")
    assert "cmdstat_getrange" not in stats and "cmdstat_set" not in stats
    assert stats["cmdstat_rename"]["calls"] == 5
    tail = b"".join(records[1:])
    assert [client.get(KEYS.held(session)) for session in sessions] == [tail] * 5
    assert client.zrange(KEYS.held_due, 0, -1, withscores=True) == [
        (s.encode(), 50.0) for s in sessions
    ]
    assert not client.keys("*held-kept*")
