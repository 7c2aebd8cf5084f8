"""Fuzzing the ingest task: arbitrary JSON and corrupted events never crash it.

Hypothesis builds task payloads from mostly valid events, events with one
random corruption, and arbitrary JSON, and the real Celery task body
(`tasks.ingest.ingest_events`, run in-process) applies them to a real Redis,
after the JSON round trip a worker's arguments go through. For every
payload:

- the task succeeds (bad data never raises, so it can never crash-loop),
- every valid event is in the buffer exactly once (queued, or waiting as its
  session's last screen_view), and nothing else is,
- every invalid item is one dead letter, in order, with a reason, the field
  and the error,
- the counts add up, and a redelivery of the same task changes nothing.

The validity oracle is `parse_event` with the same limits; events that were
generated valid must be judged valid by it.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import redis as redis_lib
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from kombu.utils import json as kombu_json

from worker import runtime
from worker.buffer import EventBuffer
from worker.deadletters import REASON_INVALID_EVENT, decode_dead_letter
from worker.events import InvalidEvent, Limits, parse_event
from worker.keys import Keyspace
from worker.reorder import held_packs, held_rows
from worker.settings import Settings

NOW_MS = int(time.time() * 1000)
HOUR = 3_600_000
DAY = 24 * HOUR
ID = "<fresh id>"  # replaced by a new UUID in each example: ids are unique per payload

STRING_FIELDS = [
    "device_id", "profile_id", "session_id", "path", "origin", "referrer", "referrer_name",
    "referrer_type", "city", "region", "os", "os_version", "browser", "browser_version",
    "device", "brand", "model", "sdk_name", "sdk_version",
]  # fmt: skip
ALL_FIELDS = [
    "id", "name", "project_id", "created_at", "imported_at", "properties", "country",
    "duration", "longitude", "latitude", *STRING_FIELDS, "unknown_field",
]  # fmt: skip

surrogates = st.sampled_from(["\ud800", "a\udfffb", "\udc80\udc81"])
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | surrogates
)
any_json = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
# Property values a valid event may carry: finite, shallow, UTF-8.
safe_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
safe_properties = st.dictionaries(
    st.text(max_size=8),
    st.recursive(
        safe_leaves,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=6,
    ),
    max_size=5,
)


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    created = NOW_MS + draw(st.integers(min_value=-12 * HOUR, max_value=12 * HOUR))
    event: dict[str, Any] = {
        "id": ID,
        "project_id": draw(st.sampled_from(["shop", "blog", "p:{1}", "p q"])),
        "name": draw(st.sampled_from(["screen_view", "screen_view", "session_end", "click"])),
        "created_at": draw(
            st.sampled_from(
                [
                    created,
                    str(created),
                    time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created / 1000)) + "Z",
                ]
            )
        ),
    }
    if draw(st.booleans()):
        event["session_id"] = draw(st.sampled_from(["s1", "s2", "s:{3}", "s 4\n"]))
    if draw(st.booleans()):
        event["profile_id"] = draw(st.sampled_from(["u1", "u2", "u*?[3]"]))
    if draw(st.booleans()):
        event["properties"] = draw(safe_properties)
    for name in draw(st.lists(st.sampled_from(STRING_FIELDS), max_size=3)):
        event[name] = draw(st.text(max_size=20))
    if draw(st.booleans()):
        event["duration"] = draw(st.integers(min_value=0, max_value=10**9))
        event["country"] = draw(st.sampled_from(["", "SE", "de", "ü"]))
        event["latitude"] = draw(st.floats(min_value=-90, max_value=90))
        event["longitude"] = draw(st.none() | st.floats(min_value=-180, max_value=180))
        event["imported_at"] = NOW_MS - draw(st.integers(min_value=0, max_value=DAY))
    return event


def _set(event: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    return {**event, name: value}


@st.composite
def corrupted_events(draw: st.DrawFn) -> dict[str, Any] | Any:
    event = draw(valid_events())
    kind = draw(st.integers(min_value=0, max_value=11))
    if kind == 0:  # a required field missing
        del event[draw(st.sampled_from(["project_id", "name", "created_at"]))]
        return event
    if kind == 1:  # any field, any JSON value (may stay valid: the oracle decides)
        return _set(event, draw(st.sampled_from(ALL_FIELDS)), draw(any_json))
    if kind == 2:  # dates absurdly far from now
        far = draw(st.integers(min_value=2 * DAY, max_value=200 * 365 * DAY))
        value = NOW_MS + far * draw(st.sampled_from([1, -1]))
        return _set(event, draw(st.sampled_from(["created_at", "imported_at"])), value)
    if kind == 3:  # NaN and infinities
        bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        where = draw(st.sampled_from(["properties", "latitude", "longitude", "created_at"]))
        return _set(event, where, {"deep": {"x": [1, bad]}} if where == "properties" else bad)
    if kind == 4:  # strings that are not UTF-8
        if draw(st.booleans()):
            return _set(event, "properties", {draw(surrogates): "v"})
        return _set(event, draw(st.sampled_from(["name", *STRING_FIELDS])), draw(surrogates))
    if kind == 5:  # oversized
        return _set(event, draw(st.sampled_from(["path", "properties"])), {"b": "x" * 70_000})
    if kind == 6:  # nested too deep
        node: Any = 1
        for _ in range(draw(st.integers(min_value=9, max_value=40))):
            node = {"k": node} if draw(st.booleans()) else [node]
        return _set(event, "properties", {"a": node})
    if kind == 7:  # not an object
        return draw(st.sampled_from([[event], kombu_json.dumps(event), None, 0]))
    if kind == 8:
        return _set(event, "id", draw(st.sampled_from(["not-a-uuid", "", "123", "{}"])))
    if kind == 9:
        return _set(event, draw(st.sampled_from(["duration", "country", "project_id"])), -1)
    if kind == 10:
        return _set(event, "created_at", draw(st.sampled_from(["", "yesterday", "2026-02-30"])))
    return _set(event, "properties", draw(st.lists(safe_leaves, max_size=3)))


items = st.one_of(
    valid_events().map(lambda e: ("valid", e)),
    valid_events().map(lambda e: ("valid", e)),
    corrupted_events().map(lambda e: ("corrupted", e)),
    any_json.map(lambda j: ("json", j)),
)


@st.composite
def payloads(draw: st.DrawFn) -> tuple[str, list[tuple[str, Any]]]:
    """Mostly a list of items (a task's batch), sometimes one bare item."""
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        return "bare", [draw(items)]
    size = draw(st.integers(min_value=0, max_value=40))
    return "list", [draw(items) for _ in range(size)]


def fresh_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: str(uuid.uuid4()) if v == ID else v for k, v in value.items()}
    if isinstance(value, list):
        return [fresh_ids(v) for v in value]
    return value


@pytest.fixture
def fuzz_settings(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = Settings.from_env(
        {
            "REDIS_URL": redis_url,
            "CLICKHOUSE_URL": f"chdb://{tmp_path_factory.mktemp('fuzz')}/ch",
            "EVENT_BUFFER_SHARDS": "3",
        }
    )
    runtime.configure(settings)
    yield settings
    runtime.reset()


def buffer_ids(client: redis_lib.Redis, settings: Settings) -> Counter[str]:
    """Ids of every event in the buffer: queued rows, sessions' last views, and events
    held by the reorder window."""
    buffer = EventBuffer(client, settings)
    ids: Counter[str] = Counter()
    for shard in buffer.keyspace.all():
        for row in client.lrange(shard.queue, 0, -1):
            ids[msgspec.json.decode(row)["id"]] += 1
        for session in client.zrange(shard.sessions, 0, -1):
            view = buffer.get_last_screen_view(session_id=session.decode())
            assert view is not None
            ids[view.id] += 1
        for pack in held_packs(client, shard).values():
            for row in held_rows(pack):
                ids[msgspec.json.decode(row)["id"]] += 1
    return ids


def dead_letters(client: redis_lib.Redis, keyspace: Keyspace) -> list[Any]:
    return [
        decode_dead_letter(entry)[0]
        for shard in keyspace.all()
        for entry in client.lrange(shard.dead, 0, -1)
    ]


@hsettings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(generated=payloads())
def test_the_ingest_task_survives_any_payload(
    fuzz_settings: Settings, redis: redis_lib.Redis, generated: tuple[str, list[tuple[str, Any]]]
) -> None:
    from tasks.ingest import ingest_events

    redis.flushall()
    shape, pairs = generated
    pairs = [(origin, fresh_ids(item)) for origin, item in pairs]
    sent: Any = [item for _, item in pairs] if shape == "list" else pairs[0][1]
    # What a worker receives: the arguments after the broker's JSON round trip.
    payload = kombu_json.loads(kombu_json.dumps(sent))
    items = payload if isinstance(payload, list) else [payload]
    origins = [origin for origin, _ in pairs] if shape == "list" else ["bare"] * len(items)

    limits = Limits.from_settings(fuzz_settings)
    expected_ids: list[str | None] = []  # per valid item: its id (None: assigned by ingest)
    invalid_fields: list[str] = []
    for origin, item in zip(origins, items, strict=True):
        try:
            if not isinstance(item, dict):
                raise InvalidEvent("$", "not an object")
            parse_event(item, limits)
        except InvalidEvent as exc:
            assert origin != "valid", f"a generated valid event was refused: {exc}"
            invalid_fields.append(exc.field)
        else:
            given_id = item.get("id")
            expected_ids.append(str(uuid.UUID(given_id)) if given_id else None)

    event(f"payload: {shape}")
    event(f"valid events: {min(len(expected_ids), 10)}{'+' if len(expected_ids) >= 10 else ''}")
    event(f"invalid items: {min(len(invalid_fields), 5)}{'+' if len(invalid_fields) >= 5 else ''}")
    for field in set(invalid_fields):
        event(f"invalid field: {field.split('.')[0]}")

    task_id = str(uuid.uuid4())
    result = ingest_events.apply(args=[payload], task_id=task_id)
    assert result.successful(), result.traceback
    summary = result.get()
    assert summary["accepted"] == len(expected_ids)
    assert summary["invalid"] == len(invalid_fields)
    assert summary["accepted"] + summary["invalid"] == len(items)
    assert summary["appended"] <= summary["accepted"]

    keyspace = Keyspace(fuzz_settings.key_prefix, fuzz_settings.shards)
    in_buffer = buffer_ids(redis, fuzz_settings)
    assert sum(in_buffer.values()) == len(expected_ids)
    assert all(count == 1 for count in in_buffer.values())
    known = [i for i in expected_ids if i is not None]
    assert set(known) <= set(in_buffer)

    letters = dead_letters(redis, keyspace)
    assert [letter.field for letter in letters] == invalid_fields
    for letter in letters:
        assert letter.reason == REASON_INVALID_EVENT and letter.source == "ingest"
        assert letter.error and letter.field and letter.claim == task_id

    # A redelivery (same task id) is skipped, dead letters included.
    again = ingest_events.apply(args=[payload], task_id=task_id)
    assert again.successful(), again.traceback
    if items:
        assert again.get()["duplicate"]
    assert buffer_ids(redis, fuzz_settings) == in_buffer
    assert len(dead_letters(redis, keyspace)) == len(letters)


def test_a_redelivered_batch_without_ids_is_skipped_on_every_shard(
    fuzz_settings: Settings, redis: redis_lib.Redis
) -> None:
    """Found by the fuzzer: ids assigned at random routed a redelivery to other shards."""
    from tasks.ingest import ingest_events

    batch = [{"project_id": "p", "name": f"e{n}", "created_at": NOW_MS} for n in range(30)]
    task_id = str(uuid.uuid4())
    first = ingest_events.apply(args=[batch], task_id=task_id).get()
    again = ingest_events.apply(args=[batch], task_id=task_id).get()
    assert (first["accepted"], first["duplicate"], again["duplicate"]) == (30, False, True)
    ids = buffer_ids(redis, fuzz_settings)
    assert sum(ids.values()) == len(ids) == 30
    # Another batch id derives other ids.
    ingest_events.apply(args=[batch], task_id=str(uuid.uuid4())).get()
    assert len(buffer_ids(redis, fuzz_settings)) == 60
