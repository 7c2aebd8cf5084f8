"""The event model: pure validation and normalization, no servers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.clock import ManualClock
from tests.support.dates import BASE_MS, DAY
from worker.events import (
    DEFAULT_LIMITS,
    KIND_REGULAR,
    KIND_SCREEN_VIEW,
    KIND_SESSION_END,
    Event,
    InvalidEvent,
    Limits,
    _canonical_date,
    _epoch_date,
    decode_row,
    encode_event,
    flatten_properties,
    parse_datetime,
    parse_event,
    parse_events,
)
from worker.events.problems import invalid

BASE = {"project_id": "p", "name": "x", "created_at": f"{DAY}T00:00:00Z"}


def with_(**fields: Any) -> dict[str, Any]:
    return {**BASE, **fields}


@pytest.mark.parametrize(
    ("created_at", "stored"),
    [
        (f"{DAY}T10:00:00.5+02:00", f"{DAY} 08:00:00.500"),
        (f"{DAY}T10:00:00Z", f"{DAY} 10:00:00.000"),
        (f"{DAY} 10:00:00.123456", f"{DAY} 10:00:00.123"),
        (f"{DAY}T10:00:00", f"{DAY} 10:00:00.000"),
        (BASE_MS + 36_000_123, f"{DAY} 10:00:00.123"),
        (str(BASE_MS + 36_000_123), f"{DAY} 10:00:00.123"),
    ],
)
def test_created_at_is_stored_in_utc_with_milliseconds(created_at: Any, stored: str) -> None:
    event = parse_event(with_(created_at=created_at))
    assert event.created_at == stored


def test_an_id_is_assigned_once_and_kept() -> None:
    event = parse_event(dict(BASE))
    assert uuid.UUID(event.id)
    assert decode_row(encode_event(event)).id == event.id
    given = str(uuid.uuid4())
    assert parse_event(with_(id=given.upper())).id == given


@pytest.mark.parametrize(
    ("payload", "field", "problem"),
    [
        ({"name": "x", "created_at": 1}, "project_id", "required"),
        ({"project_id": "p", "created_at": 1}, "name", "required"),
        ({"project_id": "p", "name": "x"}, "created_at", "required"),
        (with_(name=""), "name", "length >= 1"),
        (with_(project_id=5), "project_id", "Expected `str`"),
        (with_(created_at="yesterday"), "created_at", "ISO-8601"),
        (with_(created_at=True), "created_at", "got `bool`"),
        (with_(id="not-a-uuid"), "id", "UUID"),
        (with_(country="SWE"), "country", "length <= 2"),
        (with_(duration=-5), "duration", ">= 0"),
        (with_(properties={"a": float("inf")}), "properties.a", "finite"),
        (with_(properties="flat"), "properties", "Expected `object`"),
        (with_(longitude="east"), "longitude", "Expected `float | null`"),
    ],
)
def test_invalid_events_name_the_field(payload: Any, field: str, problem: str) -> None:
    with pytest.raises(InvalidEvent) as raised:
        parse_event(payload)
    assert raised.value.field == field
    assert problem in raised.value.problem


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"name": "x", "created_at": 1}, "project_id"),
        (with_(session_id=5), "session_id"),
        (with_(name=""), "name"),
        (with_(properties={1: "a"}), "properties"),
        (with_(properties=["a"]), "properties"),
        (with_(longitude=500.0), "longitude"),
        ({1: "x", **BASE}, "$"),
        (b'{"project_id":"p","name":"x","created_at":1,"duration":"5"}', "duration"),
        (b'{"project_id":"p","created_at":1}', "name"),
        (b'{"project_id":"p","name":"x","created_at":1,"properties":{"a":1e999}}', "properties"),
        (b"[1, 2]", "$"),
    ],
)
def test_field_names_do_not_depend_on_the_wording_of_msgspec(payload: Any, field: str) -> None:
    """The field comes from the input, not from msgspec's message: a release that words
    its messages otherwise names the same fields."""
    with pytest.raises(InvalidEvent) as raised:
        parse_event(payload)
    assert raised.value.field == field
    reworded = msgspec.ValidationError("a message in words no msgspec release has used")
    assert invalid(payload, Event, reworded).field == field


def test_non_objects_and_bad_json_are_rejected() -> None:
    for payload in ([1, 2], "plain", b"{nope", None):
        with pytest.raises(InvalidEvent) as raised:
            parse_event(payload)
        assert raised.value.field == "$"


def test_properties_flatten_to_strings_like_openpanel_to_dots() -> None:
    event = parse_event(
        with_(properties={"a": 1, "b": {"c": True, "d": [None, 2.5]}, "skip": None, "s": "t"})
    )
    assert event.properties == {"a": "1", "b.c": "true", "b.d.1": "2.5", "s": "t"}


def test_too_deep_properties_are_rejected() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(12):
        node["k"] = {}
        node = node["k"]
    with pytest.raises(InvalidEvent) as raised:
        parse_event(with_(properties=deep))
    assert raised.value.field.startswith("properties.k.k")


def test_kind_needs_a_session() -> None:
    assert parse_event(with_(name="screen_view", session_id="s")).kind == KIND_SCREEN_VIEW
    assert parse_event(with_(name="session_end", session_id="s")).kind == KIND_SESSION_END
    assert parse_event(with_(name="screen_view")).kind == KIND_REGULAR
    assert parse_event(with_(name="session_end")).kind == KIND_REGULAR


def test_json_row_omits_defaults_and_ends_with_duration() -> None:
    row = encode_event(parse_event(with_(duration=12, path="/a")))
    assert row.endswith(b',"duration":12}')
    assert b'"city"' not in row
    assert not encode_event(parse_event(dict(BASE))).endswith(b"}}")


def test_created_ms() -> None:
    assert parse_event(with_(created_at=1767261600123)).created_ms == 1767261600123


# -- the fast paths give what the general path gives ------------------------------------

INSTANTS = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9998, 12, 31)).map(
    lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000, tzinfo=UTC)
)


def general(text: str) -> tuple[str, int]:
    parsed = parse_datetime("created_at", text)
    ms = (parsed - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    return parsed.isoformat(" ", "milliseconds")[:23], ms


@given(INSTANTS, st.booleans())
def test_canonical_dates_take_the_fast_path_to_the_same_result(
    instant: datetime, with_millis: bool
) -> None:
    text = instant.strftime("%Y-%m-%dT%H:%M:%S") + (
        f".{instant.microsecond // 1000:03d}Z" if with_millis else "Z"
    )
    if not with_millis:
        instant = instant.replace(microsecond=0)
    assert _canonical_date(text) == general(text)
    stored, ms = general(text)
    assert _epoch_date(ms) == stored
    assert _canonical_date(stored) == general(stored) == (stored, ms)  # the stored form too


@pytest.mark.parametrize(
    "text",
    [
        "2026-02-30T10:00:00.000Z",  # no such day
        "2026-13-01T10:00:00.000Z",
        f"{DAY}T24:00:00.000Z",
        f"{DAY}T10:60:00.000Z",
        f"{DAY}T10:00:60.000Z",
        f"{DAY}T10:00:00.0a0Z",
        f"{DAY}T1\uff10:00:00.000Z",  # a non-ASCII digit (fullwidth zero)
        f"{DAY}T10:00:00.000+00:00",  # not the canonical form: the general path
        "2026-1a-07T10:00:00.000Z",
        "0000-01-01T00:00:00.000Z",  # no year 0
        "+026-11-07T10:00:00.000Z",
        "2026-W49-1T10:00:00.000Z",
        f"{DAY}T10:00:0a.000Z",
        f"{DAY}T10:00:0\uff10Z",
        f"{DAY}T-1:00:00.000Z",
        f"{DAY} 10:00:00.+00",
    ],
)
def test_anything_else_leaves_the_fast_path(text: str) -> None:
    assert _canonical_date(text) is None


CANONICAL_FORMS = ["2026-11-07T10:00:00.000Z", "2026-11-07 10:00:00.000", "2026-11-07T10:00:00Z"]
EDITS = st.tuples(st.integers(0, 23), st.sampled_from("0123456789 -:.TZ+a\uff10"))


@given(st.sampled_from(CANONICAL_FORMS), st.lists(EDITS, max_size=4))
def test_the_fast_path_says_what_the_general_path_says_or_leaves_it(
    template: str, edits: list[tuple[int, str]]
) -> None:
    """A canonical form with characters changed: the fast path gives the general path's
    result, or leaves the text to it."""
    chars = list(template)
    for at, char in edits:
        chars[at % len(chars)] = char
    text = "".join(chars)
    fast = _canonical_date(text)
    if fast is not None:
        assert fast == general(text)


def test_flat_properties_are_kept_and_nested_ones_flattened() -> None:
    flat = {"a": "1", "b": "2"}
    assert flatten_properties(flat) is flat
    assert flatten_properties({"a": "1", "n": 2, "o": {"p": None, "q": True}}) == {
        "a": "1",
        "n": "2",
        "o.q": "true",
    }


def test_a_batch_decoded_whole_judges_each_event_as_parse_event_does() -> None:
    """`parse_events` (one decode for the batch) gives each item what `parse_event` gives
    it alone: the same row, or the same field and problem; ids from the position."""
    fixed = str(uuid.uuid4())
    batch = [
        with_(),
        with_(id=fixed.upper(), properties={"a": {"b": [1, None, "x"]}, "c": "d"}),
        with_(created_at="2026-13-45"),
        with_(created_at=0),
        with_(country="üü"),
        with_(id="not-a-uuid"),
        with_(properties={"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": "j"}}}}}}}}}),
        with_(properties={"k": "v" * 2_000_000}),
        with_(name="x\ud800"),
    ]
    ids = [str(uuid.UUID(int=n)) for n in range(len(batch))]
    limits = Limits(clock=ManualClock(BASE_MS))
    for sent in (batch, msgspec.json.encode(batch[:-1])):
        results = parse_events(sent, limits, ids.__getitem__)
        assert results is not None
        items = sent if isinstance(sent, list) else msgspec.json.decode(sent)
        assert len(results) == len(items)
        for n, (item, result) in enumerate(zip(items, results, strict=True)):
            try:
                alone: Any = parse_event(item, limits, lambda n=n: ids[n])
            except InvalidEvent as exc:
                alone = exc
            if isinstance(alone, InvalidEvent):
                assert isinstance(result, InvalidEvent)
                assert (result.field, result.problem) == (alone.field, alone.problem)
            else:
                assert not isinstance(result, InvalidEvent)
                assert encode_event(result) == encode_event(alone)
    # Not a list of events (an item of the wrong type, not an object): item by item.
    assert parse_events([with_(), with_(name=5)], DEFAULT_LIMITS) is None
    assert parse_events(b'[{"name": "x"}, 5]', DEFAULT_LIMITS) is None


def test_an_iso_week_date_is_stored_as_a_calendar_date() -> None:
    """`2026-W49-1T10:00:00Z` has the length and separators of the common form: the fast
    path once stored it as sent, a text ClickHouse cannot read as a DateTime64."""
    year, week, weekday = datetime.fromisoformat(DAY).isocalendar()
    for sent in (
        f"{year}-W{week:02d}-{weekday}T10:00:00Z",
        f"{year}-W{week:02d}-{weekday}T10:00:00.000Z",
    ):
        assert parse_event(with_(created_at=sent)).created_at == f"{DAY} 10:00:00.000"
