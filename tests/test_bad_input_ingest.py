"""Malformed input on the ingest path: task arguments of any JSON shape, with a real Redis.

Each bad item is a dead letter naming its field, the rest is applied, and
the task never raises (the validator itself: tests/test_bad_input.py).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import msgspec
import pytest
import redis as redis_lib

from tests.support.bad_input import CLOCK, DAY, LIMITS, NOW, SHARD, ev, good
from tests.support.clock import ManualClock
from worker import runtime
from worker.buffer import EventBuffer
from worker.deadletters import REASON_INVALID_EVENT, decode_dead_letter
from worker.ingestion import ingest
from worker.settings import Settings


@pytest.fixture
def buffer(redis: redis_lib.Redis, settings: Settings) -> EventBuffer:
    return EventBuffer(redis, settings, ManualClock(NOW))


def dead_letters(redis: redis_lib.Redis) -> list[tuple[Any, bytes]]:
    return [decode_dead_letter(entry) for entry in redis.lrange(SHARD.dead, 0, -1)]


def queued_ids(redis: redis_lib.Redis) -> list[str]:
    return [json.loads(row)["id"] for row in redis.lrange(SHARD.queue, 0, -1)]


def test_each_bad_item_is_dead_lettered_and_the_rest_applied(
    buffer: EventBuffer, redis: redis_lib.Redis
) -> None:
    bad: list[tuple[Any, str, str]] = [
        ([good(90)], "$", "got array"),
        (json.dumps(good(91)), "$", "got string"),  # JSON text is not an event object
        (7, "$", "got number"),
        (None, "$", "got null"),
        (True, "$", "got boolean"),
        ({}, "name", "required"),
        (ev(created_at=NOW + 30 * DAY), "created_at", "future"),
        (ev(properties={"a": float("nan")}), "properties.a", "finite"),
        (ev(name="\ud800"), "name", "UTF-8"),
    ]
    payload = [good(1), *(item for item, _, _ in bad), good(2)]
    result = ingest(buffer, payload, "batch-1")
    assert (result.accepted, result.invalid, result.appended) == (2, len(bad), 2)
    assert queued_ids(redis) == [str(uuid.UUID(int=1)), str(uuid.UUID(int=2))]
    letters = dead_letters(redis)
    assert len(letters) == len(bad)
    for (header, raw), (item, field, problem) in zip(letters, bad, strict=True):
        assert header.reason == REASON_INVALID_EVENT
        assert (header.field, header.source, header.claim, header.at) == (
            field,
            "ingest",
            "batch-1",
            NOW,
        )
        assert problem in header.error
        # The raw payload is the item as sent: NaN stays NaN, a lone surrogate its escape.
        decoded = json.loads(raw)
        if isinstance(item, dict) and item.get("properties"):
            assert math.isnan(decoded["properties"]["a"])
        else:
            assert decoded == item
    # Redelivered: nothing more, dead letters included.
    again = ingest(buffer, payload, "batch-1")
    assert again.duplicate and len(dead_letters(redis)) == len(bad)


def test_an_ingest_dead_letter_names_the_shard_that_stores_it(
    redis: redis_lib.Redis, settings: Settings
) -> None:
    sharded = EventBuffer(redis, replace(settings, shards=4), CLOCK)
    keyspace = sharded.keyspace
    # The batch's first event routes to a shard other than 0: its dead letters go there.
    session = next(f"s{n}" for n in range(100) if keyspace.route(f"s{n}").shard != 0)
    home = keyspace.route(session).shard
    result = ingest(sharded, [ev(session_id=session), {"name": "no project"}], "batch-9", LIMITS)
    assert (result.accepted, result.invalid) == (1, 1)
    stored = {s.shard: redis.lrange(s.dead, 0, -1) for s in keyspace.all()}
    assert {n: len(entries) for n, entries in stored.items() if entries} == {home: 1}
    header, _ = decode_dead_letter(stored[home][0])
    assert header.shard == home


@pytest.mark.parametrize(
    ("payload", "accepted", "invalid"),
    [
        (good(1), 1, 0),  # one object instead of a list: one event
        ({"project_id": "p"}, 0, 1),
        ("text", 0, 1),
        (12.5, 0, 1),
        (None, 0, 1),
        ([], 0, 0),
        ([[], [[]], {}, "", 0, None, False], 0, 7),
        ([[good(1)], [good(2)]], 0, 2),
    ],
)
def test_any_payload_shape(
    buffer: EventBuffer, redis: redis_lib.Redis, payload: Any, accepted: int, invalid: int
) -> None:
    result = ingest(buffer, payload, "b")
    assert (result.accepted, result.invalid) == (accepted, invalid)
    assert buffer.get_buffer_size() == accepted
    assert len(dead_letters(redis)) == invalid


def test_huge_items_are_dead_lettered_with_a_bounded_payload(
    buffer: EventBuffer, redis: redis_lib.Redis
) -> None:
    huge = ev(properties={"blob": "x" * 3_000_000})
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    result = ingest(buffer, [huge, deep, {"deep": deep}, good(1)], "b")
    assert (result.accepted, result.invalid) == (1, 3)
    (h1, raw1), (h2, raw2), (h3, _) = dead_letters(redis)
    assert h1.field == "properties" and "cut to" in h1.error
    assert len(raw1) == 1 << 20 and raw1.startswith(b'{"project_id":"p"')
    assert h2.field == "$" and raw2.startswith(b"<unprintable list")
    assert h3.field == "name"


def test_python_only_values_from_an_eager_caller_do_not_break_ingest(
    buffer: EventBuffer, redis: redis_lib.Redis
) -> None:
    items: list[Any] = [
        ev(properties={(1, 2): "tuple key"}),
        ev(properties={"big": 10**5000}),
        ev(properties={"b": b"\xff"}),
        {1: "x"},
        object(),
        good(1),
    ]
    result = ingest(buffer, items, "b")
    assert (result.accepted, result.invalid) == (1, 5)
    assert [h.field for h, _ in dead_letters(redis)] == [
        "properties",
        "properties.big",
        "properties.b",
        "$",
        "$",
    ]


@pytest.mark.parametrize("batch_id", ["", None, "x" * 10_000, "line\nforged", "\ud800"])
def test_any_string_id_is_usable_and_stays_idempotent(
    buffer: EventBuffer, redis: redis_lib.Redis, batch_id: Any
) -> None:
    # Task ids (the batch id when the task has no batch_id argument) may be any string.
    first = ingest(buffer, [good(1), {}], batch_id)
    assert first.batch_id.isprintable() and len(first.batch_id) <= 200
    if not batch_id:
        return
    second = ingest(buffer, [good(1), {}], batch_id)
    assert second.duplicate and second.batch_id == first.batch_id
    assert buffer.get_buffer_size() == 1 and len(dead_letters(redis)) == 1


@pytest.mark.parametrize("batch_id", [5, 2.5, ["a"], {"id": 1}, msgspec.Raw(b'{"name":"e2"}')])
def test_a_batch_id_that_is_no_string_is_never_an_id(
    buffer: EventBuffer, redis: redis_lib.Redis, batch_id: Any
) -> None:
    # The batch and the would-be id are kept, once, as the task body that would carry them.
    first = ingest(buffer, [good(1), {}], batch_id)
    assert first.undeliverable and not first.duplicate and buffer.get_buffer_size() == 0
    assert ingest(buffer, [good(1), {}], batch_id).duplicate
    [(header, raw)] = dead_letters(redis)
    assert (header.reason, header.task) == ("undeliverable_task", "eventbuffer.ingest_events")
    shown = json.loads(bytes(batch_id)) if isinstance(batch_id, msgspec.Raw) else batch_id
    assert json.loads(raw) == [[[good(1), {}], shown], {}, {}]


@pytest.fixture
def configured(settings: Settings) -> Iterator[Settings]:
    runtime.configure(settings)
    yield settings
    runtime.reset()


def test_the_task_never_raises_for_bad_arguments(
    configured: Settings, redis: redis_lib.Redis
) -> None:
    from tasks.ingest import ingest_event, ingest_events

    # The task validates with the settings' limits, on the system clock.
    fresh = {"project_id": "p", "name": "ok", "created_at": int(time.time() * 1000)}
    cases: list[tuple[Any, Any]] = [
        ([fresh, "junk", [1], None], "t1"),
        ({"not": "a list"}, "t2"),
        ("string payload", "t3"),
        (None, "t4"),
        ([fresh], 12345),  # a batch id that is not a string
        ([fresh], {"weird": ["id"]}),
    ]
    for payload, batch_id in cases:
        result = ingest_events.apply(args=[payload, batch_id], task_id=str(uuid.uuid4()))
        assert result.successful(), result.traceback
    single = ingest_event.apply(args=[[1, 2, 3]], task_id=str(uuid.uuid4()))
    assert single.successful() and single.result["invalid"] == 1
    assert EventBuffer(redis, configured).get_buffer_size() == 1
    # 3 invalid items of t1, t2, t3, t4, the single one; the two batches whose batch id
    # is no string are kept whole (undeliverable_task), never applied under such an id.
    assert redis.llen(SHARD.dead) == 3 + 1 + 1 + 1 + 1 + 2
