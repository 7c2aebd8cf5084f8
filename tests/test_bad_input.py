"""Malformed input: a typed `InvalidEvent` naming the field, never a crash.

`parse_event` is the one validator (the producer, the ingest task and the
CLI replay all call it), so the cases are checked on it directly here; the
producer client: tests/test_bad_input_producer.py; the ingest path (task
arguments of any JSON shape, with a real Redis): tests/test_bad_input_ingest.py.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.support.bad_input import CLOCK, DAY, LIMITS, NOW, ev, nested
from tests.support.clock import ManualClock
from tests.support.dates import iso
from worker.events import (
    DEFAULT_LIMITS,
    MAX_PROPERTY_DEPTH,
    InvalidEvent,
    Limits,
    encode_event,
    parse_event,
)
from worker.settings import Settings, SettingsError


def rejected(payload: Any, limits: Limits = LIMITS) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as raised:
        parse_event(payload, limits)
    error = raised.value
    assert error.field and error.problem
    assert str(error) == f"{error.field}: {error.problem}"
    return error


# -- parse_event: one case per kind of bad input ------------------------------------


@pytest.mark.parametrize(
    ("payload", "field", "problem"),
    [
        # missing required fields, wrong types
        ({"name": "x", "created_at": NOW}, "project_id", "required"),
        (ev(project_id=["p"]), "project_id", "Expected `str`, got `array`"),
        (ev(name=None), "name", "Expected `str`, got `null`"),
        (ev(session_id=5), "session_id", "Expected `str`, got `int`"),
        (ev(created_at={"ms": 1}), "created_at", "got `object`"),
        (ev(properties=["a"]), "properties", "Expected `object`, got `array`"),
        (ev(duration="5"), "duration", "Expected `int`, got `str`"),
        (ev(duration=2**63), "duration", "<= 9223372036854775807"),
        (ev(latitude=True), "latitude", "Expected `float | null`, got `bool`"),
        # unparsable dates
        (ev(created_at="2026-13-45"), "created_at", "not an ISO-8601 date"),
        (ev(created_at=""), "created_at", "not an ISO-8601 date"),
        (ev(created_at="²³"), "created_at", "not an ISO-8601 date"),  # str.isdigit() is True
        (ev(created_at="0001-01-01T00:00:00+01:00"), "created_at", "not an ISO-8601"),
        (ev(imported_at="last week"), "imported_at", "not an ISO-8601 date"),
        (ev(imported_at=False), "imported_at", "got `bool`"),
        # dates absurdly far from now
        (ev(created_at=NOW + DAY + 1), "created_at", "too far in the future"),
        (ev(created_at=iso(NOW + 2 * DAY)), "created_at", "EVENT_BUFFER_MAX_FUTURE_S"),
        (ev(created_at="9999-12-31T23:59:59"), "created_at", "too far in the future"),
        (ev(created_at=10**30), "created_at", "too far in the future"),
        (ev(created_at=1e300), "created_at", "too far in the future"),
        (ev(created_at=0), "created_at", "too far in the past"),
        (ev(created_at=-(10**30)), "created_at", "too far in the past"),
        (ev(created_at=iso(NOW - 3660 * DAY)), "created_at", "EVENT_BUFFER_MAX_PAST_DAYS"),
        (ev(created_at="1"), "created_at", "too far in the past"),
        (ev(imported_at=NOW + 2 * DAY), "imported_at", "too far in the future"),
        (ev(imported_at="1999-12-31"), "imported_at", "too far in the past"),
        # non-string property keys (Python dicts from a producer)
        (ev(properties={1: "a"}), "properties", "keys must be strings, got int"),
        (ev(properties={(1, 2): "a"}), "properties", "keys must be strings"),
        (ev(properties={None: "a"}), "properties", "keys must be strings"),
        (ev(properties={"a": {2: "b"}}), "properties.a", "keys must be strings, got int"),
        (ev(properties={"a": [{(1,): "b"}]}), "properties.a.0", "keys must be strings"),
        ({1: "x", **ev()}, "$", "keys must be strings"),
        # values that cannot be stored
        (ev(longitude=180.5), "longitude", "from -180 to 180"),
        (ev(latitude=-1e300), "latitude", "from -90 to 90"),
        (ev(country="üü"), "country", "longer than 2 bytes"),  # FixedString(2)
        (ev(country="SWE"), "country", "length <= 2"),
        (ev(properties={"a": b"bytes"}), "properties.a", "unsupported type bytes"),
        (ev(properties={"a": {1.5}}), "properties.a", "unsupported type set"),
        (ev(properties={"a": 10**5000}), "properties.a", "integer too large"),
        # strings that are not UTF-8 (lone surrogates from Python)
        (ev(name="a\ud800b"), "name", "not valid UTF-8"),
        (ev(session_id="\udfff"), "session_id", "not valid UTF-8"),
        (ev(properties={"k": "v\udc80"}), "properties.k", "not valid UTF-8"),
        (ev(properties={"k\ud800": "v"}), "properties", "a key is not valid UTF-8"),
        (ev(properties={"a": {"b": ["\ud800"]}}), "properties.a.b.0", "not valid UTF-8"),
        # NaN and infinities
        (ev(created_at=math.nan), "created_at", "finite"),
        (ev(created_at=math.inf), "created_at", "finite"),
        (ev(imported_at=-math.inf), "imported_at", "finite"),
        (ev(longitude=math.nan), "longitude", "finite"),
        (ev(latitude=math.inf), "latitude", "finite"),
        (ev(properties={"a": math.nan}), "properties.a", "finite"),
        (ev(properties={"a": {"b": [1, -math.inf]}}), "properties.a.b.1", "finite"),
        # nesting
        (ev(properties=nested(MAX_PROPERTY_DEPTH + 1)), "properties.k.k.k.k.k.k.k.k.k", "deeper"),
        (ev(properties={"a": [[[[[[[[[1]]]]]]]]]}), "properties.a.0.0.0.0.0.0.0.0", "deeper"),
        # not an object at all
        ([ev()], "$", "must be an object, got list"),
        (None, "$", "must be an object, got NoneType"),
        (3.5, "$", "must be an object, got float"),
    ],
)
def test_bad_input_names_the_field(payload: Any, field: str, problem: str) -> None:
    error = rejected(payload)
    assert error.field == field
    assert problem in error.problem


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b'{"project_id":"p","name":"\xff","created_at":1772366400000}', "not valid UTF-8"),
        (b'{"project_id":"p","name":"\xc3\x28","created_at":1772366400000}', "not valid UTF-8"),
        (b'{"project_id":"p","name":"\\ud800","created_at":1772366400000}', "surrogate"),
        (b'{"project_id":"p","name":"x","created_at":NaN}', "NaN and Infinity"),
        (b'{"project_id":"p","name":"x","created_at":1,"latitude":Infinity}', "NaN and Infinity"),
        (b'{"project_id":"p","name":"x","created_at":1,"properties":{"a":-Infinity}}', "NaN"),
        (b'{"project_id":"p","name":"x","created_at":1772366400000', "truncated"),
        (b"", "truncated"),
        (b"[]", "Expected `object`"),
        ('{"project_id":"p","name":"\ud800","created_at":1772366400000}', "lone surrogate"),
        (memoryview(b'{"a":'), "truncated"),
    ],
)
def test_bad_json_bytes_and_text(raw: bytes | str | memoryview, problem: str) -> None:
    error = rejected(raw)
    assert error.field == "$"
    assert problem in error.problem


def test_numbers_json_cannot_hold_name_their_field() -> None:
    raw = b'{"project_id":"p","name":"x","created_at":1772366400000,"longitude":1e999}'
    assert rejected(raw).field == "longitude"
    raw = b'{"project_id":"p","name":"x","created_at":1772366400000,"properties":{"a":1e999}}'
    assert rejected(raw).field == "properties"


def test_dates_are_bounded_around_the_injected_clock() -> None:
    for ok in (NOW + DAY, NOW - 3650 * DAY, iso(NOW + DAY - 1), iso(NOW - 3649 * DAY)):
        parse_event(ev(created_at=ok, imported_at=ok), LIMITS)
    assert rejected(ev(created_at=NOW + DAY + 1)).field == "created_at"
    assert rejected(ev(created_at=NOW - 3650 * DAY - 1)).field == "created_at"
    # The bounds move with the clock: what is "far in the future" today is fine tomorrow.
    clock = ManualClock(NOW)
    limits = Limits(clock=clock)
    assert rejected(ev(created_at=NOW + 2 * DAY), limits).field == "created_at"
    clock.advance(DAY)
    assert parse_event(ev(created_at=NOW + 2 * DAY), limits).created_ms == NOW + 2 * DAY


def test_limits_come_from_the_settings() -> None:
    settings = Settings.from_env(
        {
            "EVENT_BUFFER_MAX_EVENT_BYTES": "1000",
            "EVENT_BUFFER_MAX_FUTURE_S": "60",
            "EVENT_BUFFER_MAX_PAST_DAYS": "1",
        }
    )
    limits = Limits.from_settings(settings, CLOCK)
    assert (limits.max_event_bytes, limits.max_future_ms, limits.max_past_ms) == (
        1000,
        60_000,
        DAY,
    )
    assert limits.clock is CLOCK
    parse_event(ev(created_at=NOW + 60_000), limits)
    assert "future" in rejected(ev(created_at=NOW + 60_001), limits).problem
    assert "past" in rejected(ev(created_at=NOW - DAY - 1), limits).problem
    assert rejected(ev(path="x" * 1000), limits).field == "path"
    # The defaults of parse_event are the settings' defaults.
    defaults = Settings()
    assert DEFAULT_LIMITS.max_event_bytes == defaults.max_event_bytes == 65536
    assert DEFAULT_LIMITS.max_future_ms == defaults.max_future_s * 1000 == DAY
    assert DEFAULT_LIMITS.max_past_ms == defaults.max_past_days * DAY == 3650 * DAY


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EVENT_BUFFER_MAX_EVENT_BYTES", "100"),
        ("EVENT_BUFFER_MAX_FUTURE_S", "-1"),
        ("EVENT_BUFFER_MAX_PAST_DAYS", "0"),
        ("EVENT_BUFFER_MAX_PAST_DAYS", "ten years"),
    ],
)
def test_malformed_limit_settings_are_refused(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_the_size_limit_is_measured_on_the_encoded_row() -> None:
    base = parse_event(ev(id=str(uuid.uuid4()), path=""), LIMITS)
    room = LIMITS.max_event_bytes - len(encode_event(base)) - len(',"path":""')
    exact = parse_event(ev(id=base.id, path="p" * room), LIMITS)
    assert len(encode_event(exact)) == LIMITS.max_event_bytes
    error = rejected(ev(id=base.id, path="p" * (room + 1)))
    assert error.field == "path"
    assert f"{LIMITS.max_event_bytes + 1} bytes" in error.problem
    assert "EVENT_BUFFER_MAX_EVENT_BYTES" in error.problem
    # JSON escaping counts: 6 bytes per control character once encoded.
    assert rejected(ev(properties={"k": "\x01" * 11_000})).field == "properties"
    # Many small properties add up too.
    many = {f"key{n}": "v" * 50 for n in range(2000)}
    assert rejected(ev(properties=many)).field == "properties"


def test_the_row_measured_is_the_row_stored() -> None:
    event = parse_event(ev(properties={"a": {"b": 1}}, path="/x"), LIMITS)
    row = encode_event(event)
    assert row is encode_event(event)  # encoded once, at validation
    assert row == msgspec.json.encode(event)
    changed = msgspec.structs.replace(event, path="/y")
    assert b'"path":"/y"' in encode_event(changed)


def test_huge_and_deep_input_is_refused_without_recursion_errors() -> None:
    deep: Any = "leaf"
    for _ in range(50_000):
        deep = [deep]
    assert rejected(ev(properties={"a": deep})).field.startswith("properties.a.0")
    assert rejected(ev(properties={"a": "x" * 5_000_000})).field == "properties"


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text()
        | st.binary(max_size=8)
        | st.tuples(st.integers()),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=4) | st.integers() | st.none(), inner, max_size=4)
        ),
        max_leaves=12,
    ),
    st.sampled_from(["properties", "created_at", "name", "imported_at", "latitude", "id"]),
)
def test_any_python_value_in_any_field_is_accepted_or_invalid(value: Any, field: str) -> None:
    for payload in (value, ev(**{field: value})):
        try:
            event = parse_event(payload, LIMITS)
        except InvalidEvent as exc:
            assert exc.field and exc.problem
        else:
            assert msgspec.json.decode(encode_event(event))["project_id"] == "p"


@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_any_bytes_or_text_is_accepted_or_invalid(raw: bytes | str) -> None:
    try:
        parse_event(raw, LIMITS)
    except InvalidEvent as exc:
        assert exc.field
